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
//! after the counters (the operand pairs of the guest's comparisons, one slot per distinct
//! pair) serves two mutations, as AFL++'s CmpLog does: its constant operands become the
//! state's `Tokens`, which the token mutations insert; and `InputToStateStage` runs each
//! corpus entry once more, tries once per entry every input made by writing one operand of a
//! comparison where the input holds the other (AFL++'s deterministic input-to-state pass), and
//! keeps the pairs as `CmpValuesMetadata` for LibAFL's random input-to-state mutation
//! (`I2SRandReplace`) — how a magic prefix checked byte by byte is found in a few thousand
//! inputs instead of millions.
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
use libafl::fuzzer::{Evaluator, ExecuteInputResult, Fuzzer as _, StdFuzzer};
use libafl::inputs::BytesInput;
use libafl::mutators::{
    havoc_mutations, tokens_mutations, HavocScheduledMutator, I2SRandReplace, Tokens,
};
use libafl::observers::{
    CanTrack, CmpValues, CmpValuesMetadata, ExplicitTracking, HitcountsMapObserver, StdMapObserver,
};
use libafl::schedulers::{
    powersched::PowerSchedule, IndexesLenTimeMinimizerScheduler, StdWeightedScheduler,
};
use libafl::stages::{
    CalibrationStage, Restartable, Stage, StdMutationalStage, StdPowerMutationalStage,
};
use libafl::state::{
    HasCorpus, HasCurrentTestcase, HasExecutions, HasMaxSize, HasSolutions, StdState,
};
use libafl::HasMetadata;
use libafl_bolts::rands::StdRand;
use libafl_bolts::tuples::{tuple_list, Merge, RefIndexable};

use super::program::{Coverage, Outcome, Program};
use crate::error::{Error, Result};
use crate::vmm::vcpu_state::VcpuState;
use crate::vmm::x86_64::layout::{COV_CMP_CONST, COV_CMP_OFF, COV_CMP_SLOT_BYTES, COV_SIZE};

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

    /// The comparison log of the last run (the window from `COV_CMP_OFF`).
    pub fn last_comparison_log(&self) -> &[u8] {
        &self.raw[COV_CMP_OFF as usize..]
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

/// One slot of a guest's comparison log: two operands of `size` bytes, the first a
/// compile-time constant when `constant`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Comparison {
    pub size: usize,
    pub a: u64,
    pub b: u64,
    pub constant: bool,
}

/// The comparisons in a comparison log (the map's bytes from `COV_CMP_OFF`: the count, then
/// `COV_CMP_SLOT_BYTES`-byte slots `size | COV_CMP_CONST, a, b`; `guest/ABI.md`): every slot
/// with a size of 1, 2, 4 or 8 bytes. Empty slots (size 0) and whatever else the guest wrote
/// there are skipped, never a panic.
pub fn comparisons(log: &[u8]) -> impl Iterator<Item = Comparison> + '_ {
    log.chunks_exact(COV_CMP_SLOT_BYTES as usize)
        .skip(1)
        .filter_map(|slot| {
            let word = |i: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&slot[i * 8..i * 8 + 8]);
                u64::from_le_bytes(b)
            };
            let size = (word(0) & !COV_CMP_CONST) as usize;
            matches!(size, 1 | 2 | 4 | 8).then(|| Comparison {
                size,
                a: word(1),
                b: word(2),
                constant: word(0) & COV_CMP_CONST != 0,
            })
        })
}

/// Adds the constant operands of a comparison log to `tokens`, up to `MAX_TOKENS`. Operands
/// of comparisons between two runtime values are skipped: they are mostly input bytes and
/// would crowd the magic values out of the token pool (the input-to-state mutation uses them).
pub fn learn_tokens(log: &[u8], tokens: &mut Tokens) {
    for c in comparisons(log).filter(|c| c.constant && c.a != 0) {
        if tokens.len() >= MAX_TOKENS {
            return;
        }
        tokens.add_token(&c.a.to_le_bytes()[..c.size].to_vec());
    }
}

/// The operand pairs of a comparison log as LibAFL's `CmpValuesMetadata` (what
/// `I2SRandReplace` reads), each operand truncated to its size.
pub fn cmp_metadata(log: &[u8]) -> CmpValuesMetadata {
    let mut meta = CmpValuesMetadata::new();
    meta.list = comparisons(log)
        .map(|c| match c.size {
            1 => CmpValues::U8((c.a as u8, c.b as u8, c.constant)),
            2 => CmpValues::U16((c.a as u16, c.b as u16, c.constant)),
            4 => CmpValues::U32((c.a as u32, c.b as u32, c.constant)),
            _ => CmpValues::U64((c.a, c.b, c.constant)),
        })
        .collect();
    meta
}

