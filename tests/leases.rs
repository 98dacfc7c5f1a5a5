//! Leases across replicas, on a real `redis-server` and a real Redis
//! Cluster: each replica is a gate over a leasing store of its own, on the
//! same keys, as two `tollgate serve` processes would be. The guarantees
//! proved here are the ones docs/ARCHITECTURE.md states under Leases.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{at, gate_with, policy};
use tollgate_core::engine::{Attributes, Estimate, Verdict};
use tollgate_core::gate::{CheckInput, Clock, Gate, ManualClock};
use tollgate_core::store::{CounterStore, LeaseConfig, LeasedStore, RedisStore};

const CAP: &str = "
rules:
  - id: team-tokens
    per: [team]
    limit: { tokens: 1000, window: daily }
    alerts: [50, 80]
  - id: key-requests
    per: [key]
    limit: { requests: 1000000, window: daily }
";

fn input(team: &str, tokens: u64) -> CheckInput {
    CheckInput {
        attributes: Attributes {
            team: Some(team.to_string()),
            ..Default::default()
        },
        api_key: Some("sk-lease-test".to_string()),
        estimate: Estimate {
            input_tokens: Some(tokens),
            output_tokens: Some(0),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// One replica: a gate over a leasing store of its own.
struct Replica {
    gate: Arc<Gate>,
    store: Arc<LeasedStore>,
}

fn replica(redis: RedisStore, yaml: &str, clock: Arc<ManualClock>) -> Replica {
    let store = LeasedStore::start(redis, LeaseConfig::default());
    Replica {
        gate: Arc::new(gate_with(policy(yaml), store.clone(), clock)),
        store,
    }
}

enum Backend {
    Redis,
    Cluster,
}

async fn redis_store(backend: &Backend, prefix: &str) -> RedisStore {
    match backend {
        Backend::Redis => common::shared_redis().store(prefix).await,
        Backend::Cluster => common::shared_cluster().store(prefix).await,
    }
}

async fn replicas(
    backend: &Backend,
    prefix: &str,
    yaml: &str,
    clock: &Arc<ManualClock>,
) -> (Replica, Replica) {
    (
        replica(redis_store(backend, prefix).await, yaml, clock.clone()),
        replica(redis_store(backend, prefix).await, yaml, clock.clone()),
    )
}

/// What the team's counter holds as a report reads it: used, and leased.
async fn team_usage(gate: &Gate, team: &str) -> (String, String) {
    rule_usage(gate, "team-tokens", team).await
}

/// `rule`'s counter for `team`: used and leased.
async fn rule_usage(gate: &Gate, rule: &str, team: &str) -> (String, String) {
    let usage = gate
        .usage(
            Attributes {
                team: Some(team.to_string()),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
    let c = usage.iter().find(|c| c.rule == rule).unwrap();
    (c.used.to_string(), c.leased.to_string())
}

/// Sends `input()` to `gates` in turn until four in a row are denied;
/// how many were allowed. Fails past 2,000 requests.
async fn fill(gates: &[&Gate], input: impl Fn() -> CheckInput) -> u64 {
    let (mut allowed, mut denied_in_a_row) = (0, 0);
    for i in 0.. {
        let gate = gates[i % gates.len()];
        if gate.check(input()).await.unwrap().verdict == Verdict::Allow {
            allowed += 1;
            denied_in_a_row = 0;
        } else {
            denied_in_a_row += 1;
            if denied_in_a_row == 4 {
                break;
            }
        }
        assert!(i < 2000, "never filled");
    }
    allowed
}

/// Two replicas, 32 tasks each, 1 token a request against a cap of 1,000
/// with demand of 3,200: never more allowed than the cap, and once the
/// leases are back, the cap filled to the request.
async fn two_replicas_fill_a_cap_exactly_and_never_past_it(backend: Backend) {
    let clock = Arc::new(ManualClock::new(at(2026, 12, 1, 12, 0)));
    let prefix = format!("lease-fill-{}:", backend_name(&backend));
    let (a, b) = replicas(&backend, &prefix, CAP, &clock).await;
    let allowed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..64 {
        let gate = if t % 2 == 0 {
            a.gate.clone()
        } else {
            b.gate.clone()
        };
        let allowed = allowed.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                let d = gate.check(input("growth", 1)).await.expect("decision");
                if d.verdict == Verdict::Allow {
                    allowed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let during = allowed.load(Ordering::SeqCst);
    assert!(during <= 1000, "allowed {during} past a cap of 1000");
    // Whatever a replica still holds goes back (its lease lapses, or it
    // shuts down); demand after that fills the cap to the request.
    a.store.close(clock.now()).await.unwrap();
    b.store.close(clock.now()).await.unwrap();
    let after = fill(&[&a.gate, &b.gate], || input("growth", 1)).await;
    a.store.close(clock.now()).await.unwrap();
    b.store.close(clock.now()).await.unwrap();
    assert_eq!(
        during + after,
        1000,
        "the cap fills exactly: {during} then {after}"
    );
    assert_eq!(
        team_usage(&a.gate, "growth").await,
        ("1000".into(), "0".into())
    );
    let hits =
        a.store.stats().hits.load(Ordering::SeqCst) + b.store.stats().hits.load(Ordering::SeqCst);
    assert!(hits > 0, "some decisions were made from leases");
}

/// Sequential traffic far from the cap is decided almost entirely in the
/// process: fewer than 0.1 Redis calls per decision.
async fn far_from_a_cap_most_decisions_make_no_round_trip(backend: Backend) {
    let clock = Arc::new(ManualClock::new(at(2026, 12, 1, 12, 0)));
    let prefix = format!("lease-hits-{}:", backend_name(&backend));
    let big = CAP.replace("tokens: 1000,", "tokens: 100000000,");
    let (a, _b) = replicas(&backend, &prefix, &big, &clock).await;
    let decisions = 2000;
    for i in 0..decisions {
        if i % 100 == 0 {
            clock.advance(10);
        }
        let d = a.gate.check(input("growth", 10)).await.unwrap();
        assert_eq!(d.verdict, Verdict::Allow);
    }
    let stats = a.store.stats();
    let calls = stats.redis_calls.load(Ordering::SeqCst);
    let hits = stats.hits.load(Ordering::SeqCst);
    assert!(
        (calls as f64) < 0.1 * decisions as f64,
        "{calls} Redis calls for {decisions} decisions ({hits} from leases)"
    );
    // What a report shows: spent apart from what the lease still holds.
    let (used, leased) = team_usage(&a.gate, "growth").await;
    assert_eq!(used, (decisions * 10).to_string(), "leased {leased}");
    a.store.close(clock.now()).await.unwrap();
    assert_eq!(team_usage(&a.gate, "growth").await.1, "0");
}

/// Under steady demand a busy lease is renewed in the background before
/// it runs out or lapses: after the first refill no decision goes to
/// Redis, and what was spent is counted exactly once the leases are back.
async fn a_busy_lease_is_renewed_before_decisions_miss_it(backend: Backend) {
    let clock = Arc::new(ManualClock::new(at(2026, 12, 1, 12, 0)));
    let prefix = format!("lease-renew-{}:", backend_name(&backend));
    let cap = CAP.replace("tokens: 1000,", "tokens: 100000,");
    let (a, _b) = replicas(&backend, &prefix, &cap, &clock).await;
    let started = Instant::now();
    let mut decisions = 0;
    // Three seconds of real time (a lease lives two), one decision every
    // 5 ms, the gate's clock kept with real time.
    while started.elapsed() < Duration::from_secs(3) {
        let d = a.gate.check(input("growth", 1)).await.unwrap();
        assert_eq!(d.verdict, Verdict::Allow);
        decisions += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
        let behind = started.elapsed().as_millis() as i64 - (clock.now() - at(2026, 12, 1, 12, 0));
        clock.advance(behind.max(0));
    }
    let stats = a.store.stats();
    let misses = stats.misses.load(Ordering::SeqCst);
    let renewals = stats.renewals.load(Ordering::SeqCst);
    assert!(renewals >= 1, "renewed: {renewals}");
    assert!(
        misses <= 1,
        "{misses} of {decisions} decisions went to Redis ({renewals} renewals)"
    );
    a.store.close(clock.now()).await.unwrap();
    assert_eq!(
        team_usage(&a.gate, "growth").await,
        (decisions.to_string(), "0".into())
    );
}

/// Alerts at 50% and 80% fire once each across two replicas, however the
/// leases move the counter.
async fn each_alert_fires_once_across_replicas(backend: Backend) {
    let clock = Arc::new(ManualClock::new(at(2026, 12, 1, 12, 0)));
    let prefix = format!("lease-alerts-{}:", backend_name(&backend));
    let (a, b) = replicas(&backend, &prefix, CAP, &clock).await;
    let fired = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for t in 0..16 {
        let gate = if t % 2 == 0 {
            a.gate.clone()
        } else {
            b.gate.clone()
        };
        let fired = fired.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..100 {
                let d = gate.check(input("growth", 1)).await.unwrap();
                fired
                    .lock()
                    .unwrap()
                    .extend(d.alerts.iter().map(|c| c.threshold));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut fired = fired.lock().unwrap().clone();
    fired.sort_unstable();
    assert_eq!(fired, vec![50, 80], "each threshold once");
}

/// A reservation made from a lease on one replica is settled on the other
/// (a load balancer in front of the native API), once.
async fn a_reservation_made_from_a_lease_settles_on_another_replica(backend: Backend) {
    let clock = Arc::new(ManualClock::new(at(2026, 12, 1, 12, 0)));
    let prefix = format!("lease-settle-{}:", backend_name(&backend));
    let (a, b) = replicas(&backend, &prefix, CAP, &clock).await;
    // The first decision refills; the second is made from the lease.
    a.gate.check(input("growth", 10)).await.unwrap();
    let d = a.gate.check(input("growth", 10)).await.unwrap();
    assert!(
        a.store.stats().hits.load(Ordering::SeqCst) >= 1,
        "made from the lease"
    );
    let id = d.reservation_id.clone().expect("a reservation");
    let store: &dyn CounterStore = b.store.as_ref();
    let found = store.reservation(&id, clock.now()).await.unwrap();
    let ops = found.expect("the other replica finds it").ops;
    let actual: Vec<i64> = ops
        .iter()
        .map(|op| if op.amount == 10 { 3 } else { op.amount })
        .collect();
    assert_eq!(
        store.settle(&id, &actual, clock.now()).await.unwrap(),
        tollgate_core::store::SettleOutcome::Settled
    );
    assert_eq!(
        a.store.settle(&id, &actual, clock.now()).await.unwrap(),
        tollgate_core::store::SettleOutcome::AlreadySettled,
        "the replica that made it knows it was settled elsewhere only through Redis"
    );
    a.store.close(clock.now()).await.unwrap();
    b.store.close(clock.now()).await.unwrap();
    assert_eq!(
        team_usage(&a.gate, "growth").await,
        ("13".into(), "0".into())
    );
}

/// The same request id decided from leases on two replicas is charged
/// once, as soon as the batches land.
async fn a_request_id_decided_on_two_replicas_is_charged_once(backend: Backend) {
    let clock = Arc::new(ManualClock::new(at(2026, 12, 1, 12, 0)));
    let prefix = format!("lease-replay-{}:", backend_name(&backend));
    let (a, b) = replicas(&backend, &prefix, CAP, &clock).await;
    // Leases on both replicas first.
    a.gate.check(input("growth", 1)).await.unwrap();
    b.gate.check(input("growth", 1)).await.unwrap();
    let with_id = || CheckInput {
        request_id: Some("envoy-stream-7".to_string()),
        ..input("growth", 100)
    };
    let first = a.gate.check(with_id()).await.unwrap();
    let again_here = a.gate.check(with_id()).await.unwrap();
    assert_eq!(
        first.reservation_id, again_here.reservation_id,
        "replayed here"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.gate.check(with_id()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.store.close(clock.now()).await.unwrap();
    b.store.close(clock.now()).await.unwrap();
    assert_eq!(
        team_usage(&a.gate, "growth").await.0,
        "102",
        "1 + 1 + 100 once"
    );
}

/// A request id decided from a lease on one replica, and repeated on
/// another that decides in Redis (it holds no lease yet), is answered
/// there from what the first replica's batch wrote: charged once. On the
/// Cluster the decision's two counters are in two slots, so the second
/// replica reserves across slots and finds the outcome where the first
/// kept it.
async fn a_request_id_from_a_lease_is_replayed_by_a_replica_deciding_in_redis(backend: Backend) {
    let clock = Arc::new(ManualClock::new(at(2026, 12, 1, 12, 0)));
    let prefix = format!("lease-replay-redis-{}:", backend_name(&backend));
    let (a, b) = replicas(&backend, &prefix, CAP, &clock).await;
    a.gate.check(input("growth", 1)).await.unwrap();
    let with_id = || CheckInput {
        request_id: Some("envoy-stream-8".to_string()),
        ..input("growth", 2)
    };
    let first = a.gate.check(with_id()).await.unwrap();
    assert_eq!(
        a.store.stats().hits.load(Ordering::SeqCst),
        1,
        "made from the lease"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let again = b.gate.check(with_id()).await.unwrap();
    assert_eq!(
        b.store.stats().hits.load(Ordering::SeqCst),
        0,
        "decided in Redis"
    );
    assert_eq!(first.reservation_id, again.reservation_id, "replayed");
    a.store.close(clock.now()).await.unwrap();
    b.store.close(clock.now()).await.unwrap();
    assert_eq!(
        team_usage(&a.gate, "growth").await,
        ("3".into(), "0".into()),
        "1 + 2 once"
    );
}

/// With nothing to settle it (`settle: never`: ext_authz alone), a
/// decision made from a lease writes no reservation record, only its
/// request id's outcome. The same request id decided from leases on two
/// replicas at once is still charged once: the second takes back what it
/// charged on each counter.
async fn a_final_estimate_from_a_lease_has_no_record_and_is_charged_once(backend: Backend) {
    let clock = Arc::new(ManualClock::new(at(2026, 12, 1, 12, 0)));
    let prefix = format!("lease-final-{}:", backend_name(&backend));
    let (a, b) = replicas(&backend, &prefix, CAP, &clock).await;
    let final_input = |tokens| CheckInput {
        estimate_is_final: true,
        ..input("growth", tokens)
    };
    let hits = |r: &Replica| r.store.stats().hits.load(Ordering::SeqCst);
    // Leases on both replicas first.
    a.gate.check(final_input(1)).await.unwrap();
    b.gate.check(final_input(1)).await.unwrap();
    let d = a.gate.check(final_input(2)).await.unwrap();
    assert_eq!(d.verdict, Verdict::Allow);
    assert_eq!(hits(&a), 1, "made from the lease");
    let with_id = || CheckInput {
        request_id: Some("envoy-stream-9".to_string()),
        ..final_input(2)
    };
    let first = a.gate.check(with_id()).await.unwrap();
    let again_here = a.gate.check(with_id()).await.unwrap();
    assert_eq!(
        first.reservation_id, again_here.reservation_id,
        "replayed here"
    );
    // Before either batch lands, the other replica decides it too.
    b.gate.check(with_id()).await.unwrap();
    assert_eq!(hits(&b), 1, "made from the other replica's lease");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let id = d.reservation_id.expect("an id");
    for store in [&a.store, &b.store] {
        let store: &dyn CounterStore = store.as_ref();
        assert!(
            store.reservation(&id, clock.now()).await.unwrap().is_none(),
            "a final estimate made from a lease has no record"
        );
    }
    a.store.close(clock.now()).await.unwrap();
    b.store.close(clock.now()).await.unwrap();
    assert_eq!(
        team_usage(&a.gate, "growth").await,
        ("6".into(), "0".into()),
        "1 + 1 + 2, and 2 once"
    );
}

/// While another replica holds an unused lease, a request it would fit is
/// denied early; once that lease lapses (the holder went idle), it is
/// allowed. The time it took is within a lease lifetime and a batch.
async fn an_early_denial_lasts_no_longer_than_a_lease(backend: Backend) {
    let clock = Arc::new(ManualClock::new(at(2026, 12, 1, 12, 0)));
    let prefix = format!("lease-early-{}:", backend_name(&backend));
    let small = CAP.replace("tokens: 1000,", "tokens: 100,");
    let (a, b) = replicas(&backend, &prefix, &small, &clock).await;
    // A takes a lease: 1 of 100 spent, a quarter of the rest leased.
    assert_eq!(
        a.gate.check(input("growth", 1)).await.unwrap().verdict,
        Verdict::Allow
    );
    assert!(a.store.unused_on("team-tokens") > 0, "A holds a lease");
    // B asks for everything that is not spent: it fits only A's lease aside.
    let d = b.gate.check(input("growth", 99)).await.unwrap();
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(b.store.stats().early_denials.load(Ordering::SeqCst), 1);
    let started = Instant::now();
    let bound = Duration::from_millis(LeaseConfig::default().lifetime as u64 + 500);
    loop {
        // The clock moves with real time, as it would.
        clock.advance(50);
        tokio::time::sleep(Duration::from_millis(50)).await;
        if b.gate.check(input("growth", 99)).await.unwrap().verdict == Verdict::Allow {
            break;
        }
        assert!(
            started.elapsed() < bound,
            "still denied after {:?}",
            started.elapsed()
        );
    }
    eprintln!(
        "early denial lasted {:?} (lease lifetime {} ms)",
        started.elapsed(),
        LeaseConfig::default().lifetime
    );
}

/// With Redis paused, decisions inside a lease go on; past it, the rule's
/// store-error policy applies (here: fail closed).
/// (On a server of its own: pausing a node of the shared cluster would
/// stall every other test of this binary.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decisions_inside_a_lease_go_on_while_redis_is_down() {
    let server = common::RedisServer::start();
    let clock = Arc::new(ManualClock::new(at(2026, 12, 1, 12, 0)));
    let big = CAP.replace("tokens: 1000,", "tokens: 100000000,");
    let store = LeasedStore::start(server.store().await, LeaseConfig::default());
    let config = tollgate_core::gate::GateConfig {
        store_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let gate = Gate::new(policy(&big), store.clone(), clock.clone(), config);
    // Demand of 10 a request builds up a lease of at least 8 requests.
    for _ in 0..3 {
        assert_eq!(
            gate.check(input("growth", 10)).await.unwrap().verdict,
            Verdict::Allow
        );
    }
    server.signal("STOP");
    let mut inside = 0;
    let outcome = loop {
        match gate.check(input("growth", 10)).await {
            Ok(d) if d.verdict == Verdict::Allow => inside += 1,
            other => break other,
        }
        assert!(inside < 100_000, "a lease never runs out");
    };
    server.signal("CONT");
    assert!(
        inside >= 1,
        "decided inside the lease while Redis was paused"
    );
    assert!(outcome.is_err(), "past the lease, fail closed: {outcome:?}");
    eprintln!("{inside} decisions made while Redis was paused");
}

const APPROVED: &str = "
rules:
  - id: team-tokens
    per: [team]
    limit: { tokens: 100, window: daily }
    on_exceed: approval
";

/// An extension approved on one replica is spent from leases on another;
/// revoked, it stops counting there within one lease lifetime.
async fn a_revocation_takes_effect_within_a_lease_lifetime(backend: Backend) {
    let clock = Arc::new(ManualClock::new(at(2026, 12, 1, 12, 0)));
    let prefix = format!("lease-revoke-{}:", backend_name(&backend));
    let (a, b) = replicas(&backend, &prefix, APPROVED, &clock).await;
    let grant = tollgate_core::gate::GrantRequest {
        rule: "team-tokens".into(),
        scope: "team=growth".into(),
        extra: Some(rust_decimal::Decimal::from(100_000)),
        duration: Duration::from_secs(3600),
        approver: "finance@example.com".into(),
        reason: "launch".into(),
    };
    b.gate.approve(grant).await.unwrap();
    // Past the cap of 100 on A, from leases taken under the grant.
    for _ in 0..30 {
        assert_eq!(
            a.gate.check(input("growth", 10)).await.unwrap().verdict,
            Verdict::Allow
        );
    }
    assert!(
        a.store.stats().hits.load(Ordering::SeqCst) > 0,
        "made from leases"
    );
    b.gate
        .revoke("team-tokens", "team=growth", "finance@example.com", "over")
        .await
        .unwrap();
    let lifetime = LeaseConfig::default().lifetime;
    // Within a lease lifetime of the revocation, A denies past the cap.
    clock.advance(lifetime);
    assert_eq!(
        a.gate.check(input("growth", 10)).await.unwrap().verdict,
        Verdict::Deny
    );
}

/// A lowered cap (a reload on this replica) is in force at the next
/// decision: a lease taken under the old one is not spent under the new.
async fn a_lowered_cap_is_in_force_at_once(backend: Backend) {
    let clock = Arc::new(ManualClock::new(at(2026, 12, 1, 12, 0)));
    let prefix = format!("lease-lowered-{}:", backend_name(&backend));
    let big = CAP.replace("tokens: 1000,", "tokens: 100000,");
    let (a, _b) = replicas(&backend, &prefix, &big, &clock).await;
    for _ in 0..5 {
        assert_eq!(
            a.gate.check(input("growth", 10)).await.unwrap().verdict,
            Verdict::Allow
        );
    }
    assert!(a.store.unused_on("team-tokens") > 0, "a lease is held");
    a.gate
        .replace_policy(policy(&CAP.replace("tokens: 1000,", "tokens: 50,")));
    assert_eq!(
        a.gate.check(input("growth", 10)).await.unwrap().verdict,
        Verdict::Deny,
        "50 were used; the lowered cap of 50 denies at once"
    );
}

/// With no shutdown to hand leases back, the cap still fills exactly once
/// they lapse: demand on both replicas one lease lifetime after the
/// contended phase takes what each had left.
async fn the_cap_fills_exactly_once_leases_lapse(backend: Backend) {
    let clock = Arc::new(ManualClock::new(at(2026, 12, 1, 12, 0)));
    let prefix = format!("lease-lapse-{}:", backend_name(&backend));
    let (a, b) = replicas(&backend, &prefix, CAP, &clock).await;
    let mut allowed = 0;
    // Both replicas take leases on the way up.
    for i in 0..900 {
        let gate = if i % 2 == 0 { &a.gate } else { &b.gate };
        if gate.check(input("growth", 1)).await.unwrap().verdict == Verdict::Allow {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 900);
    clock.advance(LeaseConfig::default().lifetime);
    allowed += fill(&[&a.gate, &b.gate], || input("growth", 1)).await;
    assert_eq!(allowed, 1000, "the cap fills to the request");
    a.store.close(clock.now()).await.unwrap();
    b.store.close(clock.now()).await.unwrap();
    assert_eq!(
        team_usage(&a.gate, "growth").await,
        ("1000".into(), "0".into())
    );
}

/// A threshold fires once per counter and window across replicas even
/// when a settle on the other replica moves usage back below it and
/// demand carries it up again.
async fn an_alert_fires_once_when_a_refund_elsewhere_moves_usage_back_below_it(backend: Backend) {
    use tollgate_core::gate::ActualUsage;
    let clock = Arc::new(ManualClock::new(at(2026, 12, 1, 12, 0)));
    let prefix = format!("lease-refund-alert-{}:", backend_name(&backend));
    let (a, b) = replicas(&backend, &prefix, CAP, &clock).await;
    let alerts = |d: &tollgate_core::engine::Decision| -> Vec<u32> {
        d.alerts.iter().map(|c| c.threshold).collect()
    };
    let first = a.gate.check(input("growth", 400)).await.unwrap();
    assert_eq!(alerts(&first), Vec::<u32>::new());
    let crossing = a.gate.check(input("growth", 200)).await.unwrap();
    assert_eq!(alerts(&crossing), vec![50], "600 of 1000 crosses 50%");
    // Settled on B at nothing: usage goes back to 400, below 50%.
    let id = crossing.reservation_id.clone().unwrap();
    b.gate.settle(&id, &ActualUsage::default()).await.unwrap();
    assert_eq!(team_usage(&b.gate, "growth").await.0, "400");
    let again = b.gate.check(input("growth", 200)).await.unwrap();
    assert_eq!(again.verdict, Verdict::Allow);
    assert_eq!(alerts(&again), Vec::<u32>::new(), "50% fired already");
    let higher = a.gate.check(input("growth", 250)).await.unwrap();
    assert_eq!(alerts(&higher), vec![80], "850 crosses 80%, once");
}

/// A cap lowered on one replica (its reload came first) is in force there
/// at once, counting what another replica still holds in its lease under
/// the old cap as used.
async fn a_cap_lowered_on_one_replica_counts_the_others_lease(backend: Backend) {
    let clock = Arc::new(ManualClock::new(at(2026, 12, 1, 12, 0)));
    let prefix = format!("lease-lowered-elsewhere-{}:", backend_name(&backend));
    let big = CAP.replace("tokens: 1000,", "tokens: 100000,");
    let (a, b) = replicas(&backend, &prefix, &big, &clock).await;
    for _ in 0..5 {
        assert_eq!(
            a.gate.check(input("growth", 10)).await.unwrap().verdict,
            Verdict::Allow
        );
    }
    let held = a.store.unused_on("team-tokens");
    assert!(held > 0, "A holds a lease");
    // 50 used and A's lease outstanding; B now has a cap of 60.
    b.gate
        .replace_policy(policy(&CAP.replace("tokens: 1000,", "tokens: 60,")));
    assert_eq!(
        b.gate.check(input("growth", 10)).await.unwrap().verdict,
        Verdict::Deny,
        "B judges 50 used plus A's {held} leased against 60"
    );
    // Once A reloads too, its lease goes back at its next decision, and
    // the two together never allow past the new cap.
    a.gate
        .replace_policy(policy(&CAP.replace("tokens: 1000,", "tokens: 60,")));
    let mut allowed = 0;
    for i in 0..10 {
        let gate = if i % 2 == 0 { &a.gate } else { &b.gate };
        if gate.check(input("growth", 10)).await.unwrap().verdict == Verdict::Allow {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 1, "60 fits one more call of 10 after 50");
}

/// An alert threshold added by a reload while replicas hold leases fires
/// once, and no later than the decision that takes consumption to it.
/// The leases were granted without that threshold, so each replica's next
/// decision goes to Redis, which takes its lease back; a threshold is
/// judged on the counter as Redis holds it (consumption and the leases
/// still out), so it can fire a decision early, never late or twice.
async fn an_alert_added_by_a_reload_fires_at_its_crossing(backend: Backend) {
    let clock = Arc::new(ManualClock::new(at(2026, 12, 1, 12, 0)));
    let prefix = format!("lease-new-alert-{}:", backend_name(&backend));
    let quiet = CAP.replace("    alerts: [50, 80]\n", "");
    let (a, b) = replicas(&backend, &prefix, &quiet, &clock).await;
    for i in 0..8 {
        let gate = if i % 2 == 0 { &a.gate } else { &b.gate };
        let d = gate.check(input("growth", 10)).await.unwrap();
        assert!(d.alerts.is_empty());
    }
    assert!(a.store.unused_on("team-tokens") > 0, "A holds a lease");
    assert!(b.store.unused_on("team-tokens") > 0, "B holds a lease");
    let alerting = CAP.replace("alerts: [50, 80]", "alerts: [10]");
    a.gate.replace_policy(policy(&alerting));
    b.gate.replace_policy(policy(&alerting));
    let mut fired = Vec::new();
    for i in 0..6 {
        let gate = if i % 2 == 0 { &a.gate } else { &b.gate };
        let d = gate.check(input("growth", 10)).await.unwrap();
        fired.extend(d.alerts.iter().map(|c| (i, c.threshold)));
    }
    // 80 used, then 10 a call: the second reaches 100, 10% of the cap.
    assert_eq!(fired.len(), 1, "10% fires once: {fired:?}");
    assert_eq!(fired[0].1, 10);
    assert!(
        fired[0].0 <= 1,
        "no later than where it is reached: {fired:?}"
    );
}

fn backend_name(backend: &Backend) -> &'static str {
    match backend {
        Backend::Redis => "redis",
        Backend::Cluster => "cluster",
    }
}

/// One test per scenario per backend: `redis::<scenario>` and
/// `cluster::<scenario>`.
macro_rules! on_both {
    ($($scenario:ident),+ $(,)?) => {
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    super::$scenario(super::Backend::Redis).await;
                }
            )+
        }
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    super::$scenario(super::Backend::Cluster).await;
                }
            )+
        }
    };
}

on_both!(
    two_replicas_fill_a_cap_exactly_and_never_past_it,
    far_from_a_cap_most_decisions_make_no_round_trip,
    a_busy_lease_is_renewed_before_decisions_miss_it,
    each_alert_fires_once_across_replicas,
    a_reservation_made_from_a_lease_settles_on_another_replica,
    a_request_id_decided_on_two_replicas_is_charged_once,
    a_request_id_from_a_lease_is_replayed_by_a_replica_deciding_in_redis,
    a_final_estimate_from_a_lease_has_no_record_and_is_charged_once,
    an_early_denial_lasts_no_longer_than_a_lease,
    a_revocation_takes_effect_within_a_lease_lifetime,
    a_lowered_cap_is_in_force_at_once,
    the_cap_fills_exactly_once_leases_lapse,
    an_alert_fires_once_when_a_refund_elsewhere_moves_usage_back_below_it,
    a_cap_lowered_on_one_replica_counts_the_others_lease,
    an_alert_added_by_a_reload_fires_at_its_crossing,
);

/// A replica that dies holding a lease (a `tollgate serve` killed with
/// SIGKILL, which returns nothing) does not keep that budget from the
/// others for good: once its lease is a longest lease life and the
/// cleanup grace (60 s) past its end, the first decision it blocks takes
/// it back, and the cap fills. What the dead replica decided after its
/// last report (at most 250 ms of its decisions) is the bound on what the
/// fill can pass the cap by; here it decided 40 requests or a few more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_lease_is_taken_back_and_the_cap_fills() {
    use tollgate::proto::v1 as pb;
    use tollgate::proto::v1::tollgate_client::TollgateClient;
    const YAML: &str = "
rules:
  - id: team-requests
    per: [team]
    limit: { requests: 1000, window: none }
";
    let redis = common::RedisServer::start();
    let dir = common::policy_dir(&[("p.yaml", YAML)]);
    let mut dead = common::TollgateProcess::start(&[
        "--policies",
        dir.path().to_str().unwrap(),
        "--redis",
        &redis.url(),
    ]);
    let mut client = TollgateClient::connect(dead.endpoint()).await.unwrap();
    let request = || pb::CheckRequest {
        attributes: Some(pb::Attributes {
            team: "growth".to_string(),
            ..Default::default()
        }),
        ..Default::default()
    };
    // Forty decisions, and more while its lease is spent out (a lease
    // spent to 0 is not listed): it must die holding one.
    let held = |hash: &str| {
        let fields = common::redis_cli(redis.port, &["HGETALL", hash]);
        let amount = fields.lines().nth(1).and_then(|v| v.split(' ').next());
        amount
            .and_then(|a| a.trim().parse::<i64>().ok())
            .unwrap_or(0)
            > 0
    };
    let mut decided = 0;
    let hash = loop {
        let r = client.check(request()).await.unwrap().into_inner();
        assert_eq!(r.verdict(), pb::Verdict::Allow);
        decided += 1;
        if decided < 40 {
            continue;
        }
        let hashes = common::redis_cli(redis.port, &["--scan", "--pattern", "tollgate:l:*"]);
        if let Some(hash) = hashes.lines().map(str::trim).find(|h| held(h)) {
            break hash.to_string();
        }
        assert!(decided < 200, "no lease held after {decided} decisions");
    };
    let hash = hash.as_str();
    dead.signal_and_wait("KILL");
    // It died holding a lease: its entry is listed beside the counter.
    let entries = common::redis_cli(redis.port, &["HLEN", hash]);
    let entries = entries.trim();
    assert_eq!(entries, "1", "the dead replica's lease is listed");

    // The other replica, its clock well past the lease's end and the grace.
    let clock = Arc::new(ManualClock::new(
        tollgate_core::clock::SystemClock.now() + 90_000,
    ));
    let live = replica(redis.store().await, YAML, clock.clone());
    let allowed = fill(&[&live.gate], || CheckInput {
        attributes: Attributes {
            team: Some("growth".to_string()),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    live.store.close(clock.now()).await.unwrap();
    let total = decided + allowed;
    assert!(
        (1000..=1000 + decided).contains(&total),
        "the cap of 1000 fills, past it by at most what the dead replica decided: {total}"
    );
    let (used, leased) = rule_usage(&live.gate, "team-requests", "growth").await;
    assert_eq!(leased, "0", "nothing is left leased");
    assert_eq!(used, total.min(1000).to_string());
    assert_eq!(
        common::redis_cli(redis.port, &["HLEN", hash]).trim(),
        "0",
        "the dead replica's entry is gone"
    );
}

/// A batch whose reply was lost (Redis ran it, the answer never came) is
/// sent again whole and under its id: `flush.lua` applies it once and
/// answers the same. Sent twice here by hand: a counter move and a
/// request id's outcome. A later batch with the same request id (another
/// replica's) is told it was decided already.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_sent_again_is_applied_once() {
    let server = common::RedisServer::start();
    let client = ::redis::Client::open(server.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let flush = ::redis::Script::new(concat!(
        include_str!("../core/src/store/redis/move_counter.lua"),
        include_str!("../core/src/store/redis/leased/flush.lua")
    ));
    // A 5 s window: buckets -1 to 1 read, 0 written; each outcome is
    // valid for the window from when the batch says it was decided.
    let send =
        |mut con: ::redis::aio::MultiplexedConnection, batch: &str, now: i64, decided: i64| {
            let mut inv = flush.prepare_invoke();
            inv.key(format!("t:fb:{{}}{batch}"))
                .key("t:c:{}n")
                .key("t:q:{}a.5000.")
                .arg(now)
                .arg("replica")
                .arg("m")
                .arg("p")
                .arg(5)
                .arg("q")
                .arg("5000 -1 1 0 10000")
                .arg(2)
                .arg("a1")
                .arg(format!("{} outcome", decided + 5_000))
                .arg("a2")
                .arg(format!("{} other", decided + 5_000));
            async move { inv.invoke_async::<Vec<i64>>(&mut con).await.unwrap() }
        };
    let _: () = ::redis::cmd("SET")
        .arg("t:c:{}n")
        .arg(10)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(
        send(con.clone(), "replica.0", 1_000, 1_000).await,
        Vec::<i64>::new()
    );
    assert_eq!(
        send(con.clone(), "replica.0", 1_000, 1_000).await,
        Vec::<i64>::new(),
        "the same answer: its own request id is not another replica's"
    );
    let n: i64 = ::redis::cmd("GET")
        .arg("t:c:{}n")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(n, 15, "the move applied once");
    let kept: Vec<Option<String>> = ::redis::cmd("HMGET")
        .arg("t:q:{}a.5000.0")
        .arg("a1")
        .arg("a2")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(
        kept,
        [
            Some("6000 outcome".to_string()),
            Some("6000 other".to_string())
        ]
    );
    assert_eq!(
        send(con.clone(), "other.0", 1_000, 1_000).await,
        [1, 2],
        "another batch with the same request ids: both were decided already"
    );
    assert_eq!(
        send(con.clone(), "other.1", 6_000, 6_000).await,
        Vec::<i64>::new(),
        "decided once the first outcomes were no longer valid: afresh"
    );
    assert_eq!(
        send(con.clone(), "other.2", 11_020, 10_999).await,
        [1, 2],
        "decided just before those outcomes ran out, though written after"
    );
}

/// A lease's report or return still in flight when a refill rewrote the
/// lease's entry (or sent again after a failed batch) leaves the newer
/// entry's amount and end alone: a replica that then died would otherwise
/// be reclaimed for what its old lease held (overspend) or not at all.
/// Sent by hand, as a replica's batches would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_lease_report_or_return_leaves_the_newer_entry_alone() {
    let server = common::RedisServer::start();
    let client = ::redis::Client::open(server.url()).unwrap();
    let con = client.get_multiplexed_async_connection().await.unwrap();
    let flush = ::redis::Script::new(concat!(
        include_str!("../core/src/store/redis/move_counter.lua"),
        include_str!("../core/src/store/redis/leased/flush.lua")
    ));
    let mut batches = 0;
    let mut send = |kind: &str, unused: i64, until: i64| {
        batches += 1;
        let mut inv = flush.prepare_invoke();
        inv.key(format!("t:fb:{{}}replica.{batches}"))
            .key("t:c:{}n")
            .arg(1_000)
            .arg("replica")
            .arg(kind)
            .arg(unused)
            .arg(until);
        let mut con = con.clone();
        async move { inv.invoke_async::<Vec<i64>>(&mut con).await.unwrap() }
    };
    let redis = |args: &[&str]| common::redis_cli(server.port, args).trim().to_string();
    // The counter holds 100, of which this replica's newest lease (until
    // 3000) holds 40; its earlier lease ended at 2000.
    redis(&["SET", "t:c:{}n", "100"]);
    redis(&["HSET", "t:l:{}n", "replica", "40 3000"]);

    send("u", 60, 2_000).await;
    assert_eq!(
        redis(&["HGET", "t:l:{}n", "replica"]),
        "40 3000",
        "a report on the earlier lease is dropped"
    );
    send("l", 30, 2_000).await;
    assert_eq!(
        redis(&["GET", "t:c:{}n"]),
        "70",
        "what it gave back is back"
    );
    assert_eq!(
        redis(&["HGET", "t:l:{}n", "replica"]),
        "10 3000",
        "a return of the earlier lease lowers the newer entry, keeping it"
    );
    send("l", 15, 2_000).await;
    assert_eq!(redis(&["GET", "t:c:{}n"]), "55");
    assert_eq!(
        redis(&["HGET", "t:l:{}n", "replica"]),
        "0 3000",
        "lowered to 0 at most, and kept for the newer lease's reports"
    );
    send("u", 25, 3_000).await;
    assert_eq!(redis(&["HGET", "t:l:{}n", "replica"]), "25 3000");
    send("l", 25, 3_000).await;
    assert_eq!(redis(&["GET", "t:c:{}n"]), "30");
    assert_eq!(
        redis(&["HEXISTS", "t:l:{}n", "replica"]),
        "0",
        "its own return deletes it"
    );
    send("u", 5, 3_000).await;
    assert_eq!(
        redis(&["HEXISTS", "t:l:{}n", "replica"]),
        "0",
        "a report after the return does not bring it back"
    );
}

/// What a replica reports of a lease reaches that lease's entry in Redis:
/// the entry's end, as the refill's script wrote it, is the one the
/// replica's reports name (a report naming another is dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_report_reaches_the_entry_its_refill_wrote() {
    const YAML: &str = "
rules:
  - id: team-requests
    per: [team]
    limit: { requests: 100000000, window: none }
";
    let redis = common::RedisServer::start();
    let clock = Arc::new(ManualClock::new(at(2026, 12, 1, 12, 0)));
    let a = replica(redis.store().await, YAML, clock.clone());
    let check = || CheckInput {
        attributes: Attributes {
            team: Some("growth".to_string()),
            ..Default::default()
        },
        ..Default::default()
    };
    let entry = || {
        let hashes = common::redis_cli(redis.port, &["--scan", "--pattern", "tollgate:l:*"]);
        let hash = hashes
            .lines()
            .next()
            .map(str::trim)
            .unwrap_or("")
            .to_string();
        let value = common::redis_cli(redis.port, &["HVALS", &hash]);
        let mut parts = value.split_whitespace();
        let amount = parts.next().and_then(|a| a.parse::<i64>().ok());
        (amount, parts.next().map(str::to_string))
    };
    let mut decided = 0;
    let (granted, until) = loop {
        assert_eq!(a.gate.check(check()).await.unwrap().verdict, Verdict::Allow);
        decided += 1;
        if let (Some(amount), Some(until)) = entry() {
            break (amount, until);
        }
        assert!(decided < 100, "no lease after {decided} decisions");
    };
    for _ in 0..5 {
        assert_eq!(a.gate.check(check()).await.unwrap().verdict, Verdict::Allow);
    }
    clock.advance(tollgate_core::store::lease::REPORT_EVERY + 1);
    assert_eq!(a.gate.check(check()).await.unwrap().verdict, Verdict::Allow);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (amount, end) = entry();
        if amount.is_some_and(|a| a < granted) {
            assert_eq!(end.as_deref(), Some(until.as_str()), "the same entry");
            assert_eq!(amount, Some(granted - 6), "six spent from it");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the report never reached the entry: {amount:?} {end:?}, granted {granted}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.store.close(clock.now()).await.unwrap();
}
