//! The AFL++ baseline of the fuzz rows (`fuzz-execs-{parser,warm}-aflpp`): `afl-fuzz` (Debian's
//! `afl++`, 4.04c) fuzzing the native build of the same target code in its fork-server mode,
//! its time per input read from its own statistics.
//!
//! The harness (`guest/aflpp/harness.rs`, built by build.rs as `OUT_DIR/aflpp-NAME` with
//! SanitizerCoverage trace-pc-guard and AFL++'s runtime) defers the fork server until after
//! the target's `setup()`, like the guest's `snapshot_here`: each input is one fork of a process
//! holding the built state. AFL++ runs its own mutator from the target's seed (not the bench's
//! fixed input sequence), so the inputs differ from the other rows' — the time per input is
//! compared, not the inputs.
//!
//! One `afl-fuzz -V SECS` run per row in a scratch directory (removed afterwards); the time
//! per input is `1e6 / execs_per_sec` of `default/fuzzer_stats` (AFL++'s executions over its
//! whole run, start-up and calibration included). A missing `afl-fuzz` or harness is an error
//! naming the install step, never a skipped row.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guest_vm::{Error, Result};

/// The install step the errors name.
const INSTALL: &str = "install AFL++ with `ci/setup.sh afl++` (or `apt-get install afl++`)";

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bad(msg: String) -> Error {
    Error::BadState(format!("fuzz bench, AFL++: {msg}"))
}

/// `afl-fuzz` on `PATH`, or an error naming the install step.
fn afl_fuzz() -> Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("afl-fuzz"))
        .find(|p| p.is_file())
        .ok_or_else(|| bad(format!("afl-fuzz is not on PATH: {INSTALL}")))
}

/// A field of a `fuzzer_stats` file (`name   : value` lines).
fn stat(stats: &str, name: &str) -> Option<f64> {
    stats.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == name).then(|| v.trim().parse().ok())?
    })
}

/// One afl-fuzz run's figures.
pub struct AflRun {
    /// µs per execution (`1e6 / execs_per_sec`).
    pub us_per_exec: f64,
    /// Executions done.
    pub execs: u64,
}

/// Runs `afl-fuzz` for `secs` seconds on `harness` (an `OUT_DIR/aflpp-NAME` path) from `seed`,
/// with `limit` per input.
pub fn run(name: &str, harness: &Path, seed: &[u8], secs: u64, limit: Duration) -> Result<AflRun> {
    let afl = afl_fuzz()?;
    if !harness.is_file() {
        return Err(bad(format!(
            "the harness {} was not built (build.rs builds it when /usr/lib/afl/afl-compiler-rt.o \
             exists): {INSTALL}, then rebuild (`touch guest-vm/build.rs`)",
            harness.display()
        )));
    }
    let dir = Scratch(std::env::temp_dir().join(format!(
        "guest-vm-bench-aflpp-{}-{name}",
        std::process::id()
    )));
    let _ = std::fs::remove_dir_all(&dir.0);
    let (seeds, out) = (dir.0.join("in"), dir.0.join("out"));
    std::fs::create_dir_all(&seeds)
        .and_then(|()| std::fs::write(seeds.join("seed"), seed))
        .map_err(|e| bad(format!("scratch {}: {e}", dir.0.display())))?;
    let mut child = Command::new(&afl)
        .arg("-i")
        .arg(&seeds)
        .arg("-o")
        .arg(&out)
        .args(["-V", &secs.to_string()])
        .args(["-t", &limit.as_millis().to_string(), "-m", "none"])
        .arg("--")
        .arg(harness)
        // No UI on a pipe; no CPU binding (the bench's other threads share the cores); this
        // host's CPU governor and core_pattern are not AFL++'s business here.
        .env("AFL_NO_UI", "1")
        .env("AFL_SKIP_CPUFREQ", "1")
        .env("AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES", "1")
        .env("AFL_NO_AFFINITY", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| bad(format!("running {}: {e}", afl.display())))?;
    // afl-fuzz stops itself after `secs`; a run far past that is stuck.
    let deadline = Instant::now() + Duration::from_secs(secs + 120);
    let out_text = std::thread::scope(|s| {
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let so = s.spawn(move || read_all(stdout));
        let se = s.spawn(move || read_all(stderr));
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break Ok(st),
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break Err(bad(format!("afl-fuzz ran past {} s", secs + 120)));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => break Err(bad(format!("waiting for afl-fuzz: {e}"))),
            }
        };
        let text = format!(
            "{}{}",
            so.join().unwrap_or_default(),
            se.join().unwrap_or_default()
        );
        status.map(|st| (st, text))
    });
    let (status, text) = out_text?;
    let tail = |t: &str| {
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    };
    if !status.success() {
        return Err(bad(format!("afl-fuzz failed ({status}):\n{}", tail(&text))));
    }
    let stats_path = out.join("default/fuzzer_stats");
    let stats = std::fs::read_to_string(&stats_path)
        .map_err(|e| bad(format!("{}: {e}\n{}", stats_path.display(), tail(&text))))?;
    let execs = stat(&stats, "execs_done").unwrap_or(0.0);
    let eps = stat(&stats, "execs_per_sec").unwrap_or(0.0);
    if execs < 1.0 || eps <= 0.0 {
        return Err(bad(format!(
            "afl-fuzz ran no inputs (execs_done {execs}, execs_per_sec {eps}):\n{}",
            tail(&text)
        )));
    }
    Ok(AflRun {
        us_per_exec: 1e6 / eps,
        execs: execs as u64,
    })
}

fn read_all(r: Option<impl std::io::Read>) -> String {
    let mut s = String::new();
    if let Some(mut r) = r {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        s = String::from_utf8_lossy(&buf).into_owned();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::stat;

    #[test]
    fn reads_fuzzer_stats_fields() {
        let s = "start_time        : 1\nexecs_done        : 13391\nexecs_per_sec     : 2674.46\n";
        assert_eq!(stat(s, "execs_done"), Some(13391.0));
        assert_eq!(stat(s, "execs_per_sec"), Some(2674.46));
        assert_eq!(stat(s, "run_time"), None);
    }
}
