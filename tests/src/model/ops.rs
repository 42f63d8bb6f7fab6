//! The operations of the Vmar model test and how they are decoded from a `Source`.
//!
//! Invariant: decoding never fails and never looks at real objects — only at the counts of
//! regions, spaces and Vmos the harness offers (indices into its lists) — so the same bytes
//! always decode to the same sequence.

use vmo::{Placement, VmPerms, PAGE_SIZE};

use super::input::Source;

const P: u64 = PAGE_SIZE;

#[derive(Clone, Debug)]
pub enum Op {
    NewVmo {
        size: u64,
        resizable: bool,
        pager: bool,
    },
    DropVmo {
        v: usize,
    },
    Map {
        region: usize,
        vmo: usize,
        vmo_offset: u64,
        len: u64,
        placement: Placement,
        perms: VmPerms,
        allow_faults: bool,
        shared: bool,
    },
    Unmap {
        region: usize,
        offset: u64,
        len: u64,
    },
    Protect {
        region: usize,
        offset: u64,
        len: u64,
        perms: VmPerms,
    },
    Allocate {
        region: usize,
        placement: Placement,
        len: u64,
        may: VmPerms,
    },
    Destroy {
        region: usize,
    },
    Fork {
        region: usize,
    },
    Reset {
        region: usize,
    },
    SetResetPoint {
        region: usize,
    },
    Query {
        region: usize,
        gpa: u64,
    },
    Fault {
        region: usize,
        gpa: u64,
        write: bool,
    },
    GuestWrite {
        space: usize,
        gpa: u64,
        len: usize,
        val: u8,
    },
    GuestRead {
        space: usize,
        gpa: u64,
        len: usize,
    },
    VmoWrite {
        v: usize,
        offset: u64,
        len: usize,
        val: u8,
    },
    VmoRead {
        v: usize,
        offset: u64,
        len: usize,
    },
    Commit {
        v: usize,
        offset: u64,
        len: u64,
    },
    Decommit {
        v: usize,
        offset: u64,
        len: u64,
    },
    Resize {
        v: usize,
        size: u64,
    },
    DropSpace {
        space: usize,
    },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::NewVmo { .. } => "new_vmo",
            Op::DropVmo { .. } => "drop_vmo",
            Op::Map { .. } => "map",
            Op::Unmap { .. } => "unmap",
            Op::Protect { .. } => "protect",
            Op::Allocate { .. } => "allocate",
            Op::Destroy { .. } => "destroy",
            Op::Fork { .. } => "fork",
            Op::Reset { .. } => "reset",
            Op::SetResetPoint { .. } => "set_reset_point",
            Op::Query { .. } => "query",
            Op::Fault { .. } => "handle_fault",
            Op::GuestWrite { .. } => "guest_write",
            Op::GuestRead { .. } => "guest_read",
            Op::VmoWrite { .. } => "vmo_write",
            Op::VmoRead { .. } => "vmo_read",
            Op::Commit { .. } => "commit",
            Op::Decommit { .. } => "decommit",
            Op::Resize { .. } => "resize",
            Op::DropSpace { .. } => "drop_space",
        }
    }
}

/// What the decoder may choose from: `regions[i]` = (region index, region length),
/// `spaces[i]` = (space index, space size), `vmos[i]` = (vmo index, size).
pub struct Choices<'a> {
    pub regions: &'a [(usize, u64)],
    pub spaces: &'a [(usize, u64)],
    pub vmos: &'a [(usize, u64)],
    /// Mappings the reference knows of: (root region of its space, space, base, len).
    pub mapped: &'a [(usize, usize, u64, u64)],
}

/// A range inside a known mapping, for a region-relative operation on its space's root.
fn in_mapping(src: &mut dyn Source, c: &Choices) -> Option<(usize, usize, u64, u64)> {
    if c.mapped.is_empty() || src.byte().is_multiple_of(4) {
        return None;
    }
    let (root, space, base, len) = c.mapped[src.pick(c.mapped.len())];
    let pages = len / P;
    let first = src.pick(pages as usize) as u64;
    let n = 1 + src.pick((pages - first) as usize) as u64;
    Some((root, space, base + first * P, n * P))
}

fn perms(src: &mut dyn Source) -> VmPerms {
    match src.byte() % 12 {
        0 => VmPerms::empty(),
        1..=3 => VmPerms::READ,
        4..=7 => VmPerms::RW,
        8 => VmPerms::READ | VmPerms::EXEC,
        9 => VmPerms::RWX,
        10 => VmPerms::WRITE,
        _ => VmPerms::RW | VmPerms::MAY_READ,
    }
}

fn may(src: &mut dyn Source) -> VmPerms {
    match src.byte() % 8 {
        0..=3 => VmPerms::MAY_ALL,
        4 => VmPerms::MAY_READ,
        5 => VmPerms::MAY_READ | VmPerms::MAY_WRITE,
        6 => VmPerms::MAY_READ | VmPerms::MAY_EXEC,
        _ => VmPerms::MAY_ALL | VmPerms::READ,
    }
}

fn placement(src: &mut dyn Source, span: u64, overwrite: bool) -> Placement {
    match src.byte() % 6 {
        0 | 1 => Placement::Anywhere {
            align: [P, P, 2 * P, 16 * P, 3 * P, 0][src.pick(6)],
        },
        2 if overwrite => Placement::SpecificOverwrite(src.offset(span)),
        3 if overwrite => Placement::SpecificOverwrite(src.offset(span)),
        _ => Placement::Specific(src.offset(span)),
    }
}

