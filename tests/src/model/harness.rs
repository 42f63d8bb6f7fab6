//! `Harness`: runs decoded operations on real Vmars and Vmos (over any `Stage2`) and on the
//! `Reference` side by side, and checks them.
//!
//! After every operation the real result must equal the reference's (errors included, byte
//! contents for reads). Every `check_every` operations, and at the end, the full check runs:
//! `Vmar::check_invariants` on every space; every installed translation lies inside a mapping
//! (a translation outside one could reach a freed frame); a writable translation's frame is
//! translated (in any space) only through mappings of one Vmo and committed in no other Vmo
//! (two spaces mapping one Vmo share its frames legitimately; two Vmos never may); every mapping (query of
//! each page) and every Vmo's bytes equal the reference. `finish` drops everything and checks
//! that no frame (data or table) is left.
//!
//! Failure injection: when an operation meets an injected failure (an `Injector` fired) and
//! returns an error, the reference can no longer say what the state is — the harness goes
//! *unsynced* and from then on checks only what must hold whatever happened (invariants,
//! translations inside mappings, no writable shared frame, accounting at the end). An
//! operation that met a failure and still returned `Ok` must be exactly right.

use std::collections::BTreeMap;
use std::sync::Arc;

use ept::{Access, FaultInfo, FaultKind, HeapPhysMem, Stage2};
use vmo::{FramePool, MapOptions, Vmar, Vmo, VmoFlags, PAGE_SIZE};

use super::input::Source;
use super::ops::{decode, Choices, Op};
use super::reference::{MapReq, Reference};
use crate::inject::{pager_byte, FaultyPager, Injector, Plan};
use crate::SoftCpu;

const P: u64 = PAGE_SIZE;

/// Knobs of one run.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Size of every root, in pages.
    pub root_pages: u64,
    /// Full check every this many operations (1 = after every one).
    pub check_every: u64,
    /// Most operations `run` executes.
    pub max_ops: u64,
    /// Make every non-resizable new Vmo pager-backed (pager failure injection).
    pub pagers: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            root_pages: 48,
            check_every: 1,
            max_ops: 4096,
            pagers: false,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Per operation kind: (succeeded, failed).
    pub by_op: BTreeMap<&'static str, (u64, u64)>,
    pub ops: u64,
    pub errors: u64,
    pub full_checks: u64,
    /// Operations that met an injected failure.
    pub injected: u64,
    /// Whether the reference went out of sync (an operation failed by injection).
    pub unsynced: bool,
}

/// Where the harness's objects come from.
pub struct Setup<S: Stage2 + Send + 'static> {
    pub pool: FramePool,
    /// Table frames of every `Stage2` the factory makes (checked to be 0 at the end).
    pub phys: Option<Arc<HeapPhysMem>>,
    pub new_stage2: Box<dyn Fn() -> S>,
    /// Shared by the pagers of pager-backed Vmos.
    pub pager_injector: Arc<Injector>,
    /// Every injector in play (their `fired` counts tell whether an operation met one).
    pub injectors: Vec<Arc<Injector>>,
}

impl<S: Stage2 + Send + 'static> Setup<S> {
    /// No injection: a heap pool, and tables over one shared `HeapPhysMem`.
    pub fn plain(new_table: fn(Arc<HeapPhysMem>) -> S) -> Self {
        let phys = Arc::new(HeapPhysMem::with_capacity(1 << 14));
        let p = phys.clone();
        Setup {
            pool: FramePool::heap(),
            phys: Some(phys),
            new_stage2: Box::new(move || new_table(p.clone())),
            pager_injector: Injector::new(Plan::Never),
            injectors: Vec::new(),
        }
    }
}

pub struct Harness<S: Stage2 + Send + 'static> {
    pub(super) setup: Setup<S>,
    pub(super) opts: Options,
    pub(super) model: Reference,
    pub(super) vmars: Vec<Option<Vmar<S>>>,
    pub(super) vmos: Vec<Option<Vmo>>,
    pub(super) synced: bool,
    pub stats: Stats,
    seed: u8,
}

fn fired<S: Stage2 + Send + 'static>(setup: &Setup<S>) -> u64 {
    setup.injectors.iter().map(|i| i.fired()).sum()
}