/// Most inputs `InputToStateStage` derives from one input.
pub const MAX_REPLACEMENTS: usize = 1024;
/// Most inputs `InputToStateStage` evaluates for one corpus entry, the new entries it found
/// on the way included.
pub const MAX_CHASE: usize = 4 * MAX_REPLACEMENTS;

/// The inputs AFL++'s deterministic input-to-state stage tries for `input` after a run that
/// made the comparisons `cmps`: for each comparison, each place where `input` holds one
/// operand (little- or big-endian), the input with the other operand written there — only the
/// runtime operand is replaced when the first is a constant. Constants' comparisons come
/// first; no duplicates, never `input` itself, at most `max`.
pub fn replacements(input: &[u8], cmps: &[Comparison], max: usize) -> Vec<Vec<u8>> {
    let mut order: Vec<&Comparison> = cmps.iter().collect();
    order.sort_by_key(|c| !c.constant);
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for c in order {
        let mut swaps = vec![(c.b, c.a)];
        if !c.constant {
            swaps.push((c.a, c.b));
        }
        for (from, to) in swaps {
            for big_endian in [false, true] {
                if big_endian && c.size == 1 {
                    continue;
                }
                let bytes = |v: u64| {
                    let mut b = v.to_le_bytes()[..c.size].to_vec();
                    if big_endian {
                        b.reverse();
                    }
                    b
                };
                let (from, to) = (bytes(from), bytes(to));
                for at in 0..(input.len() + 1).saturating_sub(c.size) {
                    if input[at..at + c.size] != from[..] {
                        continue;
                    }
                    let mut next = input.to_vec();
                    next[at..at + c.size].copy_from_slice(&to);
                    if seen.insert(next.clone()) {
                        out.push(next);
                        if out.len() >= max {
                            return out;
                        }
                    }
                }
            }
        }
    }
    out
}

/// A LibAFL stage that runs the corpus entry being fuzzed once more in the guest and keeps
/// the comparisons of that run as the state's `CmpValuesMetadata` (for the random
/// input-to-state mutation after it: AFL++'s CmpLog tracing run, on the SDK's comparison log);
/// the first time it meets an entry it also evaluates every input of [`replacements`] (AFL++'s
/// deterministic input-to-state pass), and does the same at once for each of those that
/// reached new coverage (a new corpus entry), so a magic value compared byte by byte is
/// matched within one schedule. One run per scheduled entry, and at most `MAX_CHASE` once per
/// entry, beside the hundreds of mutated runs that follow each schedule.
#[derive(Debug, Default)]
pub struct InputToStateStage {
    replaced: std::collections::HashSet<libafl::corpus::CorpusId>,
}

impl<EM, Z> Stage<GuestExecutor, EM, FuzzState, Z> for InputToStateStage
where
    Z: Evaluator<GuestExecutor, EM, BytesInput, FuzzState>,
{
    fn perform(
        &mut self,
        fuzzer: &mut Z,
        executor: &mut GuestExecutor,
        state: &mut FuzzState,
        manager: &mut EM,
    ) -> std::result::Result<(), libafl::Error> {
        use libafl::corpus::HasCurrentCorpusId;
        let input = state.current_input_cloned()?;
        *state.executions_mut() += 1;
        executor.exec(input.as_ref()).map_err(afl_err)?;
        let log = executor.last_comparison_log();
        let cmps: Vec<Comparison> = comparisons(log).collect();
        state.add_metadata(cmp_metadata(log));
        let first = match state.current_corpus_id()? {
            Some(id) => self.replaced.insert(id),
            None => false,
        };
        if !first {
            return Ok(());
        }
        // Depth first: an input that reached new coverage is traced and replaced at once, so a
        // magic compared byte by byte is matched in one schedule, not one per byte.
        let mut todo = vec![(input.as_ref().to_vec(), cmps)];
        let mut budget = MAX_CHASE;
        while let Some((input, cmps)) = todo.pop() {
            for next in replacements(&input, &cmps, MAX_REPLACEMENTS.min(budget)) {
                budget -= 1;
                let next = BytesInput::new(next);
                let (result, id) = fuzzer.evaluate_input(state, executor, manager, &next)?;
                let Some(id) = id.filter(|_| matches!(result, ExecuteInputResult::Corpus)) else {
                    continue;
                };
                self.replaced.insert(id);
                // `evaluate_input` ran `next` once and nothing after it (its feedbacks take no
                // executor): the window still holds that run's comparisons.
                let cmps = comparisons(executor.last_comparison_log()).collect();
                todo.push((next.as_ref().to_vec(), cmps));
            }
            if budget == 0 {
                break;
            }
        }
        Ok(())
    }
}

impl Restartable<FuzzState> for InputToStateStage {
    fn should_restart(
        &mut self,
        _state: &mut FuzzState,
    ) -> std::result::Result<bool, libafl::Error> {
        Ok(true)
    }

