//! `guest-vm`: the command line of the KVM guest-container backend.
//!
//! - `guest-vm demo`  — boot the key-value store guest, snapshot it, fork N children that run
//!   concurrently, verify isolation, reset, and print a report ending in a `VERDICT:` line;
//! - `guest-vm fork --children N` — the same without the reset phase;
//! - `guest-vm run`   — boot one guest and serve a checked request stream;
//! - `guest-vm run|fork --guest FILE` — the same jobs for a user's SDK guest ([`user_guest`]);
//! - `guest-vm fuzz --guest FILE` — snapshot-fuzz a user's SDK guest;
//! - `guest-vm bench` — our paths side by side with the kernel's (medians and ratios);
//! - `guest-vm snapshot save|restore|inspect` — snapshot files ([`snapshot`]).
//!
//! Exit status: 0 on success, 1 when a check fails or the host cannot run guests (the message
//! says what is missing), 2 for bad command-line input. Logs go to stderr through `tracing`
//! (`RUST_LOG=guest_vm=debug`).
//!
//! The binary's modules (applications of the `guest_vm` library, not part of its API):
//! - this file: argument parsing (clap) and dispatch;
//! - [`demo`]: the `demo` / `fork` job and its checks (`DemoReport`);
//! - [`demo_report`]: the demo's human-readable report;
//! - [`demo_snapshot`]: the demo's save → restore → fork section;
//! - [`run`]: the `run` job (one guest, one checked stream);
//! - [`fuzz`]: `fuzz --guest FILE --corpus DIR --crashes DIR` (snapshot fuzzing);
//! - [`user_guest`]: `run --guest FILE` / `fork --guest FILE` (a user's guest ELF);
//! - [`bench`]: `guest-vm bench` (rows, `baseline` mechanisms, `print`);
//! - [`measure`]: medians and unit conversions shared by the jobs.

// The fuzz bench compiles the guest targets (`guest/targets/*.rs`, no_std + alloc) natively.
extern crate alloc;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod bench;
mod demo;
mod demo_report;
mod demo_snapshot;
mod fuzz;
mod measure;
mod run;
mod snapshot;
mod user_guest;

use demo::{DemoOptions, MAX_CHILDREN, MAX_TABLE_MIB};

#[derive(Parser)]
#[command(
    name = "guest-vm",
    version,
    about = "KVM guest containers whose memory is a vmo::Vmar: run, snapshot, fork, reset"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Workload {
    /// Hash table size in MiB (a power of two, 1..=4096).
    #[arg(long, default_value_t = 8, value_parser = parse_table_mib)]
    table_mib: u64,
    /// Keys inserted before the snapshot (default: 60 % of the buckets).
    #[arg(long, default_value_t = 0)]
    keys: u64,
    /// Requests each guest serves.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    requests: u64,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// The main job: snapshot a running guest, fork concurrent children, verify, reset.
    Demo {
        /// Children to fork.
        #[arg(long, short = 'n', default_value_t = 8, value_parser = parse_children)]
        children: usize,
        #[command(flatten)]
        w: Workload,
    },
    /// Fork N concurrent children of a snapshot and verify isolation (no reset phase).
    Fork {
        #[arg(long, short = 'n', default_value_t = 8, value_parser = parse_children)]
        children: usize,
        #[command(flatten)]
        w: Workload,
        #[command(flatten)]
        user: user_guest::ForkOpts,
    },
    /// Boot one guest and serve a checked request stream.
    Run {
        /// Seed of the request stream.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Let every table page fault in from the guest (no VMM prefault).
        #[arg(long)]
        no_prefault: bool,
        #[command(flatten)]
        w: Workload,
        #[command(flatten)]
        user: user_guest::RunOpts,
    },
    /// Our fork / fault / copy / reset paths side by side with the kernel's.
    Bench(BenchArgs),
    /// Snapshot files: save a guest, restore it in another process, inspect a file.
    Snapshot {
        #[command(subcommand)]
        cmd: snapshot::SnapshotCmd,
    },
    /// Snapshot-fuzz an SDK guest: reset per input, coverage from a shared map.
    Fuzz(fuzz::FuzzArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// Resident sizes (MiB) of the fork comparison, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = [64u64, 1024],
          value_parser = clap::value_parser!(u64).range(1..=4096))]
    sizes: Vec<u64>,
    /// Repetitions per measurement (medians are reported).
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u64).range(1..=1000))]
    reps: u64,
    /// Pages per fault / copy-on-write pass.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=262_144))]
    pages: u64,
    /// Dirtied-page counts of the reset comparison, comma separated (each <= --pages).
    #[arg(long, value_delimiter = ',', default_values_t = [16u64, 256, 4096],
          value_parser = clap::value_parser!(u64).range(1..=262_144))]
    dirty: Vec<u64>,
    /// Row groups to run, comma separated (fork, pool, faults, cow, prefetch, reset, snapshot,
    /// restore, fleet, fuzz, fuzz-crash); all by default.
    #[arg(long, value_delimiter = ',')]
    groups: Vec<String>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

