//! Snapshot fuzzing of an SDK guest with LibAFL: `GuestExecutor` is a LibAFL `Executor` (and
//! `HasObservers`) that runs every input in one child forked at the guest's `snapshot_here` and
//! resets it to the snapshot (`Program::reset`, copy-back) after each input; `fuzz` is one
//! LibAFL client (a `StdFuzzer` scheduled as AFL++ does — calibration, a weighted queue with
//! the FAST power schedule, a minimizer favouring the smallest fastest entry per edge — havoc
//! and token mutations, `MaxMapFeedback`, crash / timeout objectives) over it, under any event manager (the CLI's
//! `SimpleEventManager`, or the LLMP manager of LibAFL's `Launcher` for several cores).
//!
//! Coverage: the guest's SanitizerCoverage edge counters live in a coverage map that is a
//! shared Vmo of this child alone (`Program::attach_coverage`), so reset does not roll it
//! back; after each run the executor copies it out and zeroes it (`Coverage::take`) and hands
//! the edge counters (`[0, COV_CMP_OFF)`) to the map observer (`HitcountsMapObserver` over an
//! owned buffer: LibAFL's `pre_exec` clears it, `post_exec` buckets it). The comparison log
//! after the counters (the operands of the guest's comparisons) gives its constant operands to
//! the state's `Tokens` metadata, which the token mutations insert: that is how a magic value is matched.
//!
//! Outcomes map to exit kinds: `done` is `Ok`; the time limit (vCPU kick) is `Timeout`; the
//! SDK's `crash`, a triple fault (an exception), an access outside guest memory, a fault the
//! Vmar refused and an exit the ABI lacks are `Crash`. Every failing input's outcome is kept
//! (`outcome_of`, at most `MAX_OUTCOMES`) so a saved crash can be reported with its reason.
//!
//! Invariants: the child is at the snapshot whenever `run_target` starts (it resets after
//! every run, also after a refused fault, which `reset` recovers); the coverage map is read
//! only between runs; a host failure (KVM, the fault path) is a LibAFL `Error`, never a crash
//! of the input.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use libafl::corpus::{Corpus, InMemoryOnDiskCorpus, OnDiskCorpus};
use libafl::events::{EventFirer, EventReceiver, ProgressReporter, SendExiting};
use libafl::executors::{Executor, ExitKind, HasObservers};
use libafl::feedback_or_fast;
use libafl::feedbacks::{CrashFeedback, MaxMapFeedback, TimeoutFeedback};
use libafl::fuzzer::{Evaluator, Fuzzer as _, StdFuzzer};
use libafl::inputs::BytesInput;
use libafl::mutators::{havoc_mutations, tokens_mutations, HavocScheduledMutator, Tokens};
use libafl::observers::{CanTrack, ExplicitTracking, HitcountsMapObserver, StdMapObserver};
use libafl::schedulers::{
    powersched::PowerSchedule, IndexesLenTimeMinimizerScheduler, StdWeightedScheduler,
};
use libafl::stages::{CalibrationStage, StdPowerMutationalStage};
use libafl::state::{HasCorpus, HasExecutions, HasMaxSize, HasSolutions, StdState};
use libafl::HasMetadata;
use libafl_bolts::rands::StdRand;
use libafl_bolts::tuples::{tuple_list, Merge, RefIndexable};

use super::program::{Coverage, Outcome, Program};
use crate::error::{Error, Result};
use crate::vmm::vcpu_state::VcpuState;
use crate::vmm::x86_64::layout::{COV_CMP_CONST, COV_CMP_OFF, COV_SIZE};

/// Most mutation tokens taken from the comparison log.
pub const MAX_TOKENS: usize = 512;

/// Most failing inputs whose outcome is kept.
pub const MAX_OUTCOMES: usize = 4096;

/// The map observer over the guest's edge counters (hit-count buckets; the indexes of the
/// edges an entry covers are tracked for the minimizer scheduler).
pub type CovObserver =
    ExplicitTracking<HitcountsMapObserver<StdMapObserver<'static, u8, false>>, true, false>;

/// The LibAFL state of a guest fuzzing client: corpus in memory and on disk (the corpus
/// directory), solutions on disk (the crashes directory).
pub type FuzzState =
    StdState<InMemoryOnDiskCorpus<BytesInput>, BytesInput, StdRand, OnDiskCorpus<BytesInput>>;

