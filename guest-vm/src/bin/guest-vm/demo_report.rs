//! Human-readable rendering of a `DemoReport`: a summary, one table row per child, the checks,
//! and the verdict line (`VERDICT: PASS ...` / `VERDICT: FAIL ...`, always the last line).

use std::fmt::Write;

use crate::demo::DemoReport;

fn kib(pages: u64) -> u64 {
    pages * guest_vm::PAGE_SIZE / 1024
}

/// The verdict line of `r`.
pub fn verdict(r: &DemoReport) -> String {
    let failed: Vec<&str> = r
        .checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.name.as_str())
        .collect();
    if failed.is_empty() {
        format!(
            "VERDICT: PASS — {} concurrent children isolated (each = snapshot + only its own \
             writes), parent unchanged{}{}, all frames returned",
            r.children.len(),
            if r.options.reset {
                ", reset restores the snapshot"
            } else {
                ""
            },
            if r.snapshot_file.is_some() {
                ", saved file restores, serves and forks isolated"
            } else {
                ""
            }
        )
    } else {
        format!("VERDICT: FAIL — {}", failed.join("; "))
    }
}

/// The whole report as text.
pub fn render(r: &DemoReport) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "guest-vm demo: snapshot / fork / reset of a KVM key-value store guest"
    );
    let _ = writeln!(
        o,
        "  guest: {} MiB RAM, hash table {} MiB ({} buckets), {} keys",
        r.guest_mib, r.options.table_mib, r.buckets, r.keys
    );
    let _ = writeln!(
        o,
        "  boot {:.1} ms; table prefaulted by the VMM ({} pages, {:.1} ms, no exits); fill {:.1} ms",
        r.boot_ms, r.prefault_pages, r.prefault_ms, r.fill_ms
    );
    let _ = writeln!(
        o,
        "  parent: {} pages resident ({} KiB), {} uffd faults; snapshot checksum {:#018x}",
        r.parent_memory.private_frames,
        kib(r.parent_memory.private_frames),
        r.parent_memory.uffd_missing + r.parent_memory.uffd_wp,
        r.snapshot_checksum
    );
    let _ = writeln!(
        o,
        "  snapshot (vCPU state) {:.3} ms; fork median {:.2} ms per child (VM + vCPU + Vmar fork)",
        r.snapshot_ms, r.fork_ms_median
    );
    let _ = writeln!(
        o,
        "  {} children ran concurrently ({} requests each, own vCPU threads) in {:.1} ms wall",
        r.children.len(),
        r.options.requests,
        r.concurrent_run_ms
    );
    let serial: f64 = r
        .children
        .iter()
        .filter_map(|c| c.run.as_ref().map(|x| x.elapsed_ms))
        .sum();
    let _ = writeln!(
        o,
        "  (the children's run times add up to {serial:.1} ms: {:.1}x overlap on this machine's \
         {} CPUs)",
        crate::measure::ratio(serial, r.concurrent_run_ms),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "  child  fork ms  requests  run ms  shared pg  copied pg  committed pg  resident KiB  \
         faults(uffd miss/wp)  reset ms  restored/dropped pg"
    );
    for c in &r.children {
        let m = &c.memory;
        let (reqs, run) = match &c.run {
            Some(x) => (
                x.counts.requests.to_string(),
                format!("{:.1}", x.elapsed_ms),
            ),
            None => ("FAILED".into(), "-".into()),
        };
        let _ = writeln!(
            o,
            "  {:>5}  {:>7.2}  {:>8}  {:>6}  {:>9}  {:>9}  {:>12}  {:>12}  {:>10}/{:<9}  {:>8}  {:>10}",
            c.index,
            c.fork_ms,
            reqs,
            run,
            m.shared_pages,
            m.copies,
            m.commits,
            c.resident_kib,
            m.uffd_missing,
            m.uffd_wp,
            c.reset_ms.map_or("-".into(), |v| format!("{v:.2}")),
            match (c.reset_restored_pages, c.reset_dropped_pages) {
                (Some(r), Some(d)) => format!("{r}/{d}"),
                _ => "-".into(),
            },
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "  memory: frames live {} at snapshot -> {} after the children (+{}), memfd resident \
         {} KiB -> {} KiB; {} at teardown",
        r.frames_live_at_snapshot,
        r.frames_live_after_children,
        r.frames_live_after_children - r.frames_live_at_snapshot,
        r.memfd_resident_kib_at_snapshot,
        r.memfd_resident_kib_after_children,
        r.frames_live_at_teardown
    );
    let shared_total = r.parent_memory.private_frames;
    let private_total: u64 = r.children.iter().map(|c| c.memory.private_frames).sum();
    let _ = writeln!(
        o,
        "          {} children hold {} KiB of their own on top of {} KiB shared \
         ({} KiB if each child had a full copy)",
        r.children.len(),
        kib(private_total),
        kib(shared_total),
        kib(shared_total) * r.children.len() as u64
    );
    if let Some(m) = r.reset_ms_median {
        let _ = writeln!(o, "  reset median {m:.2} ms per child");
    }
    if let Some(f) = &r.snapshot_file {
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "  save -> restore -> fork: saved {} KiB ({} pages, working set {} pages) in {:.1} ms; \
             restored in {:.1} ms ({} pages prefetched)",
            f.file_kib,
            f.stored_pages,
            f.working_set_pages,
            f.save_ms,
            f.restore_ms,
            f.prefetched_pages
        );
        let _ = writeln!(
            o,
            "    restored guest served {} requests in {:.1} ms ({} demand faults); fork of it {:.2} \
             ms, its run {:.1} ms",
            r.options.requests,
            f.restored_run_ms,
            f.restored_demand_faults,
            f.fork_ms,
            f.fork_run_ms
        );
    }
    if let Some(d) = &r.dma {
        let _ = writeln!(o);
        for line in d.lines() {
            let _ = writeln!(o, "  {line}");
        }
    }
    let _ = writeln!(o);
    for c in &r.checks {
        let _ = writeln!(
            o,
            "  [{}] {}: {}",
            if c.passed { " ok " } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "{}", verdict(r));
    o
}
