//! The small structured sections of a snapshot file — the vCPU state and the Vmar layout —
//! as serde types encoded with `postcard`.
//!
//! - `VcpuSection` holds every field of `VcpuState`; the KVM structures are serialized by
//!   `kvm-bindings`' own `serde` feature (their bytes, as KVM defines them), except `kvm_fpu`,
//!   which that feature does not cover and is mirrored field by field here.
//! - `LayoutSection` is the guest's memory size, its Vmos (size each) and its mappings (base,
//!   length, Vmo, offset, perms, shared) in address order.
//! - `WorkingSetSection` (optional, format 1.1) is the set of guest-physical pages the guest
//!   touched in its first run after the snapshot point, as runs of adjacent pages with the
//!   same written state (`vmo::WorkingSet::runs`), in address order.
//!
//! Invariant: decoding checks that the whole section was consumed and that the layout is
//! self-consistent (mappings page aligned, in order, inside the guest and their Vmo), so a
//! restore never builds a Vmar from a layout the memory model would refuse halfway.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

use super::error::{SnapResult, SnapshotError};
use super::format::PAGE;
use crate::vmm::vcpu_state::VcpuState;

#[derive(Serialize, Deserialize)]
struct FpuMirror {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
}

/// The vCPU section: all of `VcpuState`.
#[derive(Serialize, Deserialize)]
pub struct VcpuSection {
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: FpuMirror,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    msrs: Vec<kvm_msr_entry>,
    events: kvm_vcpu_events,
    mp_state: kvm_mp_state,
    debugregs: kvm_debugregs,
    lapic: Option<kvm_lapic_state>,
}

impl VcpuSection {
    pub fn from_state(s: &VcpuState) -> Self {
        let f = &s.fpu;
        let c = s.clone();
        VcpuSection {
            regs: c.regs,
            sregs: c.sregs,
            fpu: FpuMirror {
                fpr: f.fpr,
                fcw: f.fcw,
                fsw: f.fsw,
                ftwx: f.ftwx,
                last_opcode: f.last_opcode,
                last_ip: f.last_ip,
                last_dp: f.last_dp,
                xmm: f.xmm,
                mxcsr: f.mxcsr,
            },
            xsave: c.xsave,
            xcrs: c.xcrs,
            msrs: c.msrs,
            events: c.events,
            mp_state: c.mp_state,
            debugregs: c.debugregs,
            lapic: c.lapic,
        }
    }

    pub fn into_state(self) -> VcpuState {
        let m = self.fpu;
        VcpuState {
            regs: self.regs,
            sregs: self.sregs,
            fpu: kvm_fpu {
                fpr: m.fpr,
                fcw: m.fcw,
                fsw: m.fsw,
                ftwx: m.ftwx,
                last_opcode: m.last_opcode,
                last_ip: m.last_ip,
                last_dp: m.last_dp,
                xmm: m.xmm,
                mxcsr: m.mxcsr,
                ..Default::default()
            },
            xsave: self.xsave,
            xcrs: self.xcrs,
            msrs: self.msrs,
            events: self.events,
            mp_state: self.mp_state,
            debugregs: self.debugregs,
            lapic: self.lapic,
        }
    }
}

/// One Vmo of the layout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmoDesc {
    pub size: u64,
}

/// One mapping of the layout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingDesc {
    pub base: u64,
    pub len: u64,
    pub vmo: u32,
    pub vmo_offset: u64,
    /// `vmo::VmPerms` access bits.
    pub perms: u32,
    pub shared: bool,
}

/// The layout section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutSection {
    pub mem_size: u64,
    pub vmos: Vec<VmoDesc>,
    pub mappings: Vec<MappingDesc>,
}

impl LayoutSection {
    /// Checks what restore relies on; the first violation, described.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let aligned = |x: u64| x.is_multiple_of(PAGE);
        if self.mem_size == 0 || !aligned(self.mem_size) {
            return Err(format!("guest size {:#x}", self.mem_size));
        }
        for (i, v) in self.vmos.iter().enumerate() {
            if v.size == 0 || !aligned(v.size) {
                return Err(format!("vmo {i} size {:#x}", v.size));
            }
        }
        let mut prev_end = 0;
        for (i, m) in self.mappings.iter().enumerate() {
            let end = m
                .base
                .checked_add(m.len)
                .ok_or(format!("mapping {i} overflows"))?;
            let vmo = self.vmos.get(m.vmo as usize).ok_or(format!(
                "mapping {i} names vmo {} of {}",
                m.vmo,
                self.vmos.len()
            ))?;
            let vend = m.vmo_offset.checked_add(m.len);
            if !aligned(m.base) || !aligned(m.len) || !aligned(m.vmo_offset) || m.len == 0 {
                return Err(format!("mapping {i} not page aligned"));
            }
            if m.base < prev_end || end > self.mem_size {
                return Err(format!("mapping {i} out of order or outside the guest"));
            }
            if vend.is_none_or(|e| e > vmo.size) {
                return Err(format!("mapping {i} extends past vmo {}", m.vmo));
            }
            if vmo::VmPerms::from_bits(m.perms).is_none() {
                return Err(format!("mapping {i} perms {:#x}", m.perms));
            }
            prev_end = end;
        }
        Ok(())
    }
}

