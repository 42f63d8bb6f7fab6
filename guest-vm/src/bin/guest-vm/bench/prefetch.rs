//! The working-set prefetch row (`prefetch-second-child`): a first child of a snapshot runs the
//! write loop with recording on (every page a copy-on-write demand fault); a second child of
//! the same snapshot gets that recorded set installed in bulk before it runs (`Guest::prefetch`,
//! written pages copied ahead), then runs the same loop. Both per page of the loop, median of
//! `reps`; the second child's time includes its prefetch.

use super::{median, per_page, progress, row, run_done, write_guest, BenchOptions, Row};
use guest_vm::{Error, HostFrames, Result};

pub(super) fn prefetch_rows(
    o: &BenchOptions,
    frames: &HostFrames,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let n = o.pages;
    progress(&format!(
        "prefetch: second child of a snapshot with the first child's {n}-page working set"
    ));
    let mut parent = write_guest(frames, n)?;
    let entry = parent.snapshot()?;
    run_done(&mut parent)?;
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for _ in 0..o.reps {
        let mut a = parent.fork(&entry)?;
        a.vmar().set_recording(true);
        first.push(per_page(run_done(&mut a)?, n));
        let set = a.vmar().recorded();
        drop(a);
        if set.written() < n as usize {
            return Err(Error::BadState(format!(
                "recorded {} written pages of {n}",
                set.written()
            )));
        }
        let mut b = parent.fork(&entry)?;
        let t = std::time::Instant::now();
        b.prefetch(&set, true)?;
        let pre = t.elapsed();
        second.push(per_page(pre + run_done(&mut b)?, n));
        drop(b);
    }
    rows.push(row(
        "prefetch-second-child",
        "second child of a snapshot, per page of its loop".into(),
        "recorded working set prefetched (writes copied ahead) + run",
        median(&second),
        "first child: demand COW faults",
        median(&first),
    ));
    Ok(())
}
