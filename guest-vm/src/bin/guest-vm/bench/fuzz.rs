//! The fuzzing rows of `guest-vm bench --groups fuzz` (issue 15): the same target code, the
//! same mutator and the same input sequence for every executor.
//!
//! Each target of `TARGETS` (its guest ELF, built by build.rs with SanitizerCoverage, and the
//! same `guest/targets/NAME.rs` compiled natively into this binary with `#[path]`) is fed a
//! fixed sequence of `INPUTS` inputs, generated once from the target's seed by LibAFL's havoc +
//! token mutator with a fixed seed. Per input:
//! - ours: `GuestExecutor::run_target` (run in the forked child, coverage read, reset);
//! - baseline: LibAFL's `InProcessForkExecutor` on the native code (a fork of this process per
//!   input: process isolation), and `InProcessExecutor` (no isolation, the ceiling) as the
//!   `-inprocess` row. The native harness is built without SanitizerCoverage (no observer): it
//!   does less work per input than ours, so the comparison is conservative;
//! - for `http` and `warm`, a third baseline, the `-aflpp` row (`fuzz-execs-parser-aflpp`,
//!   `fuzz-execs-warm-aflpp`): AFL++'s `afl-fuzz` on a native build of the same code with
//!   trace-pc-guard edges, in its deferred fork-server mode (a fork per input of a process past
//!   `setup()`), for `AFLPP_SECS_PER_REP` × reps seconds (module `aflpp`). Ours is the
//!   `fuzz-execs-*` row's figure; AFL++ mutates with its own mutator from the same seed, so its
//!   inputs are not the fixed sequence.
//!
//! Also: `fuzz-reset-share` (reset time ÷ per-input time of ours, in `ratio`) and
//! `fuzz-cores-2` (two executors on two threads over the sequence, aggregate time per input,
//! vs one — the executor scaling a 2-client Launcher gets, without LLMP), for the first target.
//! The `fuzz-crash` group: `fuzz-find-crash-NAME` (LibAFL fuzzing each target's guest from its
//! seed until the planted crash, median of 5 seeds; reported, no baseline).
//!
//! Invariants: the native rows run after the guest's are dropped (no guest memory in the
//! forked process); a target whose planted bug an input triggers is a crash in every executor
//! alike; every pass runs the whole sequence.

use std::time::{Duration, Instant};

use guest_vm::guest::fuzz::{self, GuestExecutor, SessionOptions};
use guest_vm::guest::program::{Outcome, Program};
use guest_vm::{Error, HostFrames, Result};
use libafl::corpus::{Corpus, InMemoryCorpus, Testcase};
use libafl::events::{NopEventManager, SimpleEventManager};
use libafl::executors::{Executor, ExitKind, InProcessExecutor, InProcessForkExecutor};
use libafl::feedbacks::{ConstFeedback, CrashFeedback};
use libafl::inputs::BytesInput;
use libafl::monitors::SimpleMonitor;
use libafl::mutators::{havoc_mutations, tokens_mutations, HavocScheduledMutator, Mutator};
use libafl::schedulers::QueueScheduler;
use libafl::state::{HasCorpus, HasMaxSize, StdState};
use libafl::StdFuzzer;
use libafl_bolts::rands::StdRand;
use libafl_bolts::shmem::{ShMemProvider, StdShMemProvider};
use libafl_bolts::tuples::Merge;

use super::{aflpp, progress, row, BenchOptions, Row};
use crate::measure::{median, us};

#[path = "../../../../guest/targets/http.rs"]
mod http;
#[path = "../../../../guest/targets/kv.rs"]
mod kv;
#[path = "../../../../guest/targets/warm.rs"]
mod warm;

/// Inputs in the fixed sequence.
const INPUTS: usize = 1000;
/// Seed of the mutator that generates it.
const SEQUENCE_SEED: u64 = 0x15;
/// Longest generated input.
const MAX_LEN: usize = 1024;
/// Time limit per input (guest and fork executor).
const LIMIT: Duration = Duration::from_secs(2);
/// Seeds of the time-to-crash row.
const CRASH_SEEDS: [u64; 5] = [1, 2, 3, 4, 5];
/// Upper bound of one time-to-crash run.
const CRASH_LIMIT: Duration = Duration::from_secs(300);
/// Seconds of the AFL++ run per repetition (one run of `reps` × this).
const AFLPP_SECS_PER_REP: u64 = 3;

/// The native build of a target: `setup` once, then one call per input (`true` = the planted
/// bug).
type Native = fn() -> Box<dyn Fn(&[u8]) -> bool>;

/// A target module's native harness (the `guest/targets` interface).
macro_rules! native {
    ($m:ident) => {
        || {
            let state = $m::setup();
            Box::new(move |input: &[u8]| $m::run(&state, input).is_err())
        }
    };
}

