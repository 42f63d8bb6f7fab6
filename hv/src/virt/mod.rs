//! virt: hardware virtualization. Imports `platform` only, never `scenario`.
//!
//! One job per file:
//! - `vcpu` — the vendor-neutral model: guest registers (`Gprs`, layout pinned), the state a
//!   fork copies (`VcpuState`), the decoded exits (`Exit`), and the `Vcpu` / `Backend` traits.
//! - `stage2` — `HvTable`: the second-level table (EPT or NPT, from `ept`) a guest's Vmar
//!   drives, with its flush hook.
//! - `gprs.s` — the one guest GPR save/restore (two assembler macros) that both world
//!   switches use.
//! - `vmx/` — Intel VT-x with EPT (`mod`: capabilities, VMXON, backend and vCPU; `vmcs`: the
//!   VMCS instructions and contents; `exit`: exit reasons and decoding; `entry.s`).
//! - `svm/` — AMD SVM with nested paging (`mod`: enablement, backend and vCPU; `vmcb`: the VMCB
//!   layout; `exit`: exit codes and decoding; `entry.s`).
//!
//! Arrows: `vmx`, `svm` → `vcpu`, `stage2` → `platform`; the two vendors never import each
//! other.

pub mod stage2;
pub mod svm;
pub mod vcpu;
pub mod vmx;
