//! The report: one Markdown table per concurrency, with each system's medians over the rounds
//! and its calls/s against the first system's run of the same round (paired: the runs of one
//! round stand next to each other in time, so a round the machine was busier in moves both
//! sides of its ratio).

use crate::usage::Run;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

pub fn table(runs: &[Run], systems: &[String], concurrency: usize) {
    let mine: Vec<&Run> = runs
        .iter()
        .filter(|r| r.concurrency == concurrency)
        .collect();
    let of = |s: &str| -> Vec<&Run> { mine.iter().copied().filter(|r| r.system == s).collect() };
    let base = &systems[0];
    println!(
        "\n### {concurrency} in flight (medians of {} rounds)\n",
        of(base).len()
    );
    println!(
        "| system | calls/s | vs {base} (per round) | p50 µs | p99 µs | CPU µs/call (threads) | \
         switches/call | watched µs/call | other processes, % CPU | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for system in systems {
        let rs = of(system);
        let cps = median(rs.iter().map(|r| r.calls_per_sec).collect());
        // Paired: this system's run against the first system's run of the same round.
        let ratios: Vec<f64> = rs
            .iter()
            .filter_map(|r| {
                of(base)
                    .into_iter()
                    .find(|b| b.round == r.round)
                    .map(|b| r.calls_per_sec / b.calls_per_sec)
            })
            .collect();
        let ratio_text = ratios
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut kinds: Vec<String> = rs.iter().flat_map(|r| r.cpu_us.keys().cloned()).collect();
        kinds.sort();
        kinds.dedup();
        let cpu = kinds
            .iter()
            .map(|k| {
                let v = median(
                    rs.iter()
                        .map(|r| r.cpu_us.get(k).copied().unwrap_or(0.0))
                        .collect(),
                );
                format!("{k} {v:.0}")
            })
            .collect::<Vec<_>>()
            .join(", ");
        let mut watched: Vec<String> = rs
            .iter()
            .flat_map(|r| r.watched_us.keys().cloned())
            .collect();
        watched.sort();
        watched.dedup();
        let watched = watched
            .iter()
            .map(|k| {
                let v = median(
                    rs.iter()
                        .map(|r| r.watched_us.get(k).copied().unwrap_or(0.0))
                        .collect(),
                );
                format!("{k} {v:.0}")
            })
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "| {system} | {cps:.0} | {:.2}× ({ratio_text}) | {:.0} | {:.0} | {cpu} | {:.1} | {watched} | {:.0} | {} |",
            median(ratios.clone()),
            median(rs.iter().map(|r| r.p50_us as f64).collect()),
            median(rs.iter().map(|r| r.p99_us as f64).collect()),
            median(rs.iter().map(|r| r.switches_per_call).collect()),
            median(rs.iter().map(|r| r.others_pct).collect()),
            rs.iter().map(|r| r.errors).sum::<u64>(),
        );
    }
}