/// One fuzz target of the bench.
struct Target {
    name: &'static str,
    /// Id of its executor row (`-inprocess` is appended for the ceiling row).
    row: &'static str,
    elf: &'static [u8],
    mem_mib: u64,
    seed: &'static [u8],
    native: Native,
    /// The AFL++ baseline: its row id and the harness build.rs built (`OUT_DIR/aflpp-NAME`).
    aflpp: Option<(&'static str, &'static str)>,
}

/// The targets: `kv` (our small record parser; the first target also gets the reset-share,
/// cores and time-to-crash rows), `http` (httparse from crates.io: the "real parser"
/// row) and `warm` (64 MiB built before `snapshot_here`: where a fork per input is dear).
const TARGETS: &[Target] = &[
    Target {
        name: "kv",
        row: "fuzz-execs-kv",
        elf: include_bytes!(concat!(env!("OUT_DIR"), "/kv.elf")),
        mem_mib: 4,
        seed: b"a=1;",
        native: native!(kv),
        aflpp: None,
    },
    Target {
        name: "http",
        row: "fuzz-execs-parser",
        elf: include_bytes!(concat!(env!("OUT_DIR"), "/http.elf")),
        mem_mib: 4,
        seed: b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        native: native!(http),
        aflpp: Some((
            "fuzz-execs-parser-aflpp",
            concat!(env!("OUT_DIR"), "/aflpp-http"),
        )),
    },
    Target {
        name: "warm",
        row: "fuzz-execs-warm",
        elf: include_bytes!(concat!(env!("OUT_DIR"), "/warm.elf")),
        mem_mib: 128,
        seed: b"1 2 #ff",
        native: native!(warm),
        aflpp: Some((
            "fuzz-execs-warm-aflpp",
            concat!(env!("OUT_DIR"), "/aflpp-warm"),
        )),
    },
];

type BenchState =
    StdState<InMemoryCorpus<BytesInput>, BytesInput, StdRand, InMemoryCorpus<BytesInput>>;

fn afl(what: &str) -> impl Fn(libafl::Error) -> Error + '_ {
    move |e| Error::BadState(format!("fuzz bench, {what}: {e}"))
}

/// A state holding `seed` as its one corpus entry.
fn bench_state(seed: &[u8]) -> Result<BenchState> {
    let mut state = StdState::new(
        StdRand::with_seed(SEQUENCE_SEED),
        InMemoryCorpus::new(),
        InMemoryCorpus::new(),
        &mut ConstFeedback::new(false),
        &mut CrashFeedback::new(),
    )
    .map_err(afl("state"))?;
    state.set_max_size(MAX_LEN);
    state
        .corpus_mut()
        .add(Testcase::new(BytesInput::new(seed.to_vec())))
        .map_err(afl("corpus"))?;
    Ok(state)
}

/// The fixed input sequence: `INPUTS` havoc + token mutations of `seed`.
fn sequence(state: &mut BenchState, seed: &[u8]) -> Result<Vec<BytesInput>> {
    let mut mutator = HavocScheduledMutator::new(havoc_mutations().merge(tokens_mutations()));
    let mut out = Vec::with_capacity(INPUTS);
    for _ in 0..INPUTS {
        let mut i = BytesInput::new(seed.to_vec());
        mutator.mutate(state, &mut i).map_err(afl("mutate"))?;
        out.push(i);
    }
    Ok(out)
}

/// A parent at its `snapshot_here`.
fn boot(frames: &HostFrames, t: &Target) -> Result<Program> {
    let mut parent = Program::load(frames, t.elf, t.mem_mib << 20)?;
    match parent.run(Duration::from_secs(60))? {
        Outcome::SnapshotHere => Ok(parent),
        other => Err(Error::BadState(format!(
            "fuzz target {} did not reach snapshot_here: {other}",
            t.name
        ))),
    }
}

/// Times passes of `one` over `inputs` (one untimed warm-up pass first): per-input µs of each.
fn passes(
    reps: usize,
    inputs: &[BytesInput],
    mut one: impl FnMut(&BytesInput) -> Result<ExitKind>,
) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for rep in 0..=reps {
        let t = Instant::now();
        for i in inputs {
            one(i)?;
        }
        if rep > 0 {
            out.push(us(t.elapsed()) / inputs.len() as f64);
        }
    }
    Ok(out)
}

