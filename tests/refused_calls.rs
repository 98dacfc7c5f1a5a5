//! A call that is refused because the store answered too late is never
//! charged. The Redis server is paused with SIGSTOP past the store timeout
//! during a reserve, then resumed: the reserve it was sent still runs, and
//! the gate takes back what it reserved.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{at, eventually, policy, RedisServer};
use tollgate_core::engine::{Attributes, Estimate, Verdict};
use tollgate_core::gate::{CheckInput, Gate, GateConfig, GateError, ManualClock};
use tollgate_core::store::StoreError;

const TIMEOUT: Duration = Duration::from_millis(150);

fn budget(on_store_error: &str) -> String {
    format!(
        "
rules:
  - id: tokens-daily
    match: {{ team: '*' }}
    limit: {{ tokens: 1000, window: daily }}
    on_store_error: {on_store_error}
  - id: in-flight
    match: {{ team: '*' }}
    limit: {{ concurrent: 1 }}
    on_store_error: {on_store_error}
"
    )
}

fn call(request_id: &str) -> CheckInput {
    CheckInput {
        attributes: Attributes {
            team: Some("growth".to_string()),
            ..Default::default()
        },
        estimate: Estimate {
            input_tokens: Some(100),
            output_tokens: Some(0),
            ..Default::default()
        },
        request_id: Some(request_id.to_string()),
        ..Default::default()
    }
}

async fn gate_on(server: &RedisServer, on_store_error: &str) -> (Gate, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(at(2026, 12, 1, 12, 0)));
    let store = Arc::new(server.store().await);
    store.warm_up().await.expect("redis answers");
    let config = GateConfig {
        store_timeout: TIMEOUT,
        ..GateConfig::default()
    };
    let gate = Gate::new(
        policy(&budget(on_store_error)),
        store,
        clock.clone(),
        config,
    );
    (gate, clock)
}

async fn used(gate: &Gate) -> Vec<(String, String)> {
    gate.usage(
        Attributes {
            team: Some("growth".to_string()),
            ..Default::default()
        },
        None,
    )
    .await
    .expect("usage")
    .into_iter()
    .map(|c| (c.rule, c.used.to_string()))
    .collect()
}

fn counters(tokens: &str, in_flight: &str) -> Vec<(String, String)> {
    let mut v = vec![
        ("in-flight".to_string(), in_flight.to_string()),
        ("tokens-daily".to_string(), tokens.to_string()),
    ];
    v.sort();
    v
}

async fn sorted_used(gate: &Gate) -> Vec<(String, String)> {
    let mut v = used(gate).await;
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserve_that_outlives_the_timeout_is_taken_back_and_a_retry_is_charged_once() {
    let server = RedisServer::start();
    let (gate, _clock) = gate_on(&server, "fail_closed").await;

    server.signal("STOP");
    let started = Instant::now();
    let refused = gate.check(call("call-1")).await;
    let waited = started.elapsed();
    // The client retries (same request id) while Redis is still paused.
    let retried = gate.check(call("call-1")).await;
    server.signal("CONT");

    assert!(
        matches!(refused, Err(GateError::Store(StoreError::Timeout(_)))),
        "a paused store fails closed: {refused:?}"
    );
    assert!(
        waited < TIMEOUT + Duration::from_millis(250),
        "the refusal came after {waited:?}, past the {TIMEOUT:?} timeout"
    );
    assert!(
        matches!(retried, Err(GateError::Store(StoreError::Timeout(_)))),
        "{retried:?}"
    );

    // Both late reserves run once Redis resumes; both are taken back.
    let mut last = Vec::new();
    let refunded = eventually(Duration::from_secs(5), || {
        last = futures_lite_block(sorted_used(&gate));
        last == counters("0", "0")
    });
    assert!(refunded, "the refused calls are still charged: {last:?}");

    // A retry now is decided afresh (the request id does not replay the
    // withdrawn reservation) and charged exactly once.
    let d = gate.check(call("call-1")).await.expect("decision");
    assert_eq!(d.verdict, Verdict::Allow, "{d:?}");
    assert_eq!(sorted_used(&gate).await, counters("100", "1"));
    let again = gate.check(call("call-1")).await.expect("decision");
    assert_eq!(
        again.reservation_id, d.reservation_id,
        "a replay of the same call"
    );
    assert_eq!(
        sorted_used(&gate).await,
        counters("100", "1"),
        "not charged twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_allowed_by_fail_open_keeps_its_estimate_and_frees_its_slot() {
    let server = RedisServer::start();
    let (gate, _clock) = gate_on(&server, "fail_open").await;

    server.signal("STOP");
    let allowed = gate.check(call("call-2")).await;
    server.signal("CONT");
    let allowed = allowed.expect("fail open allows");
    assert_eq!(allowed.verdict, Verdict::Allow);
    assert_eq!(
        allowed.reservation_id, None,
        "nothing the caller could settle"
    );

    // The call ran, so the late reserve's estimate stays charged; nobody
    // will settle it, so its concurrency slot is given back at once.
    let mut last = Vec::new();
    let done = eventually(Duration::from_secs(5), || {
        last = futures_lite_block(sorted_used(&gate));
        last == counters("100", "0")
    });
    assert!(
        done,
        "expected the estimate kept and the slot freed: {last:?}"
    );
}

/// Runs a future to completion from a synchronous `eventually` closure,
/// on a runtime of its own (the test's runtime is busy awaiting).
fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}
