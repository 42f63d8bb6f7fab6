//! `guest-vm fuzz --guest FILE --corpus DIR --crashes DIR [--time S] [--cores N]`: snapshot
//! fuzzing of an SDK guest built with SanitizerCoverage with LibAFL (`guest::fuzz`: one child
//! forked at `snapshot_here` per client, reset per input, coverage from a shared Vmo).
//!
//! The corpus directory's files are the seeds; every input that reaches new coverage is
//! written there (LibAFL's `InMemoryOnDiskCorpus`); every failing input (crash, fault,
//! timeout) is written to the crashes directory (`OnDiskCorpus`) and reproduces with
//! `guest-vm run --guest FILE --input CRASH`. With `--cores N` (N ≥ 2) LibAFL's `Launcher`
//! forks one client per core (each boots its own guest to `snapshot_here` after the fork, so no
//! VM crosses a `fork`), a broker on `--broker-port` links them with LLMP, and each client
//! prints one summary line (`client K: ...`, or one JSON object per line with `--json`).
//! Exit status 0 after the session (findings or not), 1 when the guest cannot be brought to its
//! `snapshot_here` or a directory cannot be used.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Args;
use guest_vm::guest::fuzz::{self, FuzzState, GuestExecutor, SessionOptions, SessionReport};
use guest_vm::guest::program::{Outcome, Program};
use guest_vm::{Error, HostFrames, Result};
use libafl::events::{
    ClientDescription, EventConfig, Launcher, LlmpRestartingEventManager, SendExiting,
    SimpleEventManager,
};
use libafl::inputs::BytesInput;
use libafl::monitors::{MultiMonitor, SimpleMonitor};
use libafl_bolts::core_affinity::{get_core_ids, Cores};
use libafl_bolts::shmem::{ShMemProvider, StdShMemProvider};

#[derive(Args, Clone, Debug)]
pub struct FuzzArgs {
    /// The guest ELF (built with the SDK and SanitizerCoverage, guest-vm/guest/ABI.md).
    #[arg(long, value_name = "FILE")]
    guest: PathBuf,
    /// Seeds; new-coverage inputs are added here.
    #[arg(long, value_name = "DIR")]
    corpus: PathBuf,
    /// Where failing inputs are saved.
    #[arg(long, value_name = "DIR")]
    crashes: PathBuf,
    /// Session length in seconds (per client).
    #[arg(long, value_name = "S", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    time: u64,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(2..=8192))]
    mem: u64,
    /// Time limit per input in milliseconds (longer runs are timeouts, saved as findings).
    #[arg(long, value_name = "MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    exec_limit_ms: u64,
    /// Longest input generated.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    max_len: u64,
    /// Seed of the mutator (client K of `--cores` uses seed + K).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop at the first finding (each client, with `--cores`).
    #[arg(long)]
    until_crash: bool,
    /// Clients, one per core (LibAFL's Launcher, LLMP between them); 1 runs in this process.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    cores: u64,
    /// TCP port of the LLMP broker (`--cores` ≥ 2).
    #[arg(long, value_name = "PORT", default_value_t = 1337)]
    broker_port: u16,
    /// Print the summary as one JSON object (one per client with `--cores`).
    #[arg(long)]
    json: bool,
}

/// Set in a Launcher client: after `launch` returns there, the process only exits.
static IS_CLIENT: AtomicBool = AtomicBool::new(false);

fn dir_err(what: &str, d: &Path, e: std::io::Error) -> Error {
    Error::InvalidArgs(format!("{what} directory {}: {e}", d.display()))
}

/// Boots the guest to its `snapshot_here` and forks the executor's child from it.
fn boot(a: &FuzzArgs, elf: &[u8]) -> Result<(HostFrames, Program, GuestExecutor)> {
    let frames = HostFrames::new((a.mem << 20) * 3)?;
    let mut parent = Program::load(&frames, elf, a.mem << 20)?;
    match parent.run(Duration::from_secs(10))? {
        Outcome::SnapshotHere => {}
        other => {
            return Err(Error::BadState(format!(
                "{} did not reach snapshot_here ({other}): nothing to fuzz",
                a.guest.display()
            )))
        }
    }
    let exec = GuestExecutor::new(&parent, Duration::from_millis(a.exec_limit_ms))?;
    Ok((frames, parent, exec))
}

fn session(a: &FuzzArgs, seed: u64) -> SessionOptions {
    SessionOptions {
        corpus: a.corpus.clone(),
        crashes: a.crashes.clone(),
        time: Duration::from_secs(a.time),
        max_len: a.max_len as usize,
        until_crash: a.until_crash,
        seed,
    }
}