/// Where an executor's time went.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ExecStats {
    pub execs: u64,
    /// Seconds in guest runs.
    pub run_s: f64,
    /// Seconds in resets.
    pub reset_s: f64,
    /// Edge counters seen non-zero at least once.
    pub edges: u64,
}

/// The exit kind LibAFL's feedbacks see for a run's outcome (module documentation).
pub fn exit_kind(o: &Outcome) -> ExitKind {
    match o {
        Outcome::SnapshotHere | Outcome::Done(_) => ExitKind::Ok,
        Outcome::Timeout(_) => ExitKind::Timeout,
        Outcome::Crash(_)
        | Outcome::TripleFault { .. }
        | Outcome::OutsideMemory { .. }
        | Outcome::Refused(_)
        | Outcome::Stopped(_) => ExitKind::Crash,
    }
}

fn afl_err(e: Error) -> libafl::Error {
    libafl::Error::unknown(format!("guest executor: {e}"))
}

/// A LibAFL executor over one forked child of a program; see the module documentation.
pub struct GuestExecutor {
    child: Program,
    snap: VcpuState,
    cov: Coverage,
    /// The whole coverage window of the last run (counters, then the comparison log).
    raw: Vec<u8>,
    virgin: Vec<bool>,
    limit: Duration,
    observers: (CovObserver, ()),
    stats: ExecStats,
    outcomes: HashMap<Vec<u8>, Outcome>,
}

impl GuestExecutor {
    /// An executor over `parent`, which must be stopped at its `snapshot_here` (phase
    /// `Ready`): forks the one child every input runs in and gives it its own coverage map;
    /// `limit` is the time limit per input.
    pub fn new(parent: &Program, limit: Duration) -> Result<GuestExecutor> {
        let snap = parent.snapshot()?;
        let child = parent.fork(&snap)?;
        GuestExecutor::from_child(child, snap, limit)
    }

    /// An executor over `child`, a fork at `snap` (its parent's snapshot point) that has not
    /// run yet; gives it its own coverage map.
    pub fn from_child(mut child: Program, snap: VcpuState, limit: Duration) -> Result<Self> {
        let cov = child.attach_coverage()?;
        let edges = COV_CMP_OFF as usize;
        let map = StdMapObserver::owned("guest-edges", vec![0u8; edges]);
        Ok(GuestExecutor {
            child,
            snap,
            cov,
            raw: vec![0; COV_SIZE as usize],
            virgin: vec![true; edges],
            limit,
            observers: (HitcountsMapObserver::new(map).track_indices(), ()),
            stats: ExecStats::default(),
            outcomes: HashMap::new(),
        })
    }

    pub fn child(&self) -> &Program {
        &self.child
    }

    pub fn stats(&self) -> &ExecStats {
        &self.stats
    }

    /// The coverage window of the last run (edge counters, then the comparison log).
    pub fn last_map(&self) -> &[u8] {
        &self.raw
    }

    /// How the run of a failing input ended (the last `MAX_OUTCOMES` distinct ones).
    pub fn outcome_of(&self, input: &[u8]) -> Option<&Outcome> {
        self.outcomes.get(input)
    }

    /// Runs one input in the child, reads and zeroes its coverage map, and resets it.
    pub fn exec(&mut self, input: &[u8]) -> Result<Outcome> {
        self.child.set_input(input);
        let t = Instant::now();
        let outcome = self.child.run(self.limit)?;
        self.stats.run_s += t.elapsed().as_secs_f64();
        self.cov.take(&mut self.raw)?;
        let t = Instant::now();
        self.child.reset(&self.snap)?;
        self.stats.reset_s += t.elapsed().as_secs_f64();
        self.stats.execs += 1;
        for (v, &c) in self
            .virgin
            .iter_mut()
            .zip(&self.raw[..COV_CMP_OFF as usize])
        {
            if c != 0 && *v {
                *v = false;
                self.stats.edges += 1;
            }
        }
        if outcome.is_failure() && self.outcomes.len() < MAX_OUTCOMES {
            self.outcomes.insert(input.to_vec(), outcome.clone());
        }
        Ok(outcome)
    }
}

