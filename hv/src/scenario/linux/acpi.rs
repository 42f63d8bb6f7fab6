//! Just enough ACPI to know how the pass-through guest powers off: the RSDP (found where the
//! BIOS puts it: the first KiB of the EBDA, then 0xE0000–0xFFFFF), the RSDT/XSDT it names, and
//! the FADT's PM1a control port, whose SLP_EN write is the guest's "power off".
//!
//! Invariants: every table is read only after its signature, length bound and checksum are
//! verified; addresses are followed only below 4 GiB (hv's identity map); a missing or broken
//! table yields `None`, never a fault. Runs before the guest exists (the firmware areas are
//! the BIOS's, unchanged).

/// What hv learned from the firmware's tables.
pub struct Acpi {
    /// Physical address of the RSDP (handed to the kernel in the zero page).
    pub rsdp: u64,
    /// The FADT's PM1a control block port, if it has one.
    pub pm1a_cnt: Option<u16>,
}

/// SLP_EN in PM1 control: the write that enters the sleep state SLP_TYP names (S5 = off).
pub const PM1_SLP_EN: u32 = 1 << 13;

/// Longest table this reader accepts (QEMU's are a few KiB).
const MAX_TABLE: u64 = 64 << 10;
const FOUR_GIB: u64 = 1 << 32;

/// `len` bytes at physical `pa`, if they lie below 4 GiB.
fn bytes(pa: u64, len: u64) -> Option<&'static [u8]> {
    if pa == 0 || pa.checked_add(len)? > FOUR_GIB {
        return None;
    }
    // SAFETY: hv identity-maps [0, 4 GiB) (boot.s) and the range lies inside it; it is the
    // firmware's area (BIOS ROM, EBDA or ACPI tables), which nothing writes while hv reads it.
    Some(unsafe { core::slice::from_raw_parts(pa as *const u8, len as usize) })
}

fn checksum_ok(b: &[u8]) -> bool {
    b.iter().fold(0u8, |s, &x| s.wrapping_add(x)) == 0
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from(u32_at(b, off)) | (u64::from(u32_at(b, off + 4)) << 32)
}

/// The table at `pa` if its signature is `sig` and its length and checksum check out.
fn table(pa: u64, sig: &[u8; 4]) -> Option<&'static [u8]> {
    let head = bytes(pa, 36)?;
    let len = u64::from(u32_at(head, 4));
    if &head[..4] != sig || !(36..=MAX_TABLE).contains(&len) {
        return None;
    }
    let t = bytes(pa, len)?;
    checksum_ok(t).then_some(t)
}

fn find_rsdp() -> Option<u64> {
    // The EBDA segment is at 0x40E of the BIOS data area.
    let ebda = bytes(0x40E, 2).map(|b| u64::from(u16::from_le_bytes([b[0], b[1]])) << 4);
    let areas = ebda
        .filter(|&e| e >= 0x400)
        .map(|e| (e, e + 1024))
        .into_iter()
        .chain(core::iter::once((0xE_0000, 0x10_0000)));
    for (start, end) in areas {
        let mut pa = start;
        while pa + 20 <= end {
            if let Some(b) = bytes(pa, 20) {
                if &b[..8] == b"RSD PTR " && checksum_ok(b) {
                    return Some(pa);
                }
            }
            pa += 16;
        }
    }
    None
}

/// Reads the firmware's ACPI tables (`None` when there is no valid RSDP).
pub fn probe() -> Option<Acpi> {
    let rsdp = find_rsdp()?;
    let r = bytes(rsdp, 36)?;
    // Revision 2+: the XSDT (64-bit entries); otherwise the RSDT (32-bit entries).
    let (root, entry) = match (r[15] >= 2).then(|| u64_at(r, 24)).filter(|&x| x != 0) {
        Some(xsdt) => (table(xsdt, b"XSDT"), 8),
        None => (table(u64::from(u32_at(r, 16)), b"RSDT"), 4),
    };
    let pm1a_cnt = root.and_then(|t| {
        t[36..].chunks_exact(entry).find_map(|e| {
            let pa = if entry == 8 {
                u64_at(e, 0)
            } else {
                u64::from(u32_at(e, 0))
            };
            let fadt = table(pa, b"FACP").filter(|f| f.len() >= 68)?;
            let port = u32_at(fadt, 64);
            (port != 0 && port <= 0xFFFF).then_some(port as u16)
        })
    });
    Some(Acpi { rsdp, pm1a_cnt })
}