impl<S: Stage2 + Send + 'static> Harness<S> {
    pub fn new(setup: Setup<S>, opts: Options) -> Self {
        let mut h = Harness {
            setup,
            opts,
            model: Reference::default(),
            vmars: Vec::new(),
            vmos: Vec::new(),
            synced: true,
            stats: Stats::default(),
            seed: 0,
        };
        h.new_space();
        h
    }

    fn new_space(&mut self) {
        let size = self.opts.root_pages * P;
        let root = Vmar::new_root(size, (self.setup.new_stage2)()).expect("an empty root");
        let space = self.model.new_space(size);
        let r = self.model.spaces[space].root;
        self.vmars.resize_with(self.model.regions.len(), || None);
        self.vmars[r] = Some(root);
    }

    /// Runs operations from `src` until it is exhausted or `max_ops` ran.
    pub fn run(&mut self, src: &mut dyn Source) {
        while !src.exhausted() && self.stats.ops < self.opts.max_ops {
            self.step(src);
        }
        self.full_check("end of run");
    }

    /// Decodes and runs one operation, then checks.
    pub fn step(&mut self, src: &mut dyn Source) {
        if !self.model.spaces.iter().any(|s| !s.dropped) {
            self.new_space();
        }
        let regions: Vec<(usize, u64)> = (0..self.vmars.len())
            .filter(|&i| self.vmars[i].is_some())
            .map(|i| (i, self.model.regions[i].len))
            .collect();
        let spaces: Vec<(usize, u64)> = (0..self.model.spaces.len())
            .filter(|&s| !self.model.spaces[s].dropped)
            .map(|s| (s, self.model.spaces[s].size))
            .collect();
        let vmos: Vec<(usize, u64)> = (0..self.vmos.len())
            .filter_map(|i| Some((i, self.vmos[i].as_ref()?.size())))
            .collect();
        let mut mapped = Vec::new();
        for &(space, _) in &spaces {
            let root = self.model.spaces[space].root;
            for (b, m) in &self.model.spaces[space].mappings {
                mapped.push((root, space, *b, m.len));
            }
        }
        let choices = Choices {
            regions: &regions,
            spaces: &spaces,
            vmos: &vmos,
            mapped: &mapped,
        };
        let op = decode(src, &choices);
        let before = fired(&self.setup);
        let ok = self.apply(&op, before);
        self.stats.ops += 1;
        let e = self.stats.by_op.entry(op.name()).or_default();
        if ok {
            e.0 += 1;
        } else {
            e.1 += 1;
            self.stats.errors += 1;
        }
        if self.stats.ops.is_multiple_of(self.opts.check_every) {
            self.full_check(&format!("after op {}: {op:?}", self.stats.ops));
        }
    }

    /// Compares a real result with the reference's; goes unsynced instead when the operation
    /// met an injected failure and failed. Returns whether the real operation succeeded.
    fn agree<T: PartialEq + std::fmt::Debug>(
        &mut self,
        op: &Op,
        before: u64,
        real: &Result<T, vmo::Error>,
        model: impl FnOnce(&mut Reference) -> Result<T, vmo::Error>,
    ) -> bool {
        let met = fired(&self.setup) > before;
        if met {
            self.stats.injected += 1;
        }
        if !self.synced {
            return real.is_ok();
        }
        if met && real.is_err() {
            self.synced = false;
            self.stats.unsynced = true;
            return false;
        }
        let want = model(&mut self.model);
        if *real != want {
            panic!(
                "op {} {op:?}: got {real:?}, the reference says {want:?} (injected: {met})",
                self.stats.ops
            );
        }
        real.is_ok()
    }

    fn region(&self, r: usize) -> &Vmar<S> {
        self.vmars[r]
            .as_ref()
            .expect("decoded from regions with handles")
    }

    pub(super) fn root(&self, space: usize) -> &Vmar<S> {
        self.region(self.model.spaces[space].root)
    }

    fn vmo(&self, v: usize) -> &Vmo {
        self.vmos[v]
            .as_ref()
            .expect("decoded from Vmos with handles")
    }

    fn apply(&mut self, op: &Op, before: u64) -> bool {
        match *op {
            Op::NewVmo {
                size,
                resizable,
                pager,
            } => {
                let pager = pager || (self.opts.pagers && !resizable);
                let flags = if resizable {
                    VmoFlags::RESIZABLE
                } else {
                    VmoFlags::empty()
                };
                let real = if pager {
                    self.seed = self.seed.wrapping_add(1);
                    let p = Arc::new(FaultyPager::new(
                        self.seed,
                        self.setup.pager_injector.clone(),
                    ));
                    Vmo::new_paged(&self.setup.pool, size, flags, p)
                } else {
                    Vmo::new(&self.setup.pool, size, flags)
                };
                let want = super::reference::page_round_up(size);
                match (real, want) {
                    (Ok(vmo), Ok(rounded)) => {
                        let seed = self.seed;
                        let data = (0..rounded)
                            .map(|i| {
                                if pager {
                                    pager_byte(seed, i / P, (i % P) as usize)
                                } else {
                                    0
                                }
                            })
                            .collect();
                        let id = self.model.new_vmo(data, resizable, pager);
                        self.vmos.resize_with(id + 1, || None);
                        self.vmos[id] = Some(vmo);
                        true
                    }
                    (Err(a), Err(b)) if a == b => false,
                    (real, want) => panic!("{op:?}: got {:?}, want {want:?}", real.map(drop)),
                }
            }
            Op::DropVmo { v } => {
                self.vmos[v] = None;
                true
            }
            Op::DropSpace { space } => {
                for (i, r) in self.model.regions.iter().enumerate() {
                    if r.space == space {
                        self.vmars[i] = None;
                    }
                }
                self.model.drop_space(space);
                true
            }
            Op::Map {
                region,
                vmo,
                vmo_offset,
                len,
                placement,
                perms,
                allow_faults,
                shared,
            } => {
                // Pager Vmos stay shared across forks: a pager child is SnapshotAtLeastOnWrite,
                // which may see later parent writes — not a deterministic reference.
                let shared = shared || self.model.vmos[vmo].pager;
                let opts = MapOptions {
                    placement,
                    perms,
                    allow_faults,
                    shared,
                };
                let real = self
                    .region(region)
                    .map(self.vmo(vmo), vmo_offset, len, opts);
                let q = MapReq {
                    region,
                    vmo,
                    vmo_offset,
                    len,
                    placement,
                    perms,
                    allow_faults,
                    shared,
                };
                self.agree(op, before, &real, |m| m.map(&q))
            }
            Op::Unmap {
                region,
                offset,
                len,
            } => {
                let real = self.region(region).unmap(offset, len);
                self.agree(op, before, &real, |m| m.unmap(region, offset, len))
            }
            Op::Protect {
                region,
                offset,
                len,
                perms,
            } => {
                let real = self.region(region).protect(offset, len, perms);
                self.agree(op, before, &real, |m| m.protect(region, offset, len, perms))
            }
            Op::Allocate {
                region,
                placement,
                len,
                may,
            } => {
                let real = self.region(region).allocate(placement, len, may);
                let real_id = real.as_ref().map(|_| ()).map_err(|e| *e);
                let n = self.model.regions.len();
                let ok = self.agree(op, before, &real_id, |m| {
                    m.allocate(region, placement, len, may).map(drop)
                });
                if let Ok(sub) = real {
                    if self.synced {
                        assert_eq!(self.model.regions.len(), n + 1);
                        self.vmars.resize_with(n + 1, || None);
                        self.vmars[n] = Some(sub);
                    }
                    // Unsynced: the handle is dropped (the reference has no index for it).
                }
                ok
            }
            Op::Destroy { region } => {
                let real = self.region(region).destroy();
                self.agree(op, before, &real, |m| m.destroy(region))
            }
            Op::Fork { region } => {
                let real = self.region(region).fork((self.setup.new_stage2)());
                let real_unit = real.as_ref().map(|_| ()).map_err(|e| *e);
                let mut forked = None;
                let ok = self.agree(op, before, &real_unit, |m| {
                    m.fork(region).map(|f| {
                        forked = Some(f);
                    })
                });
                if let (Ok(child), Some((space, new_vmos))) = (real, forked) {
                    self.vmars.resize_with(self.model.regions.len(), || None);
                    self.vmars[self.model.spaces[space].root] = Some(child);
                    self.vmos.resize_with(self.model.vmos.len(), || None);
                    for (v, base) in new_vmos {
                        let info = self.root(space).query(base).expect("forked mapping");
                        self.vmos[v] = Some(info.vmo);
                    }
                }
                ok
            }
            Op::Reset { region } => {
                let real = self.region(region).reset().map(drop);
                self.agree(op, before, &real, |m| m.reset(region))
            }
            Op::SetResetPoint { region } => {
                let real = self.region(region).set_reset_point();
                self.agree(op, before, &real, |m| m.set_reset_point(region))
            }
            Op::Query { region, gpa } => {
                let real = self.region(region).query(gpa).map(|i| {
                    (
                        i.base,
                        i.len,
                        i.vmo_offset,
                        i.perms,
                        i.shared,
                        i.allow_faults,
                    )
                });
                self.agree(op, before, &real, |m| {
                    m.query(region, gpa)
                        .map(|(b, r)| (b, r.len, r.vmo_offset, r.perms, r.shared, r.allow_faults))
                })
            }
            Op::Fault { region, gpa, write } => {
                let access = if write { Access::WRITE } else { Access::READ };
                let kind = match self.region(region).with_stage2(|s| s.query(gpa & !(P - 1))) {
                    Some(_) => FaultKind::Permission,
                    None => FaultKind::NotPresent,
                };
                let real = self
                    .region(region)
                    .handle_fault(FaultInfo::new(gpa, access, kind))
                    .map(drop);
                self.agree(op, before, &real, |m| m.fault(region, gpa, write).map(drop))
            }
            Op::GuestWrite {
                space,
                gpa,
                len,
                val,
            } => self.guest(op, before, space, gpa, len, Some(val)),
            Op::GuestRead { space, gpa, len } => self.guest(op, before, space, gpa, len, None),
            Op::VmoWrite {
                v,
                offset,
                len,
                val,
            } => {
                let data = vec![val; len];
                let real = self.vmo(v).write(offset, &data);
                self.agree(op, before, &real, |m| m.vmo_write(v, offset, &data))
            }
            Op::VmoRead { v, offset, len } => {
                let mut buf = vec![0u8; len];
                let real = self.vmo(v).read(offset, &mut buf).map(|()| buf);
                self.agree(op, before, &real, |m| m.vmo_read(v, offset, len))
            }
            Op::Commit { v, offset, len } => {
                let real = self.vmo(v).commit(offset, len);
                self.agree(op, before, &real, |m| m.commit(v, offset, len))
            }
            Op::Decommit { v, offset, len } => {
                let real = self.vmo(v).decommit(offset, len);
                self.agree(op, before, &real, |m| m.decommit(v, offset, len))
            }
            Op::Resize { v, size } => {
                let real = self.vmo(v).resize(size);
                self.agree(op, before, &real, |m| m.resize(v, size))
            }
        }
    }

    /// A guest access through the space's root, chunk by chunk (one page each) as `SoftCpu`
    /// does: the reference applies chunks until the first that faults with an error.
    fn guest(
        &mut self,
        op: &Op,
        before: u64,
        space: usize,
        gpa: u64,
        len: usize,
        val: Option<u8>,
    ) -> bool {
        let root_idx = self.model.spaces[space].root;
        let root = self.root(space).clone();
        let pool = self.setup.pool.clone();
        let mut cpu = SoftCpu::plain(&root, &pool);
        let real = match val {
            Some(v) => cpu.write(gpa, &vec![v; len]).map(|()| Vec::new()),
            None => {
                let mut buf = vec![0u8; len];
                cpu.read(gpa, &mut buf).map(|()| buf)
            }
        };
        let real = real.map_err(|f| (f.gpa, f.error));
        let met = fired(&self.setup) > before;
        if met {
            self.stats.injected += 1;
        }
        if !self.synced {
            return real.is_ok();
        }
        if met && real.is_err() {
            self.synced = false;
            self.stats.unsynced = true;
            return false;
        }
        let mut out = Vec::new();
        let mut want = Ok(());
        let mut done = 0usize;
        while done < len {
            let at = gpa + done as u64;
            let n = ((P - (at % P)) as usize).min(len - done);
            match self.model.fault(root_idx, at, val.is_some()) {
                Ok((v, off)) => {
                    let d = &mut self.model.vmos[v].data;
                    match val {
                        Some(b) => d[off as usize..off as usize + n].fill(b),
                        None => out.extend_from_slice(&d[off as usize..off as usize + n]),
                    }
                }
                Err(e) => {
                    want = Err((at, e));
                    break;
                }
            }
            done += n;
        }
        let want = want.map(|()| out);
        if real != want {
            panic!(
                "op {} {op:?}: got {real:?}, the reference says {want:?} (injected: {met})",
                self.stats.ops
            );
        }
        real.is_ok()
    }

    /// Drops every handle (so every space, mapping and Vmo) and checks that no frame is left:
    /// data frames in the pool, table frames in the `HeapPhysMem`.
    pub fn finish(mut self) -> Stats {
        self.full_check("before teardown");
        let stats = self.stats.clone();
        let Harness {
            setup, vmars, vmos, ..
        } = self;
        drop(vmars);
        drop(vmos);
        let s = setup.pool.stats();
        assert_eq!(s.live, 0, "frames left after teardown: {s:?}");
        assert_eq!(s.allocated, s.freed);
        if let Some(phys) = &setup.phys {
            assert_eq!(phys.live_frames(), 0, "table frames left after teardown");
            assert_eq!(phys.bad_frees(), 0);
        }
        stats
    }
}