/// Adds the constant comparison operands of a comparison log (the map's bytes from
/// `COV_CMP_OFF`: a u64 count, then 16-byte records `size, value`; a constant's size word has
/// `COV_CMP_CONST` set) to `tokens`, up to `MAX_TOKENS`. Operands of comparisons between two
/// runtime values are skipped: they are mostly input bytes and would crowd the magic values out
/// of the token pool. Whatever the
/// guest wrote there (a count beyond the log, bad sizes) is bounded, never a panic.
pub fn learn_tokens(log: &[u8], tokens: &mut Tokens) {
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&log[i * 8..i * 8 + 8]);
        u64::from_le_bytes(b)
    };
    if log.len() < 16 {
        return;
    }
    let records = (word(0) as usize).min(log.len() / 16 - 1);
    for r in 1..=records {
        let (size, value) = (word(2 * r), word(2 * r + 1));
        if tokens.len() >= MAX_TOKENS {
            return;
        }
        if size & COV_CMP_CONST == 0 {
            continue;
        }
        let size = (size & !COV_CMP_CONST) as usize;
        if (1..=8).contains(&size) && value != 0 {
            tokens.add_token(&value.to_le_bytes()[..size].to_vec());
        }
    }
}

impl HasObservers for GuestExecutor {
    type Observers = (CovObserver, ());

    fn observers(&self) -> RefIndexable<&Self::Observers, Self::Observers> {
        RefIndexable::from(&self.observers)
    }

    fn observers_mut(&mut self) -> RefIndexable<&mut Self::Observers, Self::Observers> {
        RefIndexable::from(&mut self.observers)
    }
}

impl<EM, S, Z> Executor<EM, BytesInput, S, Z> for GuestExecutor
where
    S: HasExecutions + HasMetadata,
{
    fn run_target(
        &mut self,
        _fuzzer: &mut Z,
        state: &mut S,
        _mgr: &mut EM,
        input: &BytesInput,
    ) -> std::result::Result<ExitKind, libafl::Error> {
        *state.executions_mut() += 1;
        let outcome = self.exec(input.as_ref()).map_err(afl_err)?;
        let n = COV_CMP_OFF as usize;
        self.observers.0.as_mut().copy_from_slice(&self.raw[..n]);
        let tokens = state.metadata_or_insert_with(Tokens::new);
        learn_tokens(&self.raw[n..], tokens);
        Ok(exit_kind(&outcome))
    }
}

/// One client's session.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Seeds are read from here; inputs with new coverage are written here.
    pub corpus: PathBuf,
    /// Failing inputs are written here (LibAFL's `OnDiskCorpus`).
    pub crashes: PathBuf,
    pub time: Duration,
    pub max_len: usize,
    /// Stop at the first failing input.
    pub until_crash: bool,
    pub seed: u64,
}

/// What a session did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SessionReport {
    pub execs: u64,
    pub corpus: usize,
    pub solutions: usize,
    pub edges: u64,
    pub elapsed_s: f64,
    pub run_s: f64,
    pub reset_s: f64,
    /// Seconds into the session when the first solution came.
    pub first_solution_s: Option<f64>,
    /// The solutions' files.
    pub crash_files: Vec<PathBuf>,
}

