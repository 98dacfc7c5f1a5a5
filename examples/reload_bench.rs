//! Reload cost for a large policy, and decision latency while reloads run.
//!
//! cargo run --release --example reload_bench -- 10000
//!
//! Prints the time to read, validate, compile and swap a policy of N rules
//! (median and max of 20 reloads), and the p50/p99 latency of decisions
//! made on another thread, first with no reloads, then while reloads run
//! back to back.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::reload::{self, ReloadConfig, ReloadOutcome, Reloader};
use tollgate_core::engine::Attributes;
use tollgate_core::gate::{CheckInput, Gate, GateConfig, SystemClock};
use tollgate_core::store::MemoryStore;

fn policy(n: usize, cap: u64) -> String {
    let mut yaml = String::from("rules:\n");
    for i in 0..n {
        let attr = ["customer", "team", "workflow", "key"][i % 4];
        let _ = write!(
            yaml,
            "  - id: r{i}\n    description: rule {i}\n    match: {{ {attr}: v{i} }}\n    per: [user]\n    limit: {{ tokens: {cap}, window: daily }}\n    alerts: [50, 90]\n"
        );
    }
    yaml
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Decisions on this thread until `stop`; returns their latencies.
fn hammer(gate: Arc<Gate>, stop: Arc<AtomicBool>) -> Vec<Duration> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut out = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let input = CheckInput {
            attributes: Attributes {
                customer: Some(format!("v{}", (i % 2_500) * 4)),
                user: Some(format!("u{}", i % 100)),
                ..Default::default()
            },
            ..Default::default()
        };
        let started = Instant::now();
        rt.block_on(gate.check(input)).expect("decision");
        out.push(started.elapsed());
        // A steady request rate, not a busy loop, so that the latency
        // measured is a request's, not the scheduler's.
        std::thread::sleep(Duration::from_micros(200));
    }
    out
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, policy(n, 1_000_000)).unwrap();
    let dirs = vec![dir.path().to_path_buf()];
    let gate = Arc::new(Gate::new(
        reload::load(&dirs, false).unwrap(),
        Arc::new(MemoryStore::default()),
        Arc::new(SystemClock),
        GateConfig::default(),
    ));
    let reloader = Reloader::new(
        gate.clone(),
        ReloadConfig {
            dirs,
            debounce: reload::DEFAULT_DEBOUNCE,
            rescan_every: reload::DEFAULT_RESCAN,
            allow_empty: false,
        },
    );
    let texts = [policy(n, 2_000_000), policy(n, 3_000_000)];

    // Reload time alone.
    let mut times = Vec::new();
    for i in 0..20 {
        std::fs::write(&file, &texts[i % 2]).unwrap();
        let started = Instant::now();
        let outcome = reloader.reload_now();
        times.push(started.elapsed());
        assert!(
            matches!(outcome, ReloadOutcome::Applied { .. }),
            "{outcome:?}"
        );
    }
    times.sort();
    println!(
        "reload of {n} rules ({} KiB): median {:.1} ms, max {:.1} ms",
        texts[0].len() / 1024,
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3
    );

    for (label, reloading) in [("no reloads", false), ("reloads back to back", true)] {
        let stop = Arc::new(AtomicBool::new(false));
        let worker = {
            let (gate, stop) = (gate.clone(), stop.clone());
            std::thread::spawn(move || hammer(gate, stop))
        };
        let until = Instant::now() + Duration::from_secs(3);
        let mut reloads = 0;
        while Instant::now() < until {
            if reloading {
                std::fs::write(&file, &texts[reloads % 2]).unwrap();
                reloader.reload_now();
                reloads += 1;
            } else {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        stop.store(true, Ordering::Relaxed);
        let mut lat = worker.join().unwrap();
        lat.sort();
        println!(
            "decisions, {label}: {} decisions, {reloads} reloads, p50 {:.1} µs, p99 {:.1} µs",
            lat.len(),
            percentile(&lat, 0.5).as_secs_f64() * 1e6,
            percentile(&lat, 0.99).as_secs_f64() * 1e6
        );
    }
}
