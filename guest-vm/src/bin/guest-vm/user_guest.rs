//! `guest-vm run --guest FILE` and `guest-vm fork --guest FILE -n N`: a user's guest ELF (built
//! with the guest SDK, `guest-vm/guest/ABI.md`) instead of the built-in key-value store.
//!
//! - `run`: boots the guest, runs it through its `snapshot_here` (if any) to `done` / `crash`
//!   with the `--input` file as its input; prints its log and result. Exit status 0 for
//!   `done`, 1 for any other end (crash, fault, timeout) — so a saved crashing input
//!   reproduces as a failing `run`.
//! - `fork`: boots the guest to its `snapshot_here` (an error if it finishes, fails or hits the
//!   time limit first), forks N children that run concurrently, child `i` with input `i` (the
//!   files of `--inputs DIR` sorted by name, reused in turn; default `child <i>`), and reports
//!   each child's result, run time and private pages. Exit status 0 when every child ran
//!   (whatever its result), 1 when the parent could not be brought to its snapshot point.
//!
//! Errors (exit status 1, one message, no panic): an unreadable file or a file that is not a
//! loadable ELF, a guest that never calls `snapshot_here` within `--time-limit`, a guest that
//! exceeds its memory (reported as its outcome: an allocation failure crash, an access outside
//! guest memory, a triple fault). Bad option values are clap errors (exit status 2).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use guest_vm::guest::program::{Outcome, Program};
use guest_vm::workload::fleet;
use guest_vm::{Error, HostFrames, Result};

use crate::measure::ms;

/// Options shared by `run --guest` and `fork --guest`.
#[derive(Args, Clone, Debug)]
pub struct GuestOpts {
    /// A static ELF guest built with the guest SDK (guest-vm/guest/ABI.md) to run instead of
    /// the key-value store.
    #[arg(long, value_name = "FILE")]
    pub guest: Option<PathBuf>,
    /// Guest memory in MiB (with --guest).
    #[arg(long, value_name = "MiB", default_value_t = 64, requires = "guest",
          value_parser = clap::value_parser!(u64).range(2..=8192))]
    pub mem: u64,
    /// Time limit in seconds for each run (with --guest): boot to snapshot_here, and each
    /// child.
    #[arg(long, value_name = "S", default_value_t = 10.0, requires = "guest",
          value_parser = parse_seconds)]
    pub time_limit: f64,
}

/// `run --guest` options.
#[derive(Args, Clone, Debug)]
pub struct RunOpts {
    #[command(flatten)]
    pub g: GuestOpts,
    /// The guest's input (what `next_input` returns), with --guest.
    #[arg(long, value_name = "FILE", requires = "guest")]
    pub input: Option<PathBuf>,
}

/// `fork --guest` options.
#[derive(Args, Clone, Debug)]
pub struct ForkOpts {
    #[command(flatten)]
    pub g: GuestOpts,
    /// A directory of inputs, one per child (sorted by name, reused in turn), with --guest.
    #[arg(long, value_name = "DIR", requires = "guest")]
    pub inputs: Option<PathBuf>,
}

fn parse_seconds(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x > 0.0 && x <= 86_400.0 => Ok(x),
        _ => Err(format!(
            "`{s}` is not a time limit in seconds (0 < S <= 86400)"
        )),
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::InvalidArgs(format!("cannot read {what} {}: {e}", path.display())))
}

fn guest_path(g: &GuestOpts) -> Result<&Path> {
    g.guest
        .as_deref()
        .ok_or_else(|| Error::InvalidArgs("--guest FILE is required".into()))
}

fn limit(g: &GuestOpts) -> Duration {
    Duration::from_secs_f64(g.time_limit)
}

fn load(g: &GuestOpts, path: &Path, frames: &HostFrames) -> Result<Program> {
    let elf = read(path, "guest")?;
    Program::load(frames, &elf, g.mem << 20).map_err(|e| match e {
        Error::Payload(s) => Error::Payload(format!(
            "{} is not a guest this VMM can load: {s} (build it with the guest SDK, \
             guest-vm/guest/ABI.md)",
            path.display()
        )),
        e => e,
    })
}

fn print_log(prefix: &str, log: &[String]) {
    for line in log {
        println!("{prefix}{line}");
    }
}