fn parse_children(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of children"))?;
    if n == 0 || n > MAX_CHILDREN {
        return Err(format!("children must be 1..={MAX_CHILDREN}"));
    }
    Ok(n)
}

fn parse_table_mib(s: &str) -> Result<u64, String> {
    let n: u64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a size in MiB"))?;
    if n == 0 || n > MAX_TABLE_MIB || !n.is_power_of_two() {
        return Err(format!(
            "table size must be a power of two between 1 and {MAX_TABLE_MIB} MiB"
        ));
    }
    Ok(n)
}

fn options(children: usize, w: &Workload, reset: bool) -> DemoOptions {
    DemoOptions {
        children,
        table_mib: w.table_mib,
        keys: w.keys,
        requests: w.requests,
        reset,
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), guest_vm::Error> {
    let s = serde_json::to_string_pretty(v)
        .map_err(|e| guest_vm::Error::InvalidArgs(format!("JSON output: {e}")))?;
    println!("{s}");
    Ok(())
}

fn demo(opts: &DemoOptions, json: bool) -> Result<bool, guest_vm::Error> {
    let report = demo::run(opts)?;
    if json {
        print_json(&report)?;
    } else {
        print!("{}", demo_report::render(&report));
    }
    Ok(report.passed)
}

fn run(cmd: Cmd) -> Result<bool, guest_vm::Error> {
    match cmd {
        Cmd::Demo { children, w } => demo(&options(children, &w, true), w.json),
        Cmd::Fork { children, w, user } if user.g.guest.is_some() => {
            user_guest::fork(&user, children, w.json)
        }
        Cmd::Run { w, user, .. } if user.g.guest.is_some() => user_guest::run(&user, w.json),
        Cmd::Fork { children, w, .. } => demo(&options(children, &w, false), w.json),
        Cmd::Run {
            seed,
            no_prefault,
            w,
            ..
        } => {
            let r = run::run(&options(1, &w, false), seed, !no_prefault)?;
            if w.json {
                print_json(&r)?;
            } else {
                println!(
                    "guest: {} MiB RAM, {} buckets, {} keys; boot {:.1} ms, fill {:.1} ms",
                    r.guest_mib, r.buckets, r.keys, r.boot_ms, r.fill_ms
                );
                println!(
                    "served {} requests ({} put, {} get, {} del) in {:.1} ms, all matched the \
                     model; checksum {:#018x}",
                    r.counts.requests,
                    r.counts.puts,
                    r.counts.gets,
                    r.counts.dels,
                    r.serve_ms,
                    r.checksum
                );
                println!(
                    "memory: {} pages resident ({} KiB), {} uffd faults",
                    r.memory.private_frames,
                    r.memory.private_frames * 4,
                    r.memory.uffd_missing + r.memory.uffd_wp
                );
            }
            Ok(true)
        }
        Cmd::Snapshot { cmd } => snapshot::run(cmd),
        Cmd::Fuzz(a) => fuzz::run(&a),
        Cmd::Bench(a) => {
            let opts = bench::BenchOptions {
                sizes_mib: a.sizes,
                reps: a.reps as usize,
                pages: a.pages,
                dirty: a.dirty,
                groups: a.groups,
            };
            let r = bench::run(&opts)?;
            if a.json {
                print_json(&r)?;
            } else {
                print!("{}", bench::print::render(&r));
            }
            Ok(true)
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli.cmd) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("guest-vm: error: {e}");
            if matches!(
                e,
                guest_vm::Error::KvmUnavailable(_) | guest_vm::Error::UffdUnavailable(_)
            ) {
                eprintln!(
                    "guest-vm: this command runs real KVM guests: it needs root, /dev/kvm and \
                     userfaultfd with write-protect support"
                );
            }
            println!("VERDICT: FAIL — {e}");
            ExitCode::from(1)
        }
    }
}