/// One run of the working-set section: `pages` pages from guest-physical `gpa`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkingSetRun {
    pub gpa: u64,
    pub pages: u64,
    /// The recorded run wrote these pages (a restore installs them writable).
    pub written: bool,
}

/// The working-set section.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkingSetSection {
    pub runs: Vec<WorkingSetRun>,
}

impl WorkingSetSection {
    pub fn from_set(set: &vmo::WorkingSet) -> Self {
        WorkingSetSection {
            runs: set
                .runs()
                .into_iter()
                .map(|(gpa, pages, written)| WorkingSetRun {
                    gpa,
                    pages,
                    written,
                })
                .collect(),
        }
    }

    /// The set, checked against a guest of `mem_size` bytes: runs page aligned, non-empty,
    /// in address order without overlap, inside the guest. The first violation, described.
    pub fn to_set(&self, mem_size: u64) -> std::result::Result<vmo::WorkingSet, String> {
        let mut set = vmo::WorkingSet::default();
        let mut prev_end = 0;
        for (i, r) in self.runs.iter().enumerate() {
            let end = r
                .pages
                .checked_mul(PAGE)
                .and_then(|len| r.gpa.checked_add(len))
                .ok_or(format!("run {i} overflows"))?;
            if !r.gpa.is_multiple_of(PAGE) || r.pages == 0 {
                return Err(format!("run {i} at {:#x} of {} pages", r.gpa, r.pages));
            }
            if r.gpa < prev_end || end > mem_size {
                return Err(format!("run {i} out of order or outside the guest"));
            }
            set.note(r.gpa, r.pages, r.written);
            prev_end = end;
        }
        Ok(set)
    }

    /// `to_set` against `layout`, with every page also inside one of its mappings (a restore
    /// prefetches them all).
    pub fn check(&self, layout: &LayoutSection) -> std::result::Result<vmo::WorkingSet, String> {
        let set = self.to_set(layout.mem_size)?;
        for (i, r) in self.runs.iter().enumerate() {
            let (mut at, end) = (r.gpa, r.gpa + r.pages * PAGE);
            while at < end {
                let m = layout
                    .mappings
                    .iter()
                    .find(|m| m.base <= at && at < m.base + m.len)
                    .ok_or(format!("run {i}: page {at:#x} is in no mapping"))?;
                at = end.min(m.base + m.len);
            }
        }
        Ok(set)
    }
}

/// Encodes a section value.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing plain structs into a Vec cannot fail (no maps with non-string keys, no I/O).
    postcard::to_stdvec(v).unwrap_or_default()
}

/// Decodes a whole section (trailing bytes are an error).
pub fn decode<'a, T: Deserialize<'a>>(section: &'static str, bytes: &'a [u8]) -> SnapResult<T> {
    let malformed = |detail: String| SnapshotError::Malformed { section, detail };
    let (v, rest) = postcard::take_from_bytes(bytes).map_err(|e| malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(malformed(format!("{} trailing bytes", rest.len())));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> LayoutSection {
        LayoutSection {
            mem_size: 2 << 20,
            vmos: vec![VmoDesc { size: 2 << 20 }],
            mappings: vec![MappingDesc {
                base: 0,
                len: 2 << 20,
                vmo: 0,
                vmo_offset: 0,
                perms: vmo::VmPerms::RW.bits(),
                shared: false,
            }],
        }
    }

    #[test]
    fn layout_round_trips_and_validates() {
        let l = layout();
        let back: LayoutSection = decode("layout", &encode(&l)).unwrap();
        assert_eq!(back, l);
        assert!(back.validate().is_ok());
    }

    #[test]
    fn bad_layouts_are_described() {
        let mut l = layout();
        l.mappings[0].vmo = 4;
        assert!(l.validate().unwrap_err().contains("vmo 4"));
        let mut l = layout();
        l.mappings[0].len = 4 << 20;
        assert!(l.validate().is_err());
    }

    #[test]
    fn working_set_round_trips_and_bad_runs_are_described() {
        let mut set = vmo::WorkingSet::default();
        set.note(0x3000, 4, false);
        set.note(0x5000, 1, true);
        set.note(0x10000, 2, true);
        let sec = WorkingSetSection::from_set(&set);
        let back: WorkingSetSection = decode("working-set", &encode(&sec)).unwrap();
        assert_eq!(back.to_set(2 << 20).unwrap(), set);
        assert_eq!(back.check(&layout()).unwrap(), set);
        let mut holed = layout();
        holed.mappings[0].base = 0x8000;
        holed.mappings[0].len = (2 << 20) - 0x8000;
        assert!(back.check(&holed).unwrap_err().contains("no mapping"));
        assert!(back.to_set(0x10000).unwrap_err().contains("outside"));
        let mut bad = back.clone();
        bad.runs[1].gpa = 0x1234;
        assert!(bad.to_set(2 << 20).is_err());
        let mut bad = back.clone();
        bad.runs.swap(0, 2);
        assert!(bad.to_set(2 << 20).unwrap_err().contains("order"));
        let mut bad = back;
        bad.runs[0].pages = u64::MAX;
        assert!(bad.to_set(2 << 20).unwrap_err().contains("overflows"));
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut b = encode(&layout());
        b.push(0);
        assert!(matches!(
            decode::<LayoutSection>("layout", &b),
            Err(SnapshotError::Malformed { .. })
        ));
    }
}
