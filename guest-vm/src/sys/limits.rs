//! Process limits a host with many guests meets first: `RLIMIT_NOFILE` (every guest holds 8
//! descriptors: `/dev/kvm`, VM, vCPU, two userfaultfds, pagemap, two eventfds).
//!
//! Invariant: only ever raises the soft limit, never above the hard one (which needs no
//! privilege).

use crate::error::{Error, Result};

/// Raises the soft `RLIMIT_NOFILE` to at least `want` descriptors where the hard limit allows
/// (to the hard limit otherwise); returns the soft limit now.
pub fn raise_nofile(want: u64) -> Result<u64> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `l` is a valid rlimit the call writes.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return Err(Error::Sys {
            what: "getrlimit(RLIMIT_NOFILE)",
            err: std::io::Error::last_os_error(),
        });
    }
    if l.rlim_cur >= want {
        return Ok(l.rlim_cur);
    }
    l.rlim_cur = want.min(l.rlim_max);
    // SAFETY: as above; the new soft limit does not exceed the hard one.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) } != 0 {
        return Err(Error::Sys {
            what: "setrlimit(RLIMIT_NOFILE)",
            err: std::io::Error::last_os_error(),
        });
    }
    Ok(l.rlim_cur)
}