fn findings(exec: &GuestExecutor, r: &SessionReport) -> Vec<serde_json::Value> {
    r.crash_files
        .iter()
        .map(|f| {
            let outcome = std::fs::read(f)
                .ok()
                .and_then(|i| exec.outcome_of(&i).map(|o| o.to_string()))
                .unwrap_or_else(|| "(found by another client)".into());
            serde_json::json!({ "file": f.display().to_string(), "outcome": outcome })
        })
        .collect()
}

fn report(a: &FuzzArgs, client: Option<usize>, exec: &GuestExecutor, r: &SessionReport) {
    let found = findings(exec, r);
    if a.json {
        let v = serde_json::json!({ "client": client, "stats": r, "findings": found });
        // One line per client when several share stdout.
        let s = match client {
            Some(_) => serde_json::to_string(&v),
            None => serde_json::to_string_pretty(&v),
        };
        println!("{}", s.unwrap_or_default());
        return;
    }
    for f in &found {
        println!("finding: {} -> {}", f["file"], f["outcome"]);
    }
    let per = r.elapsed_s / r.execs.max(1) as f64 * 1e6;
    println!(
        "{}{} execs in {:.1} s ({per:.0} us per input; reset {:.0} %), corpus {}, edges {}, \
         findings {}",
        client.map_or(String::new(), |c| format!("client {c}: ")),
        r.execs,
        r.elapsed_s,
        100.0 * r.reset_s / r.elapsed_s.max(1e-9),
        r.corpus,
        r.edges,
        r.solutions
    );
}

pub fn run(a: &FuzzArgs) -> Result<bool> {
    guest_vm::vmm::check_host()?;
    std::fs::create_dir_all(&a.corpus).map_err(|e| dir_err("corpus", &a.corpus, e))?;
    std::fs::create_dir_all(&a.crashes).map_err(|e| dir_err("crashes", &a.crashes, e))?;
    let elf = std::fs::read(&a.guest)
        .map_err(|e| Error::InvalidArgs(format!("cannot read guest {}: {e}", a.guest.display())))?;
    if a.cores > 1 {
        return launch(a, &elf);
    }
    let (_frames, _parent, mut exec) = boot(a, &elf)?;
    let mut mgr = SimpleEventManager::new(SimpleMonitor::new(|s| eprintln!("{s}")));
    let (_, r) = fuzz::fuzz(&mut exec, None, &mut mgr, &session(a, a.seed))?;
    report(a, None, &exec, &r);
    Ok(true)
}

/// `--cores N`: LibAFL's Launcher, one client per core; see the module documentation.
fn launch(a: &FuzzArgs, elf: &[u8]) -> Result<bool> {
    let afl = |what: &str, e: libafl::Error| Error::BadState(format!("{what}: {e}"));
    let have = get_core_ids().map_err(|e| afl("listing cores", e))?.len();
    if a.cores as usize > have {
        return Err(Error::InvalidArgs(format!(
            "--cores {} but this machine has {have}",
            a.cores
        )));
    }
    // Boot once here to report a guest that cannot reach snapshot_here before forking clients.
    drop(boot(a, elf)?);
    let cores = Cores::from((0..a.cores as usize).collect::<Vec<_>>());
    let shmem = StdShMemProvider::new().map_err(|e| afl("shared memory", e))?;
    type Mgr = LlmpRestartingEventManager<
        (),
        BytesInput,
        FuzzState,
        <StdShMemProvider as ShMemProvider>::ShMem,
        StdShMemProvider,
    >;
    let run_client = |state: Option<FuzzState>, mut mgr: Mgr, desc: ClientDescription| {
        IS_CLIENT.store(true, Ordering::SeqCst);
        let to_afl = |e: Error| libafl::Error::unknown(e.to_string());
        let (_frames, _parent, mut exec) = boot(a, elf).map_err(to_afl)?;
        let opts = session(a, a.seed.wrapping_add(desc.id() as u64));
        let (_, r) = fuzz::fuzz(&mut exec, state, &mut mgr, &opts).map_err(to_afl)?;
        report(a, Some(desc.id()), &exec, &r);
        mgr.send_exiting()
    };
    let result = Launcher::builder()
        .shmem_provider(shmem)
        .configuration(EventConfig::from_name("guest-vm-fuzz"))
        .monitor(MultiMonitor::new(|s| eprintln!("{s}")))
        .run_client(run_client)
        .cores(&cores)
        .broker_port(a.broker_port)
        .build()
        .launch();
    match result {
        Ok(()) => Ok(true),
        // A client's respawner, after its client said it is exiting.
        Err(libafl::Error::ShuttingDown) => Ok(true),
        Err(e) if IS_CLIENT.load(Ordering::SeqCst) => Err(afl("fuzzing client", e)),
        Err(e) => Err(afl("launcher", e)),
    }
}
