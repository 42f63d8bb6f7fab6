//! The full check of a `Harness` (see `harness.rs`): invariants of every space, every
//! translation inside a mapping, no writable translation to a frame of two Vmos, and — while
//! the reference is in sync — every mapping and every Vmo's bytes equal to the reference's.
//! Injected failures are paused while it runs (its own reads commit pager pages).

use std::collections::BTreeMap;

use ept::{S2Perms, Stage2};
use vmo::{Rights, Vmo, PAGE_SIZE};

use super::harness::Harness;

const P: u64 = PAGE_SIZE;

impl<S: Stage2 + Send + 'static> Harness<S> {
    /// The full check (see the module doc); `when` names the point for the failure message.
    pub fn full_check(&mut self, when: &str) {
        // The check's own reads (which commit pager pages) must not meet injected failures.
        for i in &self.setup.injectors {
            i.pause(true);
        }
        self.check_now(when);
        for i in &self.setup.injectors {
            i.pause(false);
        }
    }

    fn check_now(&mut self, when: &str) {
        self.stats.full_checks += 1;
        let mut translated: BTreeMap<u64, Vec<Vmo>> = BTreeMap::new();
        let mut writable: Vec<(usize, u64, u64)> = Vec::new();
        for space in 0..self.model.spaces.len() {
            if self.model.spaces[space].dropped {
                continue;
            }
            let root = self.root(space).clone();
            let root_idx = self.model.spaces[space].root;
            if let Err(e) = root.check_invariants() {
                panic!("{when}: space {space}: {e}");
            }
            for gpa in (0..self.model.spaces[space].size).step_by(P as usize) {
                let t = root.with_stage2(|s| s.query(gpa));
                let real = root.query(gpa);
                if self.synced {
                    let got = real
                        .as_ref()
                        .map(|i| (i.base, i.len, i.vmo_offset, i.perms, i.shared))
                        .map_err(|e| *e);
                    let want = self
                        .model
                        .query(root_idx, gpa)
                        .map(|(b, m)| (b, m.len, m.vmo_offset, m.perms, m.shared));
                    assert_eq!(got, want, "{when}: space {space}: mapping at {gpa:#x}");
                }
                let Some(t) = t else { continue };
                let Ok(info) = real else {
                    panic!(
                        "{when}: space {space}: {gpa:#x} translated to {:#x} outside every mapping",
                        t.pa_of(gpa)
                    );
                };
                let by = translated.entry(t.pa_of(gpa)).or_default();
                if !by.iter().any(|v| v.same_object(&info.vmo)) {
                    by.push(info.vmo.clone());
                }
                if t.perms.contains(S2Perms::WRITE) {
                    writable.push((space, gpa, t.pa_of(gpa)));
                }
            }
        }
        // Which Vmo objects commit each frame (reachable through handles and mappings).
        let mut holders: BTreeMap<u64, Vec<Vmo>> = BTreeMap::new();
        let mut reachable: Vec<Vmo> = self.vmos.iter().flatten().cloned().collect();
        for space in 0..self.model.spaces.len() {
            if self.model.spaces[space].dropped {
                continue;
            }
            let root = self.root(space).clone();
            for gpa in (0..self.model.spaces[space].size).step_by(P as usize) {
                if let Ok(i) = root.query(gpa) {
                    if !reachable.iter().any(|v| v.same_object(&i.vmo)) {
                        reachable.push(i.vmo);
                    }
                }
            }
        }
        for v in &reachable {
            let Some(v) = (v.rights().contains(Rights::READ)).then_some(v) else {
                continue;
            };
            for off in (0..v.size()).step_by(P as usize) {
                if let Ok(Some(f)) = v.committed_frame(off) {
                    let hs = holders.entry(f.paddr()).or_default();
                    if !hs.iter().any(|h| h.same_object(v)) {
                        hs.push(v.clone());
                    }
                }
            }
        }
        for (space, gpa, pa) in writable {
            let by = translated[&pa].len();
            assert!(by == 1, "{when}: space {space}: writable {gpa:#x} → {pa:#x} is translated through {by} Vmos");
            let n = holders.get(&pa).map_or(0, |h| h.len());
            assert!(
                n <= 1,
                "{when}: space {space}: writable {gpa:#x} → {pa:#x} is committed in {n} Vmos"
            );
        }
        if !self.synced {
            return;
        }
        for (v, h) in self.vmos.iter().enumerate() {
            let Some(h) = h else { continue };
            let want = &self.model.vmos[v].data;
            assert_eq!(h.size(), want.len() as u64, "{when}: size of Vmo {v}");
            if h.rights().contains(Rights::READ) {
                let mut buf = vec![0u8; want.len()];
                h.read(0, &mut buf).unwrap();
                if buf != *want {
                    let at = buf.iter().zip(want).position(|(a, b)| a != b).unwrap();
                    panic!(
                        "{when}: Vmo {v} differs at byte {at:#x}: {} != {}",
                        buf[at], want[at]
                    );
                }
            }
        }
        // Vmos without a handle, through their mappings.
        for space in 0..self.model.spaces.len() {
            if self.model.spaces[space].dropped {
                continue;
            }
            let root = self.root(space).clone();
            let maps: Vec<(u64, usize, u64, u64)> = self.model.spaces[space]
                .mappings
                .iter()
                .map(|(b, m)| (*b, m.vmo, m.vmo_offset, m.len))
                .collect();
            for (base, v, off, len) in maps {
                if self.vmos.get(v).is_some_and(|h| h.is_some()) {
                    continue;
                }
                let info = root.query(base).unwrap();
                let want = &self.model.vmos[v].data;
                let end = (off + len).min(want.len() as u64);
                if off >= end {
                    continue;
                }
                let mut buf = vec![0u8; (end - off) as usize];
                info.vmo.read(off, &mut buf).unwrap();
                assert!(
                    buf == want[off as usize..end as usize],
                    "{when}: Vmo {v} (mapped at {base:#x}) differs"
                );
            }
        }
    }
}