/// Runs one LibAFL client over `exec` for `o.time` (or until the first failing input):
/// a fresh state from `o` unless `state` is one a restarting event manager handed back; the
/// seeds of `o.corpus` are loaded (an empty input when there are none or none is kept).
pub fn fuzz<EM>(
    exec: &mut GuestExecutor,
    state: Option<FuzzState>,
    mgr: &mut EM,
    o: &SessionOptions,
) -> Result<(FuzzState, SessionReport)>
where
    EM: EventFirer<BytesInput, FuzzState>
        + ProgressReporter<FuzzState>
        + SendExiting
        + EventReceiver<BytesInput, FuzzState>,
{
    if o.max_len == 0 {
        return Err(Error::InvalidArgs(
            "inputs must be allowed at least 1 byte".into(),
        ));
    }
    let e = |what: &str, err: libafl::Error| Error::BadState(format!("libafl {what}: {err}"));
    let map_feedback = MaxMapFeedback::new(&exec.observers.0);
    let calibration = CalibrationStage::new(&map_feedback);
    let mut feedback = map_feedback;
    let mut objective = feedback_or_fast!(CrashFeedback::new(), TimeoutFeedback::new());
    let mut state = match state {
        Some(s) => s,
        None => StdState::new(
            StdRand::with_seed(o.seed),
            InMemoryOnDiskCorpus::no_meta(&o.corpus).map_err(|x| e("corpus directory", x))?,
            OnDiskCorpus::no_meta(&o.crashes).map_err(|x| e("crashes directory", x))?,
            &mut feedback,
            &mut objective,
        )
        .map_err(|x| e("state", x))?,
    };
    state.set_max_size(o.max_len);
    // AFL++'s scheduling: a weighted queue with the FAST power schedule (more mutations for
    // entries on rarely exercised paths), favouring the smallest, fastest entry per edge.
    let scheduler = IndexesLenTimeMinimizerScheduler::new(
        &exec.observers.0,
        StdWeightedScheduler::with_schedule(
            &mut state,
            &exec.observers.0,
            Some(PowerSchedule::fast()),
        ),
    );
    let mut fuzzer = StdFuzzer::new(scheduler, feedback, objective);
    let start = Instant::now();
    if state.must_load_initial_inputs() {
        state
            .load_initial_inputs(&mut fuzzer, exec, mgr, std::slice::from_ref(&o.corpus))
            .map_err(|x| e("seeds", x))?;
        if state.corpus().count() == 0 {
            fuzzer
                .add_input(&mut state, exec, mgr, BytesInput::new(Vec::new()))
                .map_err(|x| e("empty seed", x))?;
        }
    }
    let mutator = HavocScheduledMutator::new(havoc_mutations().merge(tokens_mutations()));
    let mut stages = tuple_list!(calibration, StdPowerMutationalStage::new(mutator));
    let mut first = None;
    while start.elapsed() < o.time {
        fuzzer
            .fuzz_one(&mut stages, exec, &mut state, mgr)
            .map_err(|x| e("fuzz_one", x))?;
        if state.solutions().count() > 0 {
            first.get_or_insert(start.elapsed().as_secs_f64());
            if o.until_crash {
                break;
            }
        }
    }
    let mut crash_files = Vec::new();
    for id in state.solutions().ids() {
        let tc = state.solutions().get(id).map_err(|x| e("solution", x))?;
        if let Some(p) = tc.borrow().file_path() {
            crash_files.push(p.clone());
        }
    }
    let s = exec.stats();
    let report = SessionReport {
        execs: s.execs,
        corpus: state.corpus().count(),
        solutions: state.solutions().count(),
        edges: s.edges,
        elapsed_s: start.elapsed().as_secs_f64(),
        run_s: s.run_s,
        reset_s: s.reset_s,
        first_solution_s: first,
        crash_files,
    };
    Ok((state, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn outcomes_map_to_exit_kinds() {
        assert_eq!(exit_kind(&Outcome::Done(3)), ExitKind::Ok);
        assert_eq!(
            exit_kind(&Outcome::Timeout(Duration::from_secs(1))),
            ExitKind::Timeout
        );
        for o in [
            Outcome::Crash("bug".into()),
            Outcome::TripleFault { rip: 0x1000 },
            Outcome::OutsideMemory {
                gpa: 1 << 40,
                write: true,
            },
            Outcome::Stopped("hlt".into()),
        ] {
            assert_eq!(exit_kind(&o), ExitKind::Crash, "{o}");
        }
    }

    #[test]
    fn comparison_log_records_become_tokens() {
        let mut log = vec![0u8; 80];
        log[..8].copy_from_slice(&3u64.to_le_bytes());
        let magic = u64::from(u32::from_le_bytes(*b"FUZ!"));
        log[16..24].copy_from_slice(&(4 | COV_CMP_CONST).to_le_bytes());
        log[24..32].copy_from_slice(&magic.to_le_bytes());
        log[32..40].copy_from_slice(&(9 | COV_CMP_CONST).to_le_bytes()); // a bad size: skipped
        log[48..56].copy_from_slice(&4u64.to_le_bytes()); // a runtime operand: skipped
        log[56..64].copy_from_slice(&7u64.to_le_bytes());
        let mut t = Tokens::new();
        learn_tokens(&log, &mut t);
        assert_eq!(t.tokens(), &[b"FUZ!".to_vec()]);
    }

    proptest! {
        #[test]
        fn any_comparison_log_is_bounded(log in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut t = Tokens::new();
            learn_tokens(&log, &mut t);
            prop_assert!(t.len() <= MAX_TOKENS);
        }
    }
}
