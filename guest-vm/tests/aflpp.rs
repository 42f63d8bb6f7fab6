//! The fuzz bench's AFL++ harnesses (`guest/aflpp/harness.rs`, built by build.rs as
//! `OUT_DIR/aflpp-{http,warm}`): each target's seed exits 0 and its planted bug aborts, from
//! stdin and from a file argument, and `afl-fuzz` drives each in its deferred fork-server mode
//! for two seconds with executions done. No KVM is needed. A missing AFL++ (`afl-fuzz`, or the
//! runtime object the harnesses are linked with) fails the test, naming the install step.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

const INSTALL: &str = "install AFL++ (`ci/setup.sh afl++` or `apt-get install afl++`) and rebuild (`touch guest-vm/build.rs`)";

/// `(name, harness, seed, planted bug)`: the bench's seeds.
const HARNESSES: [(&str, &str, &[u8], &[u8]); 2] = [
    (
        "http",
        concat!(env!("OUT_DIR"), "/aflpp-http"),
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"PWN / HTTP/1.1\r\nHost: a\r\n\r\n",
    ),
    (
        "warm",
        concat!(env!("OUT_DIR"), "/aflpp-warm"),
        b"1 2 #ff",
        b"WARM 1",
    ),
];

fn harness(path: &str) -> &Path {
    let p = Path::new(path);
    assert!(p.is_file(), "AFL++ harness {path} not built: {INSTALL}");
    p
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("guest-vm-aflpp-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn on_stdin(h: &Path, input: &[u8]) -> ExitStatus {
    let mut child = Command::new(h)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("running the harness");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("writing the input");
    child.wait().expect("waiting for the harness")
}

#[test]
fn harness_aborts_on_the_planted_bug_only() {
    for (name, path, seed, bug) in HARNESSES {
        let h = harness(path);
        assert!(on_stdin(h, seed).success(), "{name}: the seed");
        assert_eq!(
            on_stdin(h, bug).signal(),
            Some(libc::SIGABRT),
            "{name}: the bug"
        );
        let dir = scratch(name);
        let file = dir.join("input");
        std::fs::write(&file, bug).expect("writing the input file");
        let st = Command::new(h)
            .arg(&file)
            .stdin(Stdio::null())
            .status()
            .expect("running the harness");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            st.signal(),
            Some(libc::SIGABRT),
            "{name}: the bug from a file"
        );
    }
}

#[test]
fn afl_fuzz_runs_each_harness_with_a_deferred_fork_server() {
    for (name, path, seed, _) in HARNESSES {
        let h = harness(path);
        let dir = scratch(&format!("fuzz-{name}"));
        std::fs::create_dir_all(dir.join("in")).expect("seed dir");
        std::fs::write(dir.join("in/seed"), seed).expect("seed");
        let out = Command::new("afl-fuzz")
            .arg("-i")
            .arg(dir.join("in"))
            .arg("-o")
            .arg(dir.join("out"))
            .args(["-V", "2", "-t", "2000", "-m", "none", "--"])
            .arg(h)
            .env("AFL_NO_UI", "1")
            .env("AFL_SKIP_CPUFREQ", "1")
            .env("AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES", "1")
            .env("AFL_NO_AFFINITY", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running afl-fuzz: {e}: {INSTALL}"));
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stats = std::fs::read_to_string(dir.join("out/default/fuzzer_stats"));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(out.status.success(), "{name}: afl-fuzz failed:\n{log}");
        assert!(
            log.contains("Deferred forkserver binary detected"),
            "{name}: not in deferred fork-server mode:\n{log}"
        );
        assert!(
            !log.contains("Persistent mode binary detected"),
            "{name}:\n{log}"
        );
        let stats = stats.unwrap_or_else(|e| panic!("{name}: no fuzzer_stats ({e}):\n{log}"));
        let execs: u64 = stats
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "execs_done").then(|| v.trim().parse().ok())?
            })
            .unwrap_or_else(|| panic!("{name}: no execs_done in\n{stats}"));
        assert!(execs > 0, "{name}: afl-fuzz ran no inputs:\n{stats}");
    }
}
