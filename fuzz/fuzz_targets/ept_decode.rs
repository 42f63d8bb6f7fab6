//! Fuzz target `ept_decode`: the second-level fault decoders (`decode_vmx_exit`,
//! `decode_svm_exit` / `decode_npf`) on arbitrary exit reasons, qualifications and addresses.
//! They must never panic, and every result must agree with the bit layout (SDM table "Exit
//! Qualification for EPT Violations", APM "Nested Page Fault"): the access bits, the kind, the
//! GPA passed through unchanged, the linear address only when valid, and errors exactly for the
//! inputs that are not second-level faults.
#![no_main]

use ept::fault::{
    ept_qual, npf_info, SVM_EXIT_NPF, VMX_EXIT_EPT_MISCONFIG, VMX_EXIT_EPT_VIOLATION,
};
use ept::{decode_svm_exit, decode_vmx_exit, Access, DecodeError, FaultKind};
use libfuzzer_sys::fuzz_target;

fn word(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, x) in b.iter_mut().enumerate() {
        *x = data.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let (sel, qual, gpa, gla) = (word(data, 0), word(data, 8), word(data, 16), word(data, 24));
    // Mostly the interesting reasons, sometimes anything.
    let reason = match sel & 7 {
        0..=3 => VMX_EXIT_EPT_VIOLATION | ((sel >> 8) as u32 & 0x7fff_0000),
        4 => VMX_EXIT_EPT_MISCONFIG,
        5 => VMX_EXIT_EPT_VIOLATION | 1 << 31,
        _ => (sel >> 32) as u32,
    };
    let r = decode_vmx_exit(reason, qual, gpa, gla);
    if reason & (1 << 31) != 0 {
        assert_eq!(r, Err(DecodeError::NotAFault));
    } else {
        match reason & 0xffff {
            VMX_EXIT_EPT_VIOLATION if qual & 7 == 0 => {
                assert_eq!(
                    r,
                    Err(DecodeError::NoAccess {
                        qualification: qual
                    })
                )
            }
            VMX_EXIT_EPT_VIOLATION => {
                let f = r.expect("an EPT violation with an access decodes");
                assert_eq!(f.gpa, gpa);
                assert_eq!(f.access.contains(Access::READ), qual & ept_qual::READ != 0);
                assert_eq!(
                    f.access.contains(Access::WRITE),
                    qual & ept_qual::WRITE != 0
                );
                assert_eq!(f.access.contains(Access::EXEC), qual & ept_qual::FETCH != 0);
                assert_eq!(f.kind == FaultKind::NotPresent, qual & 0x38 == 0);
                let gla_valid = qual & ept_qual::GLA_VALID != 0;
                assert_eq!(f.gla, gla_valid.then_some(gla));
                assert_eq!(
                    f.guest_walk,
                    gla_valid && qual & ept_qual::FINAL_TRANSLATION == 0
                );
                assert_eq!(f.nmi_unblocking, qual & ept_qual::NMI_UNBLOCKING != 0);
            }
            VMX_EXIT_EPT_MISCONFIG => assert_eq!(r, Err(DecodeError::EptMisconfig { gpa })),
            _ => assert_eq!(r, Err(DecodeError::NotAFault)),
        }
    }

    let code = if sel & 8 == 0 { SVM_EXIT_NPF } else { sel >> 4 };
    let r = decode_svm_exit(code, qual, gpa);
    if code != SVM_EXIT_NPF {
        assert_eq!(r, Err(DecodeError::NotAFault));
    } else if qual & npf_info::RESERVED != 0 {
        assert_eq!(r, Err(DecodeError::NptMisconfig { gpa }));
    } else {
        let f = r.expect("an NPF without RSVD decodes");
        let want = if qual & npf_info::FETCH != 0 {
            Access::EXEC
        } else if qual & npf_info::WRITE != 0 {
            Access::WRITE
        } else {
            Access::READ
        };
        assert_eq!(
            (f.gpa, f.access, f.gla, f.nmi_unblocking),
            (gpa, want, None, false)
        );
        assert_eq!(
            f.kind == FaultKind::Permission,
            qual & npf_info::PRESENT != 0
        );
        assert_eq!(f.guest_walk, qual & npf_info::GUEST_PAGE_TABLE != 0);
    }
});