    fn clear_progress(&mut self, _state: &mut FuzzState) -> std::result::Result<(), libafl::Error> {
        Ok(())
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
        learn_tokens(self.last_comparison_log(), tokens);
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
    let i2s = HavocScheduledMutator::new(tuple_list!(I2SRandReplace::new()));
    let mut stages = tuple_list!(
        calibration,
        InputToStateStage::default(),
        StdMutationalStage::new(i2s),
        StdPowerMutationalStage::new(mutator)
    );
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

    /// A comparison log with `slots` written at slot indices 0, 1, ... (the count word is
    /// not read by the host).
    fn log_of(slots: &[(u64, u64, u64)]) -> Vec<u8> {
        let n = COV_CMP_SLOT_BYTES as usize;
        let mut log = vec![0u8; n * (slots.len() + 2)];
        for (i, &(size, a, b)) in slots.iter().enumerate() {
            let at = n * (i + 1);
            log[at..at + 8].copy_from_slice(&size.to_le_bytes());
            log[at + 8..at + 16].copy_from_slice(&a.to_le_bytes());
            log[at + 16..at + 24].copy_from_slice(&b.to_le_bytes());
        }
        log
    }

    #[test]
    fn comparison_log_slots_become_tokens_and_operand_pairs() {
        let magic = u64::from(u32::from_le_bytes(*b"FUZ!"));
        let log = log_of(&[
            (4 | COV_CMP_CONST, magic, 0x3d31_3d61),
            (9 | COV_CMP_CONST, 5, 6),           // a bad size: skipped
            (1, 0x47, 0x50),                     // two runtime operands: a pair, no token
            (0, 0, 0),                           // an empty slot
            (1 | COV_CMP_CONST, 0x1_0050, 0x47), // truncated to its size
        ]);
        let mut t = Tokens::new();
        learn_tokens(&log, &mut t);
        assert_eq!(t.tokens(), &[b"FUZ!".to_vec(), b"P".to_vec()]);
        let meta = cmp_metadata(&log);
        assert_eq!(
            meta.list,
            vec![
                CmpValues::U32((u32::from_le_bytes(*b"FUZ!"), 0x3d31_3d61, true)),
                CmpValues::U8((0x47, 0x50, false)),
                CmpValues::U8((0x50, 0x47, true)),
            ]
        );
    }

    #[test]
    fn input_to_state_replaces_the_compared_byte_with_the_magic() {
        use libafl::mutators::{MutationResult, Mutator};
        use libafl::state::NopState;
        // The guest compared the method's first byte `G` with the constant `P`.
        let log = log_of(&[(1 | COV_CMP_CONST, u64::from(b'P'), u64::from(b'G'))]);
        let mut state: NopState<BytesInput> = NopState::new();
        state.add_metadata(cmp_metadata(&log));
        let mut input = BytesInput::new(b"G".to_vec());
        let r = I2SRandReplace::new()
            .mutate(&mut state, &mut input)
            .unwrap();
        assert_eq!(r, MutationResult::Mutated);
        assert_eq!(input.as_ref(), b"P");
    }

    #[test]
    fn replacements_write_the_other_operand_where_the_input_holds_one() {
        let c = |size, a, b, constant| Comparison {
            size,
            a,
            b,
            constant,
        };
        let cmps = [
            c(1, 0x47, 0x45, false),                      // 'G' vs 'E', both runtime
            c(1, u64::from(b'P'), u64::from(b'G'), true), // constant 'P' vs 'G'
            c(2, 0x3132, 0x4142, true),                   // constant "21" vs "BA" (LE)
        ];
        let got = replacements(b"GEAB", &cmps, 16);
        // Constants first; the constant itself is never replaced by the runtime operand.
        assert_eq!(
            got,
            vec![
                b"PEAB".to_vec(),
                b"GE12".to_vec(), // big-endian "AB" → "12"
                b"GGAB".to_vec(), // 'E' → 'G'
                b"EEAB".to_vec(), // 'G' → 'E'
            ]
        );
        assert_eq!(replacements(b"GEAB", &cmps, 2).len(), 2);
        assert!(replacements(b"", &cmps, 16).is_empty());
    }

    proptest! {
        #[test]
        fn any_comparison_log_is_bounded(log in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut t = Tokens::new();
            learn_tokens(&log, &mut t);
            prop_assert!(t.len() <= MAX_TOKENS);
            prop_assert!(cmp_metadata(&log).list.len() <= log.len() / COV_CMP_SLOT_BYTES as usize);
            let cmps: Vec<Comparison> = comparisons(&log).collect();
            let input = &log[..log.len().min(40)];
            let next = replacements(input, &cmps, 64);
            prop_assert!(next.len() <= 64);
            prop_assert!(next.iter().all(|n| n.len() == input.len() && n != input));
        }
    }
}