/// Wall µs per input of `clients` executors on their own threads, each over `inputs`.
fn threaded(parent: &Program, clients: usize, inputs: &[BytesInput]) -> Result<f64> {
    let snap = parent.snapshot()?;
    let mut children = Vec::new();
    for _ in 0..clients {
        children.push(parent.fork(&snap)?);
    }
    let start = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = children
            .into_iter()
            .map(|child| {
                let snap = snap.clone();
                s.spawn(move || -> Result<()> {
                    let mut ex = GuestExecutor::from_child(child, snap, LIMIT)?;
                    for i in inputs {
                        ex.exec(i.as_ref())?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| Error::BadState("fuzz bench client thread panicked".into()))??;
        }
        Ok::<_, Error>(())
    })?;
    Ok(us(start.elapsed()) / (clients * inputs.len()) as f64)
}

/// The planted-crash row: LibAFL fuzzing `t` from its seed until the first solution, per seed:
/// the seconds to it (`None`: not within `CRASH_LIMIT`) and the inputs run.
fn find_crash(parent: &Program, t: &Target) -> Result<(Vec<Option<f64>>, Vec<u64>)> {
    let (mut secs, mut execs) = (Vec::new(), Vec::new());
    for seed in CRASH_SEEDS {
        let dir = std::env::temp_dir().join(format!(
            "guest-vm-bench-fuzz-{}-{}-{seed}",
            std::process::id(),
            t.name
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let corpus = dir.join("corpus");
        std::fs::create_dir_all(&corpus)
            .and_then(|()| std::fs::write(corpus.join("seed"), t.seed))
            .map_err(|e| Error::BadState(format!("fuzz bench scratch {}: {e}", dir.display())))?;
        let opts = SessionOptions {
            corpus,
            crashes: dir.join("crashes"),
            time: CRASH_LIMIT,
            max_len: MAX_LEN,
            until_crash: true,
            seed,
        };
        let mut ex = GuestExecutor::new(parent, LIMIT)?;
        let mut mgr = SimpleEventManager::new(SimpleMonitor::new(|_| {}));
        let (_, r) = fuzz::fuzz(&mut ex, None, &mut mgr, &opts)?;
        let _ = std::fs::remove_dir_all(&dir);
        match r.first_solution_s {
            Some(s) => progress(&format!(
                "fuzz: seed {seed} found the crash in {s:.1} s ({} inputs)",
                r.execs
            )),
            None => progress(&format!(
                "fuzz: seed {seed} found no crash of {} in {} s ({} inputs)",
                t.name,
                CRASH_LIMIT.as_secs(),
                r.execs
            )),
        }
        secs.push(r.first_solution_s);
        execs.push(r.execs);
    }
    Ok((secs, execs))
}

fn target_rows(o: &BenchOptions, t: &Target, rows: &mut Vec<Row>, first: bool) -> Result<()> {
    let mut state = bench_state(t.seed)?;
    let inputs = sequence(&mut state, t.seed)?;
    let frames = HostFrames::new((t.mem_mib << 20) * 6)?;
    let parent = boot(&frames, t)?;

    progress(&format!(
        "fuzz: {} inputs of {} in a guest, reset per input",
        INPUTS, t.name
    ));
    let mut fuzzer = StdFuzzer::new(
        QueueScheduler::new(),
        ConstFeedback::new(false),
        CrashFeedback::new(),
    );
    let mut mgr = NopEventManager::new();
    let mut ex = GuestExecutor::new(&parent, LIMIT)?;
    let before = ex.stats().clone();
    let ours = passes(o.reps, &inputs, |i| {
        ex.run_target(&mut fuzzer, &mut state, &mut mgr, i)
            .map_err(afl("guest executor"))
    })?;
    let s = ex.stats();
    let execs = (s.execs - before.execs).max(1) as f64;
    let reset_per = (s.reset_s - before.reset_s) * 1e6 / execs;
    let total_per = (s.run_s - before.run_s) * 1e6 / execs + reset_per;
    drop(ex);
    let ours_us = median(&ours);

    let cores = if first {
        progress(&format!("fuzz: {} on 1 and 2 client threads", t.name));
        let (mut one, mut two) = (Vec::new(), Vec::new());
        for _ in 0..o.reps {
            one.push(threaded(&parent, 1, &inputs)?);
            two.push(threaded(&parent, 2, &inputs)?);
        }
        Some((median(&one), median(&two)))
    } else {
        None
    };
    drop(parent);
    drop(frames);

    progress("fuzz: the same inputs natively, fork per input and in process");
    let harness = (t.native)();
    let mut run = |i: &BytesInput| {
        if harness(i.as_ref()) {
            ExitKind::Crash
        } else {
            ExitKind::Ok
        }
    };
    let shmem = StdShMemProvider::new().map_err(afl("shared memory"))?;
    let mut forker = InProcessForkExecutor::new(
        &mut run,
        (),
        &mut fuzzer,
        &mut state,
        &mut mgr,
        LIMIT,
        shmem,
    )
    .map_err(afl("fork executor"))?;
    let fork = passes(o.reps, &inputs, |i| {
        forker
            .run_target(&mut fuzzer, &mut state, &mut mgr, i)
            .map_err(afl("fork executor"))
    })?;
    let mut inproc = InProcessExecutor::builder()
        .harness(&mut run)
        .observers(())
        .fuzzer(&mut fuzzer)
        .state(&mut state)
        .event_mgr(&mut mgr)
        .timeout(LIMIT)
        .build()
        .map_err(afl("in-process executor"))?;
    let ceiling = passes(o.reps, &inputs, |i| {
        inproc
            .run_target(&mut fuzzer, &mut state, &mut mgr, i)
            .map_err(afl("in-process executor"))
    })?;

    let what = format!(
        "fuzz executor, {} target, per input ({INPUTS} havoc inputs)",
        t.name
    );
    let guest = "guest run + coverage read + reset (GuestExecutor)";
    rows.push(row(
        t.row,
        what.clone(),
        guest,
        ours_us,
        "LibAFL InProcessForkExecutor, native (fork per input)",
        median(&fork),
    ));
    rows.push(row(
        format!("{}-inprocess", t.row),
        what,
        guest,
        ours_us,
        "LibAFL InProcessExecutor, native (no isolation)",
        median(&ceiling),
    ));
    if let Some((id, harness)) = t.aflpp {
        let secs = AFLPP_SECS_PER_REP * o.reps as u64;
        progress(&format!(
            "fuzz: AFL++ afl-fuzz on native {} for {secs} s",
            t.name
        ));
        let r = aflpp::run(t.name, std::path::Path::new(harness), t.seed, secs, LIMIT)?;
        rows.push(row(
            id,
            format!(
                "fuzz executor, {} target, per input (ours: {INPUTS} havoc inputs; AFL++: its \
                 own mutations of the same seed, {} inputs in {secs} s)",
                t.name, r.execs
            ),
            guest,
            ours_us,
            "AFL++ 4.04c afl-fuzz, native, deferred fork server after setup (fork per input)",
            r.us_per_exec,
        ));
    }
    if let Some((one, two)) = cores {
        rows.push(row(
            "fuzz-reset-share",
            format!(
                "share of per-input time in reset, {} target (ratio)",
                t.name
            ),
            "reset per input",
            reset_per,
            "run + reset per input",
            total_per,
        ));
        rows.push(row(
            "fuzz-cores-2",
            format!(
                "time per input, 2 clients aggregate vs 1, {} target",
                t.name
            ),
            "2 executor threads, wall / inputs",
            two,
            "1 executor thread",
            one,
        ));
    }
    Ok(())
}

/// The rows of the fuzz group; see the module documentation.
pub fn fuzz_rows(o: &BenchOptions, _frames: &HostFrames, rows: &mut Vec<Row>) -> Result<()> {
    for (k, t) in TARGETS.iter().enumerate() {
        target_rows(o, t, rows, k == 0)?;
    }
    Ok(())
}

/// The rows of the fuzz-crash group (minutes: a group of its own, so `--groups fuzz` stays
/// short): `fuzz-find-crash-NAME`, LibAFL fuzzing each target from its seed until its planted
/// crash, median of `CRASH_SEEDS` (reported, no baseline).
pub fn fuzz_crash_rows(_o: &BenchOptions, _frames: &HostFrames, rows: &mut Vec<Row>) -> Result<()> {
    for t in TARGETS {
        let frames = HostFrames::new((t.mem_mib << 20) * 6)?;
        let parent = boot(&frames, t)?;
        progress(&format!(
            "fuzz: time to the planted crash of {}, {} seeds",
            t.name,
            CRASH_SEEDS.len()
        ));
        let (found, execs) = find_crash(&parent, t)?;
        let hits = found.iter().flatten().count();
        // A seed that found nothing counts as the limit: the median is then a lower bound.
        let secs: Vec<f64> = found
            .iter()
            .map(|s| s.unwrap_or(CRASH_LIMIT.as_secs_f64()))
            .collect();
        let med_execs = median(&execs.iter().map(|&e| e as f64).collect::<Vec<_>>());
        let lo = secs.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = secs.iter().copied().fold(0.0, f64::max);
        let mut r = row(
            format!("fuzz-find-crash-{}", t.name),
            format!(
                "time to the planted crash, {} from `{}`, median of {} seeds, found by {hits} \
                 within {limit} s (a miss counts as {limit} s) ({med_execs:.0} inputs; \
                 {lo:.1}–{hi:.1} s)",
                t.name,
                String::from_utf8_lossy(t.seed).escape_debug(),
                CRASH_SEEDS.len(),
                limit = CRASH_LIMIT.as_secs()
            ),
            "LibAFL + GuestExecutor, 1 client",
            median(&secs) * 1e6,
            "— (reported)",
            0.0,
        );
        r.ratio = 0.0;
        rows.push(r);
    }
    Ok(())
}