/// `guest-vm run --guest FILE`: true when the guest ended with `done`.
pub fn run(o: &RunOpts, json: bool) -> Result<bool> {
    let path = guest_path(&o.g)?;
    guest_vm::vmm::check_host()?;
    let input = match &o.input {
        Some(p) => read(p, "input")?,
        None => Vec::new(),
    };
    let frames = HostFrames::new((o.g.mem << 20) * 2)?;
    let t = Instant::now();
    let mut p = load(&o.g, path, &frames)?;
    p.set_input(&input);
    let mut snapshot = false;
    let outcome = loop {
        match p.run(limit(&o.g))? {
            Outcome::SnapshotHere => snapshot = true,
            o => break o,
        }
    };
    let run_ms = ms(t.elapsed());
    let mem = fleet::guest_memory(p.guest());
    if json {
        crate::print_json(&serde_json::json!({
            "guest": path.display().to_string(),
            "outcome": outcome.to_string(),
            "done": !outcome.is_failure(),
            "snapshot_here": snapshot,
            "log": p.log(),
            "run_ms": run_ms,
            "private_pages": mem.private_frames,
        }))?;
    } else {
        print_log("guest: ", p.log());
        println!(
            "result: {outcome} ({run_ms:.1} ms, {} pages resident{})",
            mem.private_frames,
            if snapshot {
                ", passed snapshot_here"
            } else {
                ""
            }
        );
    }
    Ok(!outcome.is_failure())
}

/// The children's inputs: `(name, bytes)` per child.
fn inputs(o: &ForkOpts, n: usize) -> Result<Vec<(String, Vec<u8>)>> {
    let Some(dir) = &o.inputs else {
        return Ok((0..n)
            .map(|i| (format!("child {i}"), format!("child {i}").into_bytes()))
            .collect());
    };
    let rd = std::fs::read_dir(dir).map_err(|e| {
        Error::InvalidArgs(format!(
            "cannot read inputs directory {}: {e}",
            dir.display()
        ))
    })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::InvalidArgs(format!(
            "inputs directory {} holds no files",
            dir.display()
        )));
    }
    (0..n)
        .map(|i| {
            let f = &files[i % files.len()];
            let name = f
                .file_name()
                .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
            Ok((name, read(f, "input")?))
        })
        .collect()
}

/// One child's result.
#[derive(serde::Serialize)]
struct ChildRow {
    index: usize,
    input: String,
    outcome: String,
    failed: bool,
    run_ms: f64,
    private_pages: u64,
    log: Vec<String>,
}

/// `guest-vm fork --guest FILE -n N`: true when every child ran.
pub fn fork(o: &ForkOpts, n: usize, json: bool) -> Result<bool> {
    let path = guest_path(&o.g)?;
    guest_vm::vmm::check_host()?;
    let inputs = inputs(o, n)?;
    let frames = HostFrames::new((o.g.mem << 20) * (n as u64 + 1))?;
    let mut parent = load(&o.g, path, &frames)?;
    let t = Instant::now();
    match parent.run(limit(&o.g))? {
        Outcome::SnapshotHere => {}
        Outcome::Timeout(d) => {
            print_log("guest: ", parent.log());
            return Err(Error::BadState(format!(
                "{} never called snapshot_here within its time limit ({:.1} s): nothing to fork",
                path.display(),
                d.as_secs_f64()
            )));
        }
        other => {
            print_log("guest: ", parent.log());
            return Err(Error::BadState(format!(
                "{} ended before calling snapshot_here ({other}): nothing to fork",
                path.display()
            )));
        }
    }
    let boot_ms = ms(t.elapsed());
    let state = parent.snapshot()?;
    let mut children = Vec::with_capacity(n);
    for (name, bytes) in &inputs {
        let mut c = parent.fork(&state)?;
        c.set_input(bytes);
        children.push((name.clone(), c));
    }
    let lim = limit(&o.g);
    let rows: Vec<Result<ChildRow>> = std::thread::scope(|s| {
        let handles: Vec<_> = children
            .into_iter()
            .enumerate()
            .map(|(index, (input, mut c))| {
                s.spawn(move || {
                    let t = Instant::now();
                    let outcome = c.run(lim)?;
                    Ok(ChildRow {
                        index,
                        input,
                        failed: outcome.is_failure(),
                        outcome: outcome.to_string(),
                        run_ms: ms(t.elapsed()),
                        private_pages: fleet::guest_memory(c.guest()).private_frames,
                        log: c.log().to_vec(),
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::BadState("a child's thread panicked".into())))
            })
            .collect()
    });
    let rows = rows.into_iter().collect::<Result<Vec<_>>>()?;
    if json {
        crate::print_json(&serde_json::json!({
            "guest": path.display().to_string(),
            "boot_to_snapshot_ms": boot_ms,
            "parent_log": parent.log(),
            "children": rows,
        }))?;
    } else {
        print_log("parent: ", parent.log());
        println!(
            "snapshot_here after {boot_ms:.1} ms; {n} children forked, each with its own input"
        );
        println!("child  run ms  private pg  input -> result");
        for r in &rows {
            println!(
                "{:>5} {:>7.1} {:>11}  {:?} -> {}",
                r.index, r.run_ms, r.private_pages, r.input, r.outcome
            );
            print_log("         log: ", &r.log);
        }
        let failed = rows.iter().filter(|r| r.failed).count();
        println!("{} done, {failed} failed", rows.len() - failed);
    }
    Ok(true)
}
