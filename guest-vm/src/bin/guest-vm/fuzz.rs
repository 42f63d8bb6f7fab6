//! `guest-vm fuzz --guest FILE --corpus DIR --crashes DIR [--time S]`: snapshot fuzzing of an
//! SDK guest built with SanitizerCoverage (`guest::fuzz::Fuzzer`: one child forked at
//! `snapshot_here`, reset per input, coverage from a shared Vmo).
//!
//! The corpus directory's files are the seeds; every input that reaches new coverage is
//! written there (`cov-<hash>`); every failing input (crash, fault, timeout — one per distinct
//! outcome) is written to the crashes directory (`crash-<hash>`) and reproduces with
//! `guest-vm run --guest FILE --input CRASH`. Exit status 0 after the session (findings or
//! not), 1 when the guest cannot be brought to its `snapshot_here` or a directory cannot be
//! used.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use guest_vm::guest::fuzz::{Event, Fuzzer};
use guest_vm::guest::program::{Outcome, Program};
use guest_vm::{Error, HostFrames, Result};

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
    /// Session length in seconds.
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
    /// Seed of the mutator.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop at the first finding.
    #[arg(long)]
    until_crash: bool,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

fn dir_err(what: &str, d: &Path, e: std::io::Error) -> Error {
    Error::InvalidArgs(format!("{what} directory {}: {e}", d.display()))
}

fn seeds(dir: &Path) -> Result<Vec<Vec<u8>>> {
    std::fs::create_dir_all(dir).map_err(|e| dir_err("corpus", dir, e))?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| dir_err("corpus", dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| std::fs::read(f).map_err(|e| dir_err("corpus", dir, e)))
        .collect()
}

fn name(prefix: &str, bytes: &[u8]) -> String {
    // FNV-1a: a stable file name per input.
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!("{prefix}-{h:016x}")
}

pub fn run(a: &FuzzArgs) -> Result<bool> {
    guest_vm::vmm::check_host()?;
    let seeds = seeds(&a.corpus)?;
    std::fs::create_dir_all(&a.crashes).map_err(|e| dir_err("crashes", &a.crashes, e))?;
    let elf = std::fs::read(&a.guest)
        .map_err(|e| Error::InvalidArgs(format!("cannot read guest {}: {e}", a.guest.display())))?;
    let frames = HostFrames::new((a.mem << 20) * 3)?;
    let mut parent = Program::load(&frames, &elf, a.mem << 20)?;
    match parent.run(Duration::from_secs(10))? {
        Outcome::SnapshotHere => {}
        other => {
            return Err(Error::BadState(format!(
                "{} did not reach snapshot_here ({other}): nothing to fuzz",
                a.guest.display()
            )))
        }
    }
    let mut fz = Fuzzer::new(&parent, a.seed, Duration::from_millis(a.exec_limit_ms))?;
    let (corpus, crashes, json) = (a.corpus.clone(), a.crashes.clone(), a.json);
    let stats = fz.fuzz(
        &seeds,
        Duration::from_secs(a.time),
        a.max_len as usize,
        a.until_crash,
        |ev| {
            let (dir, file, bytes) = match ev {
                Event::NewCoverage(i) => (&corpus, name("cov", i), i),
                Event::Finding(f) => {
                    let file = name("crash", &f.input);
                    if !json {
                        println!("finding: {} -> {}", file, f.outcome);
                    }
                    (&crashes, file, &f.input[..])
                }
            };
            std::fs::write(dir.join(&file), bytes).map_err(|e| dir_err("output", dir, e))
        },
    )?;
    if a.json {
        crate::print_json(&serde_json::json!({
            "stats": stats,
            "findings": fz.findings.iter().map(|f| serde_json::json!({
                "file": a.crashes.join(name("crash", &f.input)).display().to_string(),
                "outcome": f.outcome.to_string(),
            })).collect::<Vec<_>>(),
        }))?;
    } else {
        let per = stats.elapsed_s / stats.execs.max(1) as f64 * 1e6;
        println!(
            "{} execs in {:.1} s ({per:.0} us per input; reset {:.0} %), corpus {}, edges {}, \
             findings {}",
            stats.execs,
            stats.elapsed_s,
            100.0 * stats.reset_s / stats.elapsed_s.max(1e-9),
            stats.corpus,
            stats.edges,
            stats.findings
        );
    }
    Ok(true)
}
