//! `TableModel`: a host-side replica of the key-value store guest's hash table
//! (`guest/kvstore.rs`), used to check a guest's answers and to predict exactly which guest
//! pages a request stream writes.
//!
//! The replica follows the guest's algorithm step for step: the same hash, open addressing
//! with linear probing, tombstones reused by inserts, and the same checksum. So after the same
//! requests the model's `checksum` equals the guest's, and `written_pages` is the set of table
//! pages the guest stored to (the basis of the "a child's resident memory is only the pages it
//! wrote" check).
//!
//! Invariants: `slots.len()` is the guest's bucket count (a power of two); every method is
//! total (a full table answers `ST_FULL`, as the guest does).

use std::collections::BTreeSet;

use super::kvstore::{fill_value, BUCKET_SIZE, ST_FULL, ST_NOT_FOUND, ST_OK, VALUE_MAX};
use crate::vmm::x86_64::layout::DATA_GPA;
use ept::PAGE_SIZE;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Slot {
    Empty,
    Used { key: u64, val: Vec<u8> },
    Deleted,
}

/// The replica; see the module documentation.
#[derive(Clone, Debug)]
pub struct TableModel {
    slots: Vec<Slot>,
    mask: u64,
    live: u64,
    written: BTreeSet<u64>,
}

fn hash(key: u64) -> u64 {
    let h = key.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^ (h >> 32)
}

impl TableModel {
    /// An empty table of `buckets` buckets (a power of two, as the guest requires).
    pub fn new(buckets: u64) -> Self {
        let buckets = buckets.max(1).next_power_of_two();
        TableModel {
            slots: vec![Slot::Empty; buckets as usize],
            mask: buckets - 1,
            live: 0,
            written: BTreeSet::new(),
        }
    }

    fn idx(&self, i: u64) -> usize {
        (i & self.mask) as usize
    }

    fn touch(&mut self, idx: usize) {
        let gpa = DATA_GPA + idx as u64 * BUCKET_SIZE;
        self.written.insert(gpa / PAGE_SIZE * PAGE_SIZE);
    }

    fn find(&self, key: u64) -> Option<usize> {
        let h = hash(key);
        for i in 0..=self.mask {
            let idx = self.idx(h.wrapping_add(i));
            match &self.slots[idx] {
                Slot::Empty => return None,
                Slot::Used { key: k, .. } if *k == key => return Some(idx),
                _ => {}
            }
        }
        None
    }

    /// PUT (value truncated to `VALUE_MAX`, which the driver never exceeds).
    pub fn put(&mut self, key: u64, val: &[u8]) -> u64 {
        let val = val[..val.len().min(VALUE_MAX)].to_vec();
        if let Some(idx) = self.find(key) {
            self.slots[idx] = Slot::Used { key, val };
            self.touch(idx);
            return ST_OK;
        }
        let h = hash(key);
        for i in 0..=self.mask {
            let idx = self.idx(h.wrapping_add(i));
            if !matches!(self.slots[idx], Slot::Used { .. }) {
                self.slots[idx] = Slot::Used { key, val };
                self.live += 1;
                self.touch(idx);
                return ST_OK;
            }
        }
        ST_FULL
    }

    pub fn get(&self, key: u64) -> Option<&[u8]> {
        match &self.slots[self.find(key)?] {
            Slot::Used { val, .. } => Some(val),
            _ => None,
        }
    }

    /// DEL: `ST_OK` or `ST_NOT_FOUND`.
    pub fn delete(&mut self, key: u64) -> u64 {
        match self.find(key) {
            Some(idx) => {
                self.slots[idx] = Slot::Deleted;
                self.live -= 1;
                self.touch(idx);
                ST_OK
            }
            None => ST_NOT_FOUND,
        }
    }

    /// FILL: keys `first..first+count` with `fill_value`; returns the live count.
    pub fn fill(&mut self, first: u64, count: u64) -> u64 {
        for k in first..first.wrapping_add(count) {
            if self.put(k, &fill_value(k)) != ST_OK {
                break;
            }
        }
        self.live
    }

    pub fn count(&self) -> u64 {
        self.live
    }

    /// The guest's CHECKSUM of the same table.
    pub fn checksum(&self) -> u64 {
        let mut sum = 0u64;
        for s in &self.slots {
            if let Slot::Used { key, val } = s {
                let mut h = key.wrapping_mul(0x100_0000_01b3);
                for &b in val {
                    h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
                }
                sum = sum.wrapping_add(h);
            }
        }
        sum
    }

    /// Guest-physical pages of the table written since the last `clear_written`.
    pub fn written_pages(&self) -> &BTreeSet<u64> {
        &self.written
    }

    pub fn clear_written(&mut self) {
        self.written.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_delete_and_tombstone_reuse() {
        let mut m = TableModel::new(8);
        assert_eq!(m.put(1, b"a"), ST_OK);
        assert_eq!(m.get(1), Some(&b"a"[..]));
        assert_eq!(m.delete(1), ST_OK);
        assert_eq!(m.delete(1), ST_NOT_FOUND);
        assert_eq!(m.get(1), None);
        for k in 0..8 {
            assert_eq!(m.put(100 + k, b"x"), ST_OK);
        }
        assert_eq!(m.put(999, b"y"), ST_FULL);
        assert_eq!(m.count(), 8);
        assert_eq!(m.written_pages().len(), 1);
    }

    #[test]
    fn checksum_is_order_independent() {
        let mut a = TableModel::new(64);
        let mut b = TableModel::new(64);
        a.fill(0, 20);
        for k in (0..20).rev() {
            b.put(k, &fill_value(k));
        }
        assert_eq!(a.checksum(), b.checksum());
    }
}
