//! Where the CPU goes, from `/proc`: this process's CPU by thread kind (runtime workers,
//! lapin's I/O thread) and its context switches, the CPU of the watched processes (the
//! daemon, the broker), and the machine's busy, total and steal time, sampled before and
//! after each run and turned into per-call figures ([`Run`]). The machine's figures are what
//! tells a quiet run from one other processes took CPU from.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::closed_loop::Report;

/// Wait until the whole machine used less than `pct` % of one CPU over 2 s (at most 10 min).
pub async fn wait_quiet(pct: f64) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let give_up = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        let a = Usage::now(&[]).machine;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let b = Usage::now(&[]).machine;
        let busy = 100.0 * cpus * (b.0 - a.0) as f64 / (b.1 - a.1).max(1) as f64;
        if busy < pct || std::time::Instant::now() > give_up {
            return;
        }
    }
}

/// CPU and context switches of this process's threads (by name) and of watched processes.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    /// Thread name (its kind, digits stripped) -> CPU ticks.
    threads: BTreeMap<String, u64>,
    /// Context switches of this process's threads.
    switches: u64,
    /// Watched name -> CPU ticks.
    watched: BTreeMap<String, u64>,
    /// "self" and watched name -> read and write system calls (`/proc/PID/io`).
    syscalls: BTreeMap<String, u64>,
    /// Machine (busy, total, steal) jiffies; busy leaves idle, iowait and steal out.
    machine: (u64, u64, u64),
}

fn ticks(stat: &str) -> Option<u64> {
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn thread_kind(stat: &str) -> String {
    let name = stat
        .find('(')
        .zip(stat.rfind(')'))
        .map_or("?", |(a, b)| &stat[a + 1..b]);
    name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-')
        .to_owned()
}

impl Usage {
    pub fn now(watch: &[(String, u32)]) -> Usage {
        let mut usage = Usage::default();
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.flatten() {
                let path = task.path();
                if let Ok(stat) = std::fs::read_to_string(path.join("stat")) {
                    *usage.threads.entry(thread_kind(&stat)).or_default() +=
                        ticks(&stat).unwrap_or(0);
                }
                if let Ok(status) = std::fs::read_to_string(path.join("status")) {
                    usage.switches += status
                        .lines()
                        .filter(|l| l.contains("ctxt_switches:"))
                        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                        .sum::<u64>();
                }
            }
        }
        let io = |pid: &str| -> u64 {
            std::fs::read_to_string(format!("/proc/{pid}/io"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with("syscr:") || l.starts_with("syscw:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum()
        };
        usage.syscalls.insert("self".into(), io("self"));
        for (name, pid) in watch {
            usage.syscalls.insert(name.clone(), io(&pid.to_string()));
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            usage
                .watched
                .insert(name.clone(), ticks(&stat).unwrap_or(0));
        }
        if let Ok(stat) = std::fs::read_to_string("/proc/stat") {
            let v: Vec<u64> = stat
                .lines()
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            if v.len() >= 8 {
                let total: u64 = v[..8].iter().sum();
                usage.machine = (total - v[3] - v[4] - v[7], total, v[7]);
            }
        }
        usage
    }
}

/// One run's figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Run {
    pub system: String,
    pub round: usize,
    pub concurrency: usize,
    pub calls_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub errors: u64,
    pub error_kinds: BTreeMap<String, u64>,
    /// This process's CPU per call, µs, by thread kind and in total.
    pub cpu_us: BTreeMap<String, f64>,
    /// This process's context switches per call.
    pub switches_per_call: f64,
    /// Watched processes' CPU per call, µs.
    pub watched_us: BTreeMap<String, f64>,
    /// Read and write system calls per call, of this process ("self") and the watched ones:
    /// how well each side batches its socket I/O.
    pub syscalls_per_call: BTreeMap<String, f64>,
    pub steal_pct: f64,
    /// Other processes' CPU over the window, in % of one CPU (the noise).
    pub others_pct: f64,
}

/// The figures of one run. The usage window (`span` seconds) also covers the warm-up, run at
/// about the measured rate: its counts are scaled to the measured share, so they stay per call.
pub fn per_call(
    (before, after): (&Usage, &Usage),
    span: f64,
    report: &Report,
    name: &str,
    round: usize,
) -> Run {
    let wall = report.elapsed_secs.max(1e-9);
    let tick_us = 1e6 / 100.0; // USER_HZ: 100 on Linux
    let calls = report.calls.max(1) as f64;
    let busy = after.machine.0 - before.machine.0;
    let total = after.machine.1 - before.machine.1;
    let steal = after.machine.2 - before.machine.2;
    let window = |t: u64| t as f64 * tick_us;
    let mut cpu_us = BTreeMap::new();
    let mut all = 0.0;
    for (kind, &t) in &after.threads {
        let d = t.saturating_sub(before.threads.get(kind).copied().unwrap_or(0));
        all += window(d);
        cpu_us.insert(kind.clone(), window(d));
    }
    cpu_us.insert("total".into(), all);
    let watched_ticks: u64 = after
        .watched
        .iter()
        .map(|(k, &t)| t.saturating_sub(before.watched.get(k).copied().unwrap_or(0)))
        .sum();
    // CPU of every other process on the machine, in % of one CPU, over the window.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let others_pct = if total > 0 {
        let machine_pct = 100.0 * cpus * busy as f64 / total as f64;
        let ours_ticks = all / tick_us + watched_ticks as f64;
        (machine_pct - ours_ticks / span.max(wall)).max(0.0)
    } else {
        0.0
    };
    let scale = |x: f64| x * (wall / span.max(wall)) / calls;
    for v in cpu_us.values_mut() {
        *v = scale(*v);
    }
    cpu_us.retain(|k, v| k == "total" || *v >= 0.5);
    let watched_us = after
        .watched
        .iter()
        .map(|(k, &t)| {
            let d = t.saturating_sub(before.watched.get(k).copied().unwrap_or(0));
            (k.clone(), scale(window(d)))
        })
        .collect();
    Run {
        system: name.to_owned(),
        round,
        concurrency: report.concurrency,
        calls_per_sec: report.calls_per_sec,
        p50_us: report.p50_us,
        p99_us: report.p99_us,
        errors: report.errors,
        error_kinds: report.error_kinds.clone(),
        cpu_us,
        switches_per_call: scale(after.switches.saturating_sub(before.switches) as f64),
        watched_us,
        syscalls_per_call: after
            .syscalls
            .iter()
            .map(|(k, &n)| {
                let d = n.saturating_sub(before.syscalls.get(k).copied().unwrap_or(0));
                (k.clone(), scale(d as f64))
            })
            .collect(),
        others_pct,
        steal_pct: if total > 0 {
            100.0 * steal as f64 / total as f64
        } else {
            0.0
        },
    }
}
