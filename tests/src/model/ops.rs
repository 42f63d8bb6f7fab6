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
    NewVmo { size: u64, resizable: bool, pager: bool },
    DropVmo { v: usize },
    Map { region: usize, vmo: usize, vmo_offset: u64, len: u64, placement: Placement, perms: VmPerms, allow_faults: bool, shared: bool },
    Unmap { region: usize, offset: u64, len: u64 },
    Protect { region: usize, offset: u64, len: u64, perms: VmPerms },
    Allocate { region: usize, placement: Placement, len: u64, may: VmPerms },
    Destroy { region: usize },
    Fork { region: usize },
    Reset { region: usize },
    SetResetPoint { region: usize },
    Query { region: usize, gpa: u64 },
    Fault { region: usize, gpa: u64, write: bool },
    GuestWrite { space: usize, gpa: u64, len: usize, val: u8 },
    GuestRead { space: usize, gpa: u64, len: usize },
    VmoWrite { v: usize, offset: u64, len: usize, val: u8 },
    VmoRead { v: usize, offset: u64, len: usize },
    Commit { v: usize, offset: u64, len: u64 },
    Decommit { v: usize, offset: u64, len: u64 },
    Resize { v: usize, size: u64 },
    DropSpace { space: usize },
}

/// What the decoder may choose from: `regions[i]` = (region index, region length),
/// `spaces[i]` = (space index, space size), `vmos[i]` = (vmo index, size).
pub struct Choices<'a> {
    pub regions: &'a [(usize, u64)],
    pub spaces: &'a [(usize, u64)],
    pub vmos: &'a [(usize, u64)],
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
        0..=3 => {
            let size = vmo_size(src);
            let flags = src.byte();
            // Bounded model memory: big sizes are only used where they must fail.
            let size = if size > 64 * P && size < 1 << 52 { 4 * P } else { size };
            Op::NewVmo { size, resizable: flags & 3 == 1, pager: flags & 3 == 2 }
        }
        4 => Op::DropVmo { v },
        5..=11 => {
            let flags = src.byte();
            let vmo_offset = match src.byte() % 4 {
                0 | 1 => 0,
                2 => P * (src.byte() as u64 % 8),
                _ => src.offset(vsize),
            };
            Op::Map {
                region,
                vmo: v,
                vmo_offset,
                len: src.length(vsize.max(P)),
                placement: placement(src, rlen, true),
                perms: perms(src),
                allow_faults: flags & 3 != 0,
                shared: flags & 4 != 0,
            }
        }
        12..=14 => Op::Unmap { region, offset: src.offset(rlen), len: src.length(rlen) },
        15..=17 => Op::Protect { region, offset: src.offset(rlen), len: src.length(rlen), perms: perms(src) },
        18..=19 => Op::Allocate {
            region,
            placement: {
                let overwrite = src.byte() % 8 == 0;
                placement(src, rlen, overwrite)
            },
            len: src.length(rlen),
            may: may(src),
        },
        20 => Op::Destroy { region },
        21..=22 => Op::Fork { region },
        23..=24 => Op::Reset { region },
        25 => Op::SetResetPoint { region },
        26 => Op::Query { region, gpa: src.offset(ssize) },
        27..=29 => Op::Fault { region, gpa: src.offset(ssize), write: src.bool() },
        30..=35 => Op::GuestWrite {
            space,
            gpa: src.offset(ssize).min(ssize + 4 * P),
            len: src.io_len(),
            val: src.byte() | 1,
        },
        36..=39 => Op::GuestRead { space, gpa: src.offset(ssize).min(ssize + 4 * P), len: src.io_len() },
        40..=44 => Op::VmoWrite { v, offset: src.offset(vsize), len: src.io_len(), val: src.byte() | 1 },
        45..=47 => Op::VmoRead { v, offset: src.offset(vsize), len: src.io_len() },
        48..=50 => Op::Commit { v, offset: src.offset(vsize), len: src.length(vsize) },
        51..=54 => Op::Decommit { v, offset: src.offset(vsize), len: src.length(vsize) },
        55..=57 => {
            let size = vmo_size(src);
            let size = if size > 64 * P && size < 1 << 52 { 2 * P } else { size };
            Op::Resize { v, size }
        }
        58 => Op::DropSpace { space },
        _ => Op::GuestWrite { space, gpa: src.offset(ssize).min(ssize + 4 * P), len: 1, val: src.byte() | 1 },
    }
}
