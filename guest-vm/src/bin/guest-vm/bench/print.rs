//! Human-readable rendering of a `BenchReport`: one line per comparison with both medians and
//! the ratio, grouped by what is compared.

use std::fmt::Write;

use super::BenchReport;

fn fmt_us(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.2} ms", v / 1000.0)
    } else {
        format!("{v:.2} us")
    }
}

/// The report as text (a Markdown table, so it can be pasted into the README).
pub fn render(r: &BenchReport) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "guest-vm bench: medians of {} runs; ratio = ours / baseline (lower is better for us)",
        r.options.reps
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "| measurement | ours | median | baseline | median | ratio |"
    );
    let _ = writeln!(o, "|---|---|---:|---|---:|---:|");
    for row in &r.rows {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {:.2}x |",
            row.what,
            row.ours,
            fmt_us(row.ours_us),
            row.baseline,
            fmt_us(row.baseline_us),
            row.ratio
        );
    }
    o
}