fn vmo_size(src: &mut dyn Source) -> u64 {
    match src.byte() % 10 {
        0 => 0,
        1 => P * (1 + src.byte() as u64 % 16) - 1 - src.byte() as u64,
        2 => u64::MAX - src.byte() as u64,
        3 => (1 << 52) + P,
        _ => P * (1 + src.byte() as u64 % 16),
    }
}

/// Decodes one operation.
pub fn decode(src: &mut dyn Source, c: &Choices) -> Op {
    let (region, rlen) = c.regions[src.pick(c.regions.len())];
    let (space, ssize) = c.spaces[src.pick(c.spaces.len())];
    let (v, vsize) = if c.vmos.is_empty() {
        (usize::MAX, 0)
    } else {
        c.vmos[src.pick(c.vmos.len())]
    };
    let kind = src.byte() % 64;
    if c.vmos.is_empty() && matches!(kind, 4..=11 | 40..=57) {
        return Op::NewVmo {
            size: 4 * P,
            resizable: false,
            pager: false,
        };
    }
    match kind {
        0..=3 if c.vmos.len() >= 24 => Op::DropVmo { v },
        0..=3 => {
            let size = vmo_size(src);
            let flags = src.byte();
            // Bounded model memory: big sizes are only used where they must fail.
            let size = if size > 64 * P && size < 1 << 52 {
                4 * P
            } else {
                size
            };
            Op::NewVmo {
                size,
                resizable: flags & 3 == 1,
                pager: flags & 3 == 2,
            }
        }
        4 => Op::DropVmo { v },
        5..=11 => {
            let flags = src.byte();
            let plain = flags & 0x30 != 0;
            let vmo_offset = match src.byte() % 4 {
                _ if plain => 0,
                0 | 1 => 0,
                2 => P * (src.byte() as u64 % 8),
                _ => src.offset(vsize),
            };
            let len = if plain {
                vsize.max(P)
            } else {
                src.length(vsize.max(P))
            };
            let placement = if plain && flags & 0x40 != 0 {
                Placement::Anywhere { align: P }
            } else {
                placement(src, rlen, true)
            };
            let perms = if plain && flags & 0x80 != 0 {
                VmPerms::RW
            } else {
                perms(src)
            };
            Op::Map {
                region,
                vmo: v,
                vmo_offset,
                len,
                placement,
                perms,
                allow_faults: flags & 3 != 0,
                shared: flags & 4 != 0 && flags & 8 != 0,
            }
        }
        12..=14 => match in_mapping(src, c) {
            Some((root, _, off, len)) => Op::Unmap {
                region: root,
                offset: off,
                len,
            },
            None => Op::Unmap {
                region,
                offset: src.offset(rlen),
                len: src.length(rlen),
            },
        },
        15..=17 => match in_mapping(src, c) {
            Some((root, _, off, len)) => Op::Protect {
                region: root,
                offset: off,
                len,
                perms: perms(src),
            },
            None => Op::Protect {
                region,
                offset: src.offset(rlen),
                len: src.length(rlen),
                perms: perms(src),
            },
        },
        18..=19 => Op::Allocate {
            region,
            placement: {
                let overwrite = src.byte().is_multiple_of(8);
                placement(src, rlen, overwrite)
            },
            len: src.length(rlen),
            may: may(src),
        },
        20 if src.byte().is_multiple_of(8) => Op::Destroy { region },
        // Bounded state: past 6 live spaces a fork becomes a drop, so checks stay cheap.
        21..=22 if c.spaces.len() < 6 => Op::Fork { region },
        21..=22 => Op::DropSpace { space },
        23..=24 => Op::Reset { region },
        25 => Op::SetResetPoint { region },
        26 => Op::Query {
            region,
            gpa: src.offset(ssize),
        },
        27..=29 => match in_mapping(src, c) {
            Some((root, _, gpa, _)) => Op::Fault {
                region: root,
                gpa: gpa + src.u16() as u64 % P,
                write: src.bool(),
            },
            None => Op::Fault {
                region,
                gpa: src.offset(ssize),
                write: src.bool(),
            },
        },
        30..=35 => match in_mapping(src, c) {
            Some((_, space, gpa, len)) => Op::GuestWrite {
                space,
                gpa: gpa + src.u16() as u64 % len,
                len: src.io_len(),
                val: src.byte() | 1,
            },
            None => Op::GuestWrite {
                space,
                gpa: src.offset(ssize).min(ssize + 4 * P),
                len: src.io_len(),
                val: src.byte() | 1,
            },
        },
        36..=39 => match in_mapping(src, c) {
            Some((_, space, gpa, len)) => Op::GuestRead {
                space,
                gpa: gpa + src.u16() as u64 % len,
                len: src.io_len(),
            },
            None => Op::GuestRead {
                space,
                gpa: src.offset(ssize).min(ssize + 4 * P),
                len: src.io_len(),
            },
        },
        40..=44 => Op::VmoWrite {
            v,
            offset: src.offset(vsize),
            len: src.io_len(),
            val: src.byte() | 1,
        },
        45..=47 => Op::VmoRead {
            v,
            offset: src.offset(vsize),
            len: src.io_len(),
        },
        48..=50 => Op::Commit {
            v,
            offset: src.offset(vsize),
            len: src.length(vsize),
        },
        51..=54 => Op::Decommit {
            v,
            offset: src.offset(vsize),
            len: src.length(vsize),
        },
        55..=57 => {
            let size = vmo_size(src);
            let size = if size > 64 * P && size < 1 << 52 {
                2 * P
            } else {
                size
            };
            Op::Resize { v, size }
        }
        58 if src.byte().is_multiple_of(4) => Op::DropSpace { space },
        _ => Op::GuestWrite {
            space,
            gpa: src.offset(ssize).min(ssize + 4 * P),
            len: 1,
            val: src.byte() | 1,
        },
    }
}
