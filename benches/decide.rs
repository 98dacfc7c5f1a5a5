//! Decision cost against policy size: matching must not grow with the
//! number of rules. Run with `cargo bench --bench decide`.

use std::fmt::Write;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use tollgate::telemetry::{Telemetry, TelemetryConfig};
use tollgate_core::engine::{decide, Attributes, Estimate};
use tollgate_core::gate::{CheckInput, Gate, GateConfig, ManualClock};
use tollgate_core::policy::{compile_sources, CompiledPolicy, SourceFile};
use tollgate_core::store::MemoryStore;

/// `n` rules in the shape of a real matrix: per-customer and per-team
/// quotas, per-workflow caps, model rules, plus a few global and glob rules
/// that every request is checked against.
fn policy(n: usize) -> CompiledPolicy {
    let mut yaml = String::from(
        "pricing:\n  unpriced_models: reject\n  models:\n    gpt-4o: { input_per_mtok: 2.5, output_per_mtok: 10 }\n  families:\n    premium: [\"gpt-5*\"]\nrules:\n",
    );
    let globals = [
        "  - id: global-prod\n    match: { environment: production }\n    per: [key]\n    limit: { spend: 500, window: monthly }\n",
        "  - id: any-team\n    match: { team: \"*\" }\n    per: [team]\n    limit: { spend: 2000, window: monthly }\n    enforcement: soft\n",
        "  - id: premium\n    match: { model_family: premium }\n    limit: { requests: 100, window: daily }\n",
        "  - id: per-action\n    match: { action: \"*\" }\n    per: [action]\n    limit: { requests: 2, window: 1h }\n",
    ];
    for g in globals.iter().take(n.min(4)) {
        yaml.push_str(g);
    }
    for i in 0..n.saturating_sub(4) {
        let (attr, value) = match i % 4 {
            0 => ("customer", format!("customer-{i}")),
            1 => ("team", format!("team-{i}")),
            2 => ("workflow", format!("workflow-{i}")),
            _ => ("key", format!("key-{i}")),
        };
        let _ = write!(
            yaml,
            "  - id: r{i}\n    match: {{ {attr}: {value} }}\n    limit: {{ tokens: 1000000, window: daily }}\n"
        );
    }
    compile_sources(&[SourceFile {
        name: "bench.yaml".to_string(),
        text: yaml,
    }])
    .unwrap_or_else(|e| panic!("{e}"))
}

fn request() -> (Attributes, Estimate) {
    let attrs = Attributes {
        key: Some("key-3".to_string()),
        team: Some("team-1".to_string()),
        customer: Some("customer-0".to_string()),
        workflow: Some("workflow-2".to_string()),
        environment: Some("production".to_string()),
        model: Some("gpt-4o".to_string()),
        action: Some("act-1".to_string()),
        ..Default::default()
    };
    let estimate = Estimate {
        input_tokens: Some(1200),
        output_tokens: Some(800),
        ..Default::default()
    };
    (attrs, estimate)
}

fn bench(c: &mut Criterion) {
    let (attrs, estimate) = request();
    let now = 1_795_000_000_000;
    for n in [10usize, 1_000, 10_000] {
        let p = policy(n);
        let plan = decide::plan(&p, &attrs, &estimate, now).unwrap();
        assert_eq!(
            plan.candidates[0].ops.len(),
            7,
            "the same 7 rules match at every size"
        );
        c.bench_function(&format!("plan/{n}-rules"), |b| {
            b.iter(|| {
                decide::plan(black_box(&p), black_box(&attrs), black_box(&estimate), now).unwrap()
            })
        });
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let gate = Gate::new(
        policy(10_000),
        Arc::new(MemoryStore::default()),
        Arc::new(ManualClock::new(now)),
        GateConfig::default(),
    );
    let mut i = 0u64;
    c.bench_function("check-memory-store/10000-rules", |b| {
        b.iter(|| {
            i += 1;
            rt.block_on(gate.check(varied(i))).unwrap()
        })
    });

    // The same with what `serve` adds: the Prometheus recorder, tracked
    // scopes (the fresh action per request overflows the cap every time,
    // the worst case) and reservations in flight.
    let telemetry = Arc::new(Telemetry::new(TelemetryConfig {
        max_scopes: tollgate::telemetry::DEFAULT_MAX_SCOPES,
        reservation_ttl: GateConfig::default().reservation_ttl,
        audit: None,
    }));
    telemetry.set_prometheus(tollgate::telemetry::install_prometheus().unwrap());
    let observed = Gate::new(
        policy(10_000),
        Arc::new(MemoryStore::default()),
        Arc::new(ManualClock::new(now)),
        GateConfig::default(),
    )
    .with_observer(telemetry.clone());
    c.bench_function("check-memory-store-with-metrics/10000-rules", |b| {
        b.iter(|| {
            i += 1;
            rt.block_on(observed.check(varied(i))).unwrap()
        })
    });
    telemetry.upkeep();

    // What the spend account adds to a call: its tag on the reservation,
    // the estimate at check, the move at settle. The same check and
    // settle with the account off and on, side by side.
    for account in [false, true] {
        let gate = Gate::new(
            policy(100),
            Arc::new(MemoryStore::default()),
            Arc::new(ManualClock::new(now)),
            GateConfig {
                spend_account: account,
                ..GateConfig::default()
            },
        );
        let used = tollgate_core::gate::ActualUsage {
            input_tokens: 120,
            output_tokens: 80,
            ..Default::default()
        };
        let name = if account { "on" } else { "off" };
        c.bench_function(&format!("check-and-settle/spend-account-{name}"), |b| {
            b.iter(|| {
                i += 1;
                let d = rt.block_on(gate.check(varied(i))).unwrap();
                if let Some(id) = d.reservation_id {
                    rt.block_on(gate.settle(&id, &used)).unwrap();
                }
                if i.is_multiple_of(1_000) {
                    rt.block_on(gate.flush_spend()).unwrap();
                }
            })
        });
    }
}

fn varied(i: u64) -> CheckInput {
    let (mut attrs, estimate) = request();
    // A fresh action each time so the per-action budget never blocks.
    attrs.action = Some(format!("act-{i}"));
    attrs.customer = Some(format!("customer-{}", (i % 2_500) * 4));
    CheckInput {
        attributes: attrs,
        estimate,
        ..Default::default()
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
