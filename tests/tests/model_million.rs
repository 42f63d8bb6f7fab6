//! The million-operation run of the Vmar model (`conformance::model`): seeded episodes of
//! random operations on the EPT and NPT software backends, each checked against the byte-level
//! reference after every operation (results) and every 16 (full check), each ending with the
//! teardown accounting check (no data or table frame left).
//!
//! Size: `GUESTMEM_MODEL_OPS` operations per backend (default 1,000,000 in release builds,
//! 20,000 in debug builds so the normal suite stays fast); `GUESTMEM_MODEL_SEED` picks the
//! first seed (default 1). CI runs it in release: `cargo test --release -p conformance --test
//! model_million`.

use std::time::Instant;

use conformance::model::{ept_table, npt_table, Harness, Options, Rng, Setup, Stats};

const EPISODE: u64 = 2_000;

fn total_ops() -> u64 {
    let default = if cfg!(debug_assertions) {
        20_000
    } else {
        1_000_000
    };
    std::env::var("GUESTMEM_MODEL_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn first_seed() -> u64 {
    std::env::var("GUESTMEM_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

fn run<S: ept::Stage2 + Send + 'static>(name: &str, setup: fn() -> Setup<S>) {
    let total = total_ops();
    let start = Instant::now();
    let mut sum = Stats::default();
    let mut seed = first_seed();
    let mut done = 0;
    while done < total {
        let opts = Options {
            root_pages: 48,
            check_every: 16,
            max_ops: EPISODE.min(total - done),
            pagers: false,
        };
        let mut h = Harness::new(setup(), opts);
        let mut rng = Rng::new(seed);
        h.run(&mut rng);
        let s = h.finish();
        done += s.ops;
        sum.ops += s.ops;
        sum.errors += s.errors;
        sum.full_checks += s.full_checks;
        for (k, (ok, err)) in s.by_op {
            let e = sum.by_op.entry(k).or_default();
            e.0 += ok;
            e.1 += err;
        }
        seed += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{name}: {} operations ({} returned errors, {} full checks) in {} episodes, {secs:.1} s ({:.0} ops/s)",
        sum.ops,
        sum.errors,
        sum.full_checks,
        seed - first_seed(),
        sum.ops as f64 / secs
    );
    for (k, (ok, err)) in &sum.by_op {
        println!("  {k:<16} {ok:>8} ok {err:>8} failed");
    }
    assert!(sum.ops >= total);
}

#[test]
fn ept_model_operations() {
    run("ept", || Setup::plain(ept_table));
}

#[test]
fn npt_model_operations() {
    run("npt", || Setup::plain(npt_table));
}
