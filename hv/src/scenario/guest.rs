//! One guest of the scenario: its address space, its vCPU, and what the run recorded about it
//! (status, hypercall reports, exit count, why it stopped, its debug-port console).
//!
//! Invariants: a guest is `Runnable` until it halts (`Done`) or is stopped with a reason
//! (`Stopped`), and never leaves those two; `stop` is the only way to stop one, and it prints
//! the reason.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

use vmo::Error as VmoError;

use super::space::Space;
use crate::platform::serial::println;
use crate::virt::vcpu::Vcpu;

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Status {
    Runnable,
    Done,
    Stopped(String),
}

pub(crate) struct Guest {
    pub(crate) name: String,
    pub(crate) space: Space,
    pub(crate) vcpu: Box<dyn Vcpu>,
    pub(crate) status: Status,
    /// (tag, value, extra) of every HC_REPORT.
    pub(crate) reports: Vec<(u64, u64, u64)>,
    pub(crate) exits: u64,
    pub(crate) stop_error: Option<VmoError>,
    /// GPA of an EPT misconfiguration / NPT reserved-bit fault that stopped the guest.
    pub(crate) misconfig: Option<u64>,
    /// Bytes written to the debug port 0xE9, collected into lines.
    pub(crate) console: String,
}

impl Guest {
    /// A guest that has not run yet: a new one, or a fork child.
    pub(crate) fn runnable(name: String, space: Space, vcpu: Box<dyn Vcpu>) -> Guest {
        Guest {
            name,
            space,
            vcpu,
            status: Status::Runnable,
            reports: Vec::new(),
            exits: 0,
            stop_error: None,
            misconfig: None,
            console: String::new(),
        }
    }

    /// Stops the guest for `why` (printed; the others keep running).
    pub(crate) fn stop(&mut self, why: String) {
        println!("guest {} stopped: {}", self.name, why);
        self.status = Status::Stopped(why);
    }
}
