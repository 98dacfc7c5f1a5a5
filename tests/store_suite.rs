//! Counter-store scenarios. Every scenario is an `async fn` written once
//! against a [`Backend`]; `backend_matrix!` at the end of the file makes one
//! `#[tokio::test]` of each for every backend: `memory::<scenario>` (the
//! embedded store), `redis::<scenario>` (one `redis-server`) and
//! `cluster::<scenario>` (a three-master Redis Cluster), so a failure on one
//! backend never hides the others.
//!
//! The Redis tests share one server and one cluster for the whole test
//! binary (`common::shared_redis`, `common::shared_cluster`, which also say
//! how those processes are stopped when the binary exits). Each test keeps
//! to a key prefix of its own, so they run in parallel on them.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{at, gate_with, policy};
use tollgate_core::engine::{Attributes, Estimate, Verdict};
use tollgate_core::gate::{CheckInput, ManualClock};
use tollgate_core::store::{
    Candidate, CounterKind, CounterOp, CounterRef, CounterStore, Expiry, Grant, GrantRef,
    LeaseConfig, LeasedStore, MemoryStore, ReserveRequest, SettleOutcome, StoreError,
    FINAL_REPLAY_WINDOW, REPLAY_WINDOW,
};

/// The store one generated test runs its scenario against, and the
/// backend's name for assertion messages.
struct Backend {
    name: &'static str,
    store: Arc<dyn CounterStore>,
}

impl Backend {
    /// A fresh embedded store.
    async fn memory(_scenario: &str) -> Backend {
        Backend {
            name: "memory",
            store: Arc::new(MemoryStore::default()),
        }
    }

    /// A store on the binary's shared `redis-server`, under the scenario's
    /// own key prefix.
    async fn redis(scenario: &str) -> Backend {
        Backend {
            name: "redis",
            store: Arc::new(common::shared_redis().store(&key_prefix(scenario)).await),
        }
    }

    /// A store on the binary's shared Redis Cluster, under the scenario's
    /// own key prefix.
    async fn cluster(scenario: &str) -> Backend {
        Backend {
            name: "redis-cluster",
            store: Arc::new(common::shared_cluster().store(&key_prefix(scenario)).await),
        }
    }

    /// The shared `redis-server` with leases, as `serve` runs by default.
    async fn leased(scenario: &str) -> Backend {
        let redis = common::shared_redis()
            .store(&key_prefix(&format!("leased-{scenario}")))
            .await;
        Backend {
            name: "redis-leased",
            store: LeasedStore::start(redis, LeaseConfig::default()),
        }
    }

    /// The shared Redis Cluster with leases.
    async fn leased_cluster(scenario: &str) -> Backend {
        let redis = common::shared_cluster()
            .store(&key_prefix(&format!("leased-{scenario}")))
            .await;
        Backend {
            name: "redis-cluster-leased",
            store: LeasedStore::start(redis, LeaseConfig::default()),
        }
    }
}

/// One prefix per scenario: each backend module holds a scenario once, and
/// the Redis and the cluster backends use different servers, so no two
/// tests of one binary share a key.
fn key_prefix(scenario: &str) -> String {
    format!("test:{scenario}:")
}

/// One test per scenario per backend, each in the backend's module and
/// named after the scenario, e.g. `cluster::logs_keep_entries_in_order`.
/// A scenario left out of the list is an unused function, which clippy's
/// `-D warnings` refuses.
macro_rules! backend_matrix {
    ($($scenario:ident),+ $(,)?) => {
        backend_matrix!(@backend memory: $($scenario),+);
        backend_matrix!(@backend redis: $($scenario),+);
        backend_matrix!(@backend cluster: $($scenario),+);
        backend_matrix!(@backend leased: $($scenario),+);
        backend_matrix!(@backend leased_cluster: $($scenario),+);
    };
    (@backend $backend:ident: $($scenario:ident),+) => {
        mod $backend {
            $(
                // Four workers, so contending tasks really run at once.
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    let backend = super::Backend::$backend(stringify!($scenario)).await;
                    super::$scenario(backend).await;
                }
            )+
        }
    };
}

const SHARED_BUDGET: &str = "
rules:
  - id: all-traffic
    limit: { tokens: 100, window: daily }
  - id: model-one
    match: { model: m1 }
    limit: { tokens: 60, window: daily }
  - id: count
    limit: { requests: 100000, window: daily }
";

/// 64 tasks hammer 100 units shared by two rules: no counter ever passes
/// its cap, no counter is left partly incremented, and when demand exceeds
/// the cap it is filled exactly.
async fn reserve_is_all_or_nothing_under_contention(Backend { name, store }: Backend) {
    let clock = Arc::new(ManualClock::new(at(2026, 11, 21, 12, 0)));
    let gate = Arc::new(gate_with(policy(SHARED_BUDGET), store, clock));
    let allowed_m1 = Arc::new(AtomicU64::new(0));
    let allowed_m2 = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..64 {
        let gate = gate.clone();
        let (a1, a2) = (allowed_m1.clone(), allowed_m2.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                let model = if t % 2 == 0 { "m1" } else { "m2" };
                let attributes = Attributes {
                    model: Some(model.to_string()),
                    ..Default::default()
                };
                let input = CheckInput {
                    attributes,
                    estimate: Estimate {
                        input_tokens: Some(1),
                        output_tokens: Some(0),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                let d = gate.check(input).await.expect("decision");
                if d.verdict == Verdict::Allow {
                    if model == "m1" { &a1 } else { &a2 }.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let m1 = allowed_m1.load(Ordering::SeqCst);
    let m2 = allowed_m2.load(Ordering::SeqCst);
    assert_eq!(
        m1 + m2,
        100,
        "{name}: demand of 640 must fill the cap of 100 exactly"
    );
    assert!(
        m1 <= 60,
        "{name}: model-one allowed {m1} past its cap of 60"
    );

    let read = |model: &str| Attributes {
        model: Some(model.to_string()),
        ..Default::default()
    };
    let usage = gate.usage(read("m1"), None).await.unwrap();
    let used = |rule: &str| {
        usage
            .iter()
            .find(|c| c.rule == rule)
            .unwrap()
            .used
            .to_string()
    };
    assert_eq!(
        used("all-traffic"),
        (m1 + m2).to_string(),
        "{name}: shared counter drifted"
    );
    assert_eq!(
        used("model-one"),
        m1.to_string(),
        "{name}: model counter drifted"
    );
    assert_eq!(
        used("count"),
        (m1 + m2).to_string(),
        "{name}: a denied request was counted"
    );
}

const SCOPED_BUDGETS: &str = "
rules:
  - id: global
    limit: { tokens: 100, window: daily }
  - id: per-team
    per: [team]
    limit: { tokens: 30, window: daily }
";

/// Counters in different scopes (on a cluster, different slots) under
/// contention: no cap is passed, and a request that did not fit leaves no
/// charge behind on the counters it had already reserved.
async fn reserve_across_scopes_leaves_no_partial_charge(Backend { name, store }: Backend) {
    let clock = Arc::new(ManualClock::new(at(2026, 11, 21, 12, 0)));
    let gate = Arc::new(gate_with(policy(SCOPED_BUDGETS), store, clock));
    let teams = ["a", "b", "c", "d"];
    let allowed: Arc<Vec<AtomicU64>> = Arc::new(teams.iter().map(|_| AtomicU64::new(0)).collect());
    let check = |gate: Arc<tollgate_core::gate::Gate>, team: usize| async move {
        let input = CheckInput {
            attributes: Attributes {
                team: Some(["a", "b", "c", "d"][team].to_string()),
                ..Default::default()
            },
            estimate: Estimate {
                input_tokens: Some(1),
                output_tokens: Some(0),
                ..Default::default()
            },
            ..Default::default()
        };
        gate.check(input).await.expect("decision").verdict == Verdict::Allow
    };
    let mut tasks = Vec::new();
    for t in 0..64 {
        let (gate, allowed) = (gate.clone(), allowed.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                if check(gate.clone(), t % 4).await {
                    allowed[t % 4].fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Top up one at a time: with no contention, every team fills
    // until the global cap is reached.
    for _ in 0..200 {
        for team in 0..4 {
            if check(gate.clone(), team).await {
                allowed[team].fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    let per_team: Vec<u64> = allowed.iter().map(|a| a.load(Ordering::SeqCst)).collect();
    assert_eq!(per_team.iter().sum::<u64>(), 100, "{name}: {per_team:?}");
    for (team, n) in teams.iter().zip(&per_team) {
        assert!(*n <= 30, "{name}: team {team} allowed {n}");
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
        let used = |rule: &str| {
            usage
                .iter()
                .find(|c| c.rule == rule)
                .unwrap()
                .used
                .to_string()
        };
        assert_eq!(
            used("per-team"),
            n.to_string(),
            "{name}: team {team} counter drifted"
        );
        assert_eq!(used("global"), "100", "{name}: global counter drifted");
    }
}

fn op(key: &str, amount: i64, limit: i64) -> CounterOp {
    CounterOp {
        key: key.to_string(),
        unit: tollgate_core::policy::Unit::Requests,
        amount,
        limit,
        enforced: true,
        downgradable: false,
        expiry: Expiry::Never,
        kind: CounterKind::Plain,
        grant: None,
        alert_at: Vec::new(),
    }
}

fn counter(key: &str) -> CounterRef {
    CounterRef {
        key: key.to_string(),
        kind: CounterKind::Plain,
    }
}

fn gauge(key: &str) -> CounterRef {
    CounterRef {
        key: key.to_string(),
        kind: CounterKind::Gauge,
    }
}

fn refs(keys: &[&str]) -> Vec<CounterRef> {
    keys.iter().map(|k| counter(k)).collect()
}

fn request(ops: Vec<CounterOp>, id: &str, now: i64) -> ReserveRequest {
    ReserveRequest {
        now,
        candidates: vec![Candidate { model: None, ops }],
        reservation_id: id.to_string(),
        reservation_ttl: 60_000,
        request_id: None,
        account: None,
        final_estimate: false,
    }
}

async fn a_blocked_op_leaves_every_other_counter_untouched(Backend { name, store }: Backend) {
    let ok = store
        .reserve(&request(vec![op("a", 5, 10), op("b", 5, 5)], "r1", 0))
        .await
        .unwrap();
    assert_eq!(ok.applied, Some(0), "{name}");
    let blocked = store
        .reserve(&request(vec![op("a", 1, 10), op("b", 1, 5)], "r2", 0))
        .await
        .unwrap();
    assert_eq!(blocked.applied, None, "{name}");
    assert_eq!(blocked.tried[0][1].used_before, 5);
    let states = store.read(&refs(&["a", "b"]), 0).await.unwrap();
    assert_eq!(
        (states[0].used_before, states[1].used_before),
        (5, 5),
        "{name}"
    );
    assert!(
        store.reservation("r2", 0).await.unwrap().is_none(),
        "{name}"
    );
}

async fn settle_applies_the_difference_once(Backend { name, store }: Backend) {
    let mut slot = op("slots", 1, 2);
    slot.kind = CounterKind::Gauge;
    // The reservation is settled by the id the store answers with (on a
    // cluster it names a slot).
    let made = store
        .reserve(&request(vec![op("tokens", 100, 1000), slot], "r", 0))
        .await
        .unwrap();
    let id = made.reservation_id.unwrap();
    assert_eq!(
        store.settle(&id, &[30, 1], 10).await.unwrap(),
        SettleOutcome::Settled,
        "{name}"
    );
    assert_eq!(
        store.settle(&id, &[30, 1], 20).await.unwrap(),
        SettleOutcome::AlreadySettled,
        "{name}"
    );
    let s = store
        .read(&[counter("tokens"), gauge("slots")], 30)
        .await
        .unwrap();
    assert_eq!((s[0].used_before, s[1].used_before), (30, 0), "{name}");
    assert_eq!(
        store.settle("missing", &[1], 30).await.unwrap(),
        SettleOutcome::Unknown,
        "{name}"
    );
}

async fn a_repeated_request_id_is_not_charged_twice(Backend { name, store }: Backend) {
    let mut first = request(vec![op("n", 1, 10)], "r1", 0);
    first.request_id = Some("req-1".to_string());
    let mut again = request(vec![op("n", 1, 10)], "r2", 5);
    again.request_id = Some("req-1".to_string());
    let a = store.reserve(&first).await.unwrap();
    let b = store.reserve(&again).await.unwrap();
    assert!(b.replayed, "{name}");
    assert_eq!(a.reservation_id, b.reservation_id, "{name}");
    let s = store.read(&refs(&["n"]), 5).await.unwrap();
    assert_eq!(s[0].used_before, 1, "{name}");
}

async fn rolling_windows_start_at_first_use_and_lapse(Backend { name, store }: Backend) {
    let mut rolling = op("r", 3, 10);
    rolling.expiry = Expiry::AfterFirstUse(500);
    rolling.kind = CounterKind::Rolling;
    let out = store
        .reserve(&request(vec![rolling.clone()], "x", 100))
        .await
        .unwrap();
    assert_eq!(out.tried[0][0].resets_at, Some(600), "{name}");
    let again = store
        .reserve(&request(vec![rolling.clone()], "y", 599))
        .await
        .unwrap();
    assert_eq!(again.tried[0][0].used_before, 3, "{name}");
    let live = store.read(&refs(&["r"]), 599).await.unwrap();
    assert_eq!(live[0].used_before, 6, "{name}");
    assert_eq!(
        store.read(&refs(&["r"]), 600).await.unwrap()[0].used_before,
        0,
        "{name}"
    );
    // The next use after the end starts a new window of its own.
    let fresh = store
        .reserve(&request(vec![rolling], "z", 700))
        .await
        .unwrap();
    assert_eq!(fresh.tried[0][0].used_before, 0, "{name}");
    assert_eq!(fresh.tried[0][0].resets_at, Some(1_200), "{name}");
}

async fn a_downgrade_applies_the_first_candidate_that_fits(Backend { name, store }: Backend) {
    let mut premium = op("premium|d", 1, 1);
    premium.downgradable = true;
    let shared = op("team|d", 1, 100);
    let cheap = op("cheap|d", 1, 100);
    let candidates = |id: &str| ReserveRequest {
        candidates: vec![
            Candidate {
                model: Some("big".to_string()),
                ops: vec![premium.clone(), shared.clone()],
            },
            Candidate {
                model: Some("small".to_string()),
                ops: vec![cheap.clone(), shared.clone()],
            },
        ],
        ..request(Vec::new(), id, 0)
    };
    let first = store.reserve(&candidates("d1")).await.unwrap();
    assert_eq!(first.applied, Some(0), "{name}");
    // The premium counter is full: the second candidate applies,
    // and the first leaves nothing behind.
    let second = store.reserve(&candidates("d2")).await.unwrap();
    assert_eq!(second.applied, Some(1), "{name}");
    assert_eq!(second.tried.len(), 2, "{name}");
    assert_eq!(second.tried[0][0].used_before, 1, "{name}");
    assert_eq!(second.tried[1][1].used_before, 1, "{name}");
    let states = store
        .read(&refs(&["premium|d", "team|d", "cheap|d"]), 0)
        .await
        .unwrap();
    let used: Vec<i64> = states.iter().map(|s| s.used_before).collect();
    assert_eq!(used, vec![1, 2, 1], "{name}");
    let id = second.reservation_id.clone().unwrap();
    let kept = store.reservation(&id, 0).await.unwrap().unwrap();
    assert_eq!(kept.model.as_deref(), Some("small"), "{name}");

    // A candidate with no counters at all (a fallback no rule
    // meters) applies as it is.
    let free = ReserveRequest {
        candidates: vec![
            Candidate {
                model: None,
                ops: vec![premium.clone()],
            },
            Candidate {
                model: None,
                ops: Vec::new(),
            },
        ],
        ..request(Vec::new(), "d3", 0)
    };
    let out = store.reserve(&free).await.unwrap();
    assert_eq!(out.applied, Some(1), "{name}");
}

async fn concurrency_slots_are_held_until_settled_or_lapsed(Backend { name, store }: Backend) {
    let mut slot = op("video|g", 1, 2);
    slot.kind = CounterKind::Gauge;
    let reserve = |id: &'static str, now: i64| {
        let store = &store;
        let slot = slot.clone();
        async move { store.reserve(&request(vec![slot], id, now)).await.unwrap() }
    };
    let held = reserve("g1", 0).await;
    assert_eq!(held.applied, Some(0), "{name}");
    // The store may qualify the id (a cluster names the slot).
    let held = held.reservation_id.unwrap();
    assert_eq!(reserve("g2", 0).await.applied, Some(0), "{name}");
    let full = reserve("g3", 0).await;
    assert_eq!(full.applied, None, "{name}");
    assert_eq!(full.tried[0][0].used_before, 2, "{name}");
    // Settling gives a slot back, once.
    assert_eq!(
        store.settle(&held, &[1], 10).await.unwrap(),
        SettleOutcome::Settled,
        "{name}"
    );
    assert_eq!(reserve("g4", 10).await.applied, Some(0), "{name}");
    assert_eq!(reserve("g5", 10).await.applied, None, "{name}");
    // Unsettled slots lapse with their reservations (60 s here).
    let later = reserve("g6", 60_011).await;
    assert_eq!(later.applied, Some(0), "{name}");
    assert_eq!(later.tried[0][0].used_before, 0, "{name}");
}

async fn one_decision_mixes_every_kind_of_counter_all_or_nothing(Backend { name, store }: Backend) {
    store
        .put_grant(&grant("gated|s", 5, 10_000), 0)
        .await
        .unwrap();
    let plain = op("plain|requests|s|w", 1, 10);
    let mut slot = op("slot|concurrent|s|-", 1, 1);
    slot.kind = CounterKind::Gauge;
    let mut rolling = op("rolling|requests|s|r", 1, 10);
    rolling.expiry = Expiry::AfterFirstUse(1_000);
    rolling.kind = CounterKind::Rolling;
    // A gate with no room of its own: only the grant's extra.
    let gate = gated("gated|requests|s|w", "gated|s", 0, true);
    let ops = vec![plain, slot, rolling, gate];

    let first = store
        .reserve(&request(ops.clone(), "m1", 100))
        .await
        .unwrap();
    assert_eq!(first.applied, Some(0), "{name}");
    let states = &first.tried[0];
    assert_eq!(states[2].resets_at, Some(1_100), "{name}");
    assert_eq!(states[3].grant, Some(5), "{name}");
    assert_eq!(states[0].grant, None, "{name}");

    // The slot is taken: nothing else moves either.
    let second = store
        .reserve(&request(ops.clone(), "m2", 200))
        .await
        .unwrap();
    assert_eq!(second.applied, None, "{name}");
    assert_eq!(second.tried[0][1].used_before, 1, "{name}");
    let keys = [
        "plain|requests|s|w",
        "rolling|requests|s|r",
        "gated|requests|s|w",
    ];
    let used: Vec<i64> = store
        .read(&refs(&keys), 200)
        .await
        .unwrap()
        .iter()
        .map(|s| s.used_before)
        .collect();
    assert_eq!(used, vec![1, 1, 1], "{name}");
}

async fn a_daily_budget_resets_at_utc_midnight_on_an_injected_clock(
    Backend { name, store }: Backend,
) {
    let yaml = "rules:\n  - id: daily\n    limit: { requests: 2, window: daily }\n";
    let clock = Arc::new(ManualClock::new(at(2026, 11, 21, 23, 59)));
    let gate = gate_with(policy(yaml), store, clock.clone());
    let check = || {
        gate.check(CheckInput {
            attributes: Attributes {
                team: Some("t".to_string()),
                ..Default::default()
            },
            ..Default::default()
        })
    };
    assert_eq!(check().await.unwrap().verdict, Verdict::Allow, "{name}");
    assert_eq!(check().await.unwrap().verdict, Verdict::Allow, "{name}");
    let denied = check().await.unwrap();
    assert_eq!(denied.verdict, Verdict::Deny, "{name}");
    assert_eq!(denied.retry_after, Some(60), "{name}");
    clock.set(at(2026, 11, 22, 0, 0));
    assert_eq!(
        check().await.unwrap().verdict,
        Verdict::Allow,
        "{name}: a new day"
    );
}

/// With a reporting time zone, a call counts on its local day: 23:30 UTC
/// on 1 December is already the 2nd in Berlin.
#[tokio::test]
async fn the_spend_account_cuts_days_in_its_time_zone() {
    let clock = Arc::new(ManualClock::new(at(2026, 12, 1, 23, 30)));
    let gate = tollgate_core::gate::Gate::new(
        policy(PRICED),
        Arc::new(MemoryStore::default()),
        clock,
        tollgate_core::gate::GateConfig {
            spend_days: tollgate_core::store::DayCalendar::named("Europe/Berlin").unwrap(),
            ..Default::default()
        },
    );
    let d = gate
        .check(CheckInput {
            attributes: Attributes {
                team: Some("growth".into()),
                model: Some("gpt-4o".into()),
                ..Default::default()
            },
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(d.verdict, Verdict::Allow);
    gate.flush_spend().await.unwrap();
    let dec2 = tollgate_core::engine::window::days_from_civil(2026, 12, 2);
    assert_eq!(
        gate.spend(dec2 - 1, dec2 - 1).await.unwrap().len(),
        0,
        "nothing on 1 December"
    );
    let days = gate.spend(dec2, dec2).await.unwrap();
    assert_eq!(days.len(), 1);
    assert_eq!(days[0].rows[0].estimated.requests, 1);
}

/// Reconciling with an invoice: over a month of calls to the shipped
/// models (tokens with cached input, images, video and audio seconds), the
/// account by model equals, exactly, the sum over the settled calls of
/// their usage at the shipped prices.
#[tokio::test]
async fn a_month_by_model_reconciles_exactly_at_the_shipped_prices() {
    use rust_decimal::Decimal;
    use tollgate::spend::{report, SpendQuery};
    use tollgate_core::engine::charge::{cost, Usage};
    use tollgate_core::gate::ActualUsage;
    let shipped = std::fs::read_to_string("policies/pricing.yaml").unwrap();
    let rules = "
rules:
  - id: team-spend
    match: { team: '*' }
    per: [team]
    limit: { spend: 100000, window: monthly }
";
    let compile = || common::compile(&[("pricing.yaml", &shipped), ("rules.yaml", rules)]).unwrap();
    let compiled = compile();
    let clock = Arc::new(ManualClock::new(at(2026, 11, 1, 0, 0)));
    let gate = gate_with(compile(), Arc::new(MemoryStore::default()), clock.clone());
    let d = |s: &str| s.parse::<Decimal>().unwrap();
    // (model, modality, actual usage)
    let calls: Vec<(&str, Option<&str>, ActualUsage)> = vec![
        (
            "gpt-4o-mini",
            None,
            ActualUsage {
                input_tokens: 123_457,
                cached_input_tokens: 100_001,
                output_tokens: 9_999,
                reasoning_tokens: 0,
                ..Default::default()
            },
        ),
        (
            "gpt-5",
            None,
            ActualUsage {
                input_tokens: 7,
                cached_input_tokens: 3,
                output_tokens: 1_234,
                reasoning_tokens: 1_000,
                ..Default::default()
            },
        ),
        (
            "claude-opus-4",
            None,
            ActualUsage {
                input_tokens: 40_000,
                output_tokens: 333,
                ..Default::default()
            },
        ),
        (
            "text-embedding-3-small",
            Some("embedding"),
            ActualUsage {
                input_tokens: 987_654,
                ..Default::default()
            },
        ),
        (
            "gpt-image-1",
            Some("image"),
            ActualUsage {
                images: 3,
                image_quality: Some("high".into()),
                ..Default::default()
            },
        ),
        (
            "sora-2",
            Some("video"),
            ActualUsage {
                video_seconds: d("12.5"),
                ..Default::default()
            },
        ),
        (
            "whisper-1",
            Some("audio"),
            ActualUsage {
                audio_seconds: d("95.25"),
                ..Default::default()
            },
        ),
    ];
    let mut expected: std::collections::BTreeMap<String, Decimal> = Default::default();
    for day in 0..30 {
        clock.set(at(2026, 11, 1 + day, 9, 0));
        for (i, (model, modality, used)) in calls.iter().enumerate() {
            if (day as usize + i).is_multiple_of(3) {
                continue;
            }
            let decision = gate
                .check(CheckInput {
                    attributes: Attributes {
                        team: Some("growth".into()),
                        model: Some(model.to_string()),
                        modality: modality.map(str::to_string),
                        ..Default::default()
                    },
                    ..Default::default()
                })
                .await
                .expect("decision");
            assert_eq!(decision.verdict, Verdict::Allow, "{model}: {decision:?}");
            gate.settle(&decision.reservation_id.unwrap(), used)
                .await
                .unwrap();
            let usage = Usage {
                input_tokens: used.input_tokens,
                cached_input_tokens: used.cached_input_tokens,
                output_tokens: used.output_tokens,
                images: used.images,
                image_quality: used
                    .image_quality
                    .clone()
                    .unwrap_or_else(|| "medium".into()),
                video_jobs: 0,
                video_seconds: used.video_seconds,
                audio_seconds: used.audio_seconds,
                detail: Default::default(),
            };
            let price = compiled.price(model).expect("shipped price");
            *expected.entry(model.to_string()).or_default() += cost(price, &usage, model).unwrap();
        }
        gate.flush_spend().await.unwrap();
    }
    let nov = tollgate_core::engine::window::days_from_civil(2026, 11, 1);
    let days = gate.spend(nov, nov + 29).await.unwrap();
    let month = report(
        &days,
        &SpendQuery::parse("2026-11-01", "2026-11-30", "model", &[]).unwrap(),
        "UTC",
    );
    let got: std::collections::BTreeMap<String, Decimal> = month
        .groups
        .iter()
        .map(|g| {
            (
                g.group["model"].clone(),
                g.settled.spend_usd.parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got, expected,
        "the account by model is the invoice, exactly"
    );
    assert!(
        month.total.estimated.requests == 0,
        "every call was settled"
    );
    assert_eq!(month.total.settled.images, 3 * 20);
}

/// On Redis every key has a lifetime or a cap: the grants listing is
/// pruned of expired grants and expires with its longest grant; a log
/// stream is trimmed to its cap and expires after its retention.
#[tokio::test]
async fn redis_grants_and_logs_are_bounded() {
    use tollgate_core::store::{LogBounds, RedisConfig, RedisStore};
    let server = common::RedisServer::start();
    let config = RedisConfig {
        logs: LogBounds {
            max_entries: 100,
            retention: std::time::Duration::from_secs(3_600),
        },
        ..RedisConfig::new(server.url())
    };
    let store = RedisStore::connect(&config).await.unwrap();
    let cli = |args: &[&str]| -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-u", &server.url()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let now = 1_000_000;
    store
        .put_grant(&grant("a|s1", 1, now + 1_000), now)
        .await
        .unwrap();
    store
        .put_grant(&grant("b|s2", 1, now + 50_000), now)
        .await
        .unwrap();
    let ttl: i64 = cli(&["PTTL", "tollgate:grants"]).parse().unwrap();
    assert!(
        ttl > 50_000 && ttl <= 50_000 + 60_000,
        "the listing lives as long as its longest grant: {ttl}"
    );
    // Once the first has expired, making a grant prunes it from the listing.
    store
        .put_grant(&grant("c|s3", 1, now + 40_000), now + 2_000)
        .await
        .unwrap();
    assert_eq!(
        cli(&["HLEN", "tollgate:grants"]),
        "2",
        "the expired grant left the listing"
    );
    for i in 0..1_000 {
        store
            .append("alerts", &format!("{{\"n\":{i}}}"))
            .await
            .unwrap();
    }
    let len: usize = cli(&["XLEN", "tollgate:log:alerts"]).parse().unwrap();
    assert!(len < 300, "trimmed to about 100 entries, not {len}");
    let ttl: i64 = cli(&["PTTL", "tollgate:log:alerts"]).parse().unwrap();
    assert!(
        ttl > 3_500_000 && ttl <= 3_600_000,
        "the stream expires after its retention: {ttl}"
    );
    let last = store.entries("alerts", 1).await.unwrap();
    assert_eq!(
        last,
        vec!["{\"n\":999}".to_string()],
        "the newest entries stay"
    );
}

/// Only the embedded store has a counter cap of its own.
#[tokio::test]
async fn memory_stays_bounded_under_millions_of_distinct_keys() {
    let store = MemoryStore::new(10_000);
    let mut full_errors = 0;
    // Each minute brings 5,000 fresh keys; the previous minute's expire.
    for i in 0..200_000i64 {
        let now = (i / 5_000) * 60_000;
        let mut o = op(&format!("k{i}"), 1, 10);
        o.expiry = Expiry::At(now + 60_000);
        match store
            .reserve(&request(vec![o], &format!("r{i}"), now))
            .await
        {
            Ok(_) => {}
            Err(StoreError::Full(_)) => full_errors += 1,
            Err(e) => panic!("{e}"),
        }
        assert!(store.counter_count() <= 10_000);
    }
    assert_eq!(full_errors, 0, "expired counters must make room");
    // Past the cap with live counters, the store refuses rather than grows.
    for i in 0..10_001i64 {
        let mut o = op(&format!("live{i}"), 1, 10);
        o.expiry = Expiry::Never;
        let r = store
            .reserve(&request(vec![o], &format!("l{i}"), 100 * 60_000))
            .await;
        if i >= 10_000 {
            assert!(matches!(r, Err(StoreError::Full(10_000))), "{r:?}");
        }
    }
}

fn grant(key: &str, extra: i64, expires_at: i64) -> Grant {
    Grant {
        rule: key.split('|').next().unwrap().to_string(),
        scope: "team=growth".to_string(),
        key: key.to_string(),
        unit: tollgate_core::policy::Unit::Requests,
        extra,
        expires_at,
        approver: "ana".to_string(),
        reason: "launch".to_string(),
        created_at: 0,
    }
}

fn gated(key: &str, grant_key: &str, limit: i64, required: bool) -> CounterOp {
    CounterOp {
        grant: Some(GrantRef {
            key: grant_key.to_string(),
            required,
        }),
        ..op(key, 1, limit)
    }
}

/// A gate stays shut until a grant opens it; an extension adds exactly its
/// extra; an expired or revoked grant counts for nothing, on every backend
/// (the cluster reads each grant in its counters' slot).
async fn grants_open_gates_and_extend_caps_until_expired_or_revoked(
    Backend { name, store }: Backend,
) {
    let now = 1_000_000;
    let gate = || gated("fine-tune|requests|s1|all", "fine-tune|s1", 10, true);
    let out = store
        .reserve(&request(vec![gate()], "g1", now))
        .await
        .unwrap();
    assert_eq!(out.applied, None, "{name}: a gate without a grant is shut");
    assert_eq!(out.tried[0][0].grant, None, "{name}");

    store
        .put_grant(&grant("fine-tune|s1", 0, now + 10_000), now)
        .await
        .unwrap();
    let out = store
        .reserve(&request(vec![gate()], "g2", now + 1))
        .await
        .unwrap();
    assert_eq!(out.applied, Some(0), "{name}: the grant opens the gate");
    assert_eq!(out.tried[0][0].grant, Some(0), "{name}");

    // A cap of 2 in another scope (another cluster slot), extended
    // by 3 while a grant lasts.
    let cap = || {
        gated(
            "final-renders|requests|s2|all",
            "final-renders|s2",
            2,
            false,
        )
    };
    let mut allowed = 0;
    for i in 0..4 {
        let out = store
            .reserve(&request(vec![cap()], &format!("c{i}"), now + 2))
            .await
            .unwrap();
        allowed += usize::from(out.applied.is_some());
    }
    assert_eq!(allowed, 2, "{name}: the plain cap holds");
    store
        .put_grant(&grant("final-renders|s2", 3, now + 10_000), now + 3)
        .await
        .unwrap();
    let mut extended = 0;
    for i in 0..5 {
        let out = store
            .reserve(&request(vec![cap()], &format!("e{i}"), now + 4))
            .await
            .unwrap();
        if out.applied.is_some() {
            extended += 1;
            assert_eq!(out.tried[0][0].grant, Some(3), "{name}");
        }
    }
    assert_eq!(extended, 3, "{name}: exactly the extra is added");

    let listed: Vec<String> = store
        .grants(now + 5)
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.key)
        .collect();
    assert_eq!(listed, ["final-renders|s2", "fine-tune|s1"], "{name}");

    // Expired: the gate is shut again and the listing forgets it.
    let later = now + 10_001;
    let out = store
        .reserve(&request(vec![gate()], "g3", later))
        .await
        .unwrap();
    assert_eq!(out.applied, None, "{name}: an expired grant opens nothing");
    assert_eq!(store.grants(later).await.unwrap().len(), 0, "{name}");

    // Revoked: gone at once.
    store
        .put_grant(&grant("fine-tune|s1", 0, later + 60_000), later)
        .await
        .unwrap();
    let revoked = store.remove_grant("fine-tune|s1", later).await.unwrap();
    assert_eq!(
        revoked.map(|g| g.key).as_deref(),
        Some("fine-tune|s1"),
        "{name}"
    );
    let out = store
        .reserve(&request(vec![gate()], "g4", later + 1))
        .await
        .unwrap();
    assert_eq!(out.applied, None, "{name}: a revoked grant opens nothing");
    assert_eq!(
        store.remove_grant("fine-tune|s1", later).await.unwrap(),
        None,
        "{name}: revoking twice finds nothing"
    );
}

/// A decision spanning slots on the cluster still reads each grant.
async fn a_decision_across_scopes_reads_every_grant(Backend { name, store }: Backend) {
    let now = 5_000_000;
    let ops = || {
        vec![
            gated("gate-a|requests|sa|all", "gate-a|sa", 5, true),
            gated("gate-b|requests|sb|all", "gate-b|sb", 5, true),
        ]
    };
    store
        .put_grant(&grant("gate-a|sa", 0, now + 60_000), now)
        .await
        .unwrap();
    let out = store.reserve(&request(ops(), "x1", now)).await.unwrap();
    assert_eq!(out.applied, None, "{name}: one gate is still shut");
    let read = store
        .read(&refs(&["gate-a|requests|sa|all"]), now)
        .await
        .unwrap();
    assert_eq!(read[0].used_before, 0, "{name}: nothing stays charged");
    store
        .put_grant(&grant("gate-b|sb", 0, now + 60_000), now)
        .await
        .unwrap();
    let out = store.reserve(&request(ops(), "x2", now)).await.unwrap();
    assert_eq!(out.applied, Some(0), "{name}: both gates open");
}

/// Append-only logs keep their order and return the newest entries.
async fn logs_keep_entries_in_order(Backend { name, store }: Backend) {
    for i in 0..5 {
        store
            .append("approvals", &format!("{{\"n\":{i}}}"))
            .await
            .unwrap();
    }
    let last = store.entries("approvals", 3).await.unwrap();
    assert_eq!(last, [r#"{"n":2}"#, r#"{"n":3}"#, r#"{"n":4}"#], "{name}");
    assert!(store.entries("none", 3).await.unwrap().is_empty(), "{name}");
}

/// A settled reservation answers a repeated settle for a minute, then is
/// forgotten rather than held for its whole life; a late repeat finds
/// nothing and charges nothing. On the cluster the two counters sit in two
/// slots, so this also covers the claim-then-move settle.
async fn a_settled_reservation_is_kept_only_to_recognise_a_repeat(
    Backend { name, store }: Backend,
) {
    let mut req = request(vec![op("tok", 100, 1000), op("req", 1, 10)], "s1", 1_000);
    req.reservation_ttl = 600_000;
    let id = store.reserve(&req).await.unwrap().reservation_id.unwrap();
    let settle = |at: i64| store.settle(&id, &[30, 1], at);
    assert_eq!(
        settle(2_000).await.unwrap(),
        SettleOutcome::Settled,
        "{name}"
    );
    assert_eq!(
        settle(3_000).await.unwrap(),
        SettleOutcome::AlreadySettled,
        "{name}"
    );
    assert_eq!(
        settle(2_000 + tollgate_core::store::SETTLED_RETENTION + 1)
            .await
            .unwrap(),
        SettleOutcome::Unknown,
        "{name}: kept past its minute"
    );
    let s = store.read(&refs(&["tok", "req"]), 5_000).await.unwrap();
    assert_eq!((s[0].used_before, s[1].used_before), (30, 1), "{name}");
}

/// Alert crossings as a sink receives them: (rule, threshold) each time.
#[derive(Debug, Default)]
struct Fired(std::sync::Mutex<Vec<(String, u32)>>);

impl tollgate_core::gate::AlertSink for Fired {
    fn send(
        &self,
        _policy: &tollgate_core::policy::CompiledPolicy,
        crossings: &[tollgate_core::engine::decide::AlertCrossing],
        _now: i64,
    ) {
        let mut fired = self.0.lock().unwrap();
        fired.extend(crossings.iter().map(|c| (c.rule.clone(), c.threshold)));
    }
}

const ALERTING_BUDGET: &str = "
rules:
  - id: tokens-daily
    match: { team: '*' }
    limit: { tokens: 1000, window: daily }
    alerts: [50, 80]
";

fn team() -> Attributes {
    Attributes {
        team: Some("growth".to_string()),
        ..Default::default()
    }
}

/// Reserve past a threshold, settle back below it, again and again, on two
/// replicas: each threshold fires once in the window, at the first
/// decision that reaches it, and again only in the next window.
async fn an_alert_fires_once_per_threshold_and_window_across_refunds_and_replicas(
    Backend { name, store }: Backend,
) {
    let clock = Arc::new(ManualClock::new(at(2026, 11, 21, 12, 0)));
    let fired = Arc::new(Fired::default());
    let replicas: Vec<_> = (0..2)
        .map(|_| {
            gate_with(policy(ALERTING_BUDGET), store.clone(), clock.clone())
                .with_alerts(fired.clone())
        })
        .collect();
    let input = |tokens: u64| CheckInput {
        attributes: team(),
        estimate: Estimate {
            input_tokens: Some(tokens),
            output_tokens: Some(0),
            ..Default::default()
        },
        ..Default::default()
    };
    let settled = |tokens: u64| tollgate_core::gate::ActualUsage {
        input_tokens: tokens,
        ..Default::default()
    };
    let fifties = |fired: &Fired| {
        let f = fired.0.lock().unwrap();
        (
            f.iter().filter(|(_, t)| *t == 50).count(),
            f.iter().filter(|(_, t)| *t == 80).count(),
        )
    };
    // Each call reserves 600 (past 50%), then settles at 40 (back below).
    for round in 0..4 {
        let gate = &replicas[round % 2];
        let d = gate.check(input(600)).await.expect("decision");
        assert_eq!(d.verdict, Verdict::Allow, "{name}: round {round}");
        let id = d.reservation_id.expect("reserved");
        gate.settle(&id, &settled(40)).await.expect("settle");
    }
    assert_eq!(
        fifties(&fired),
        (1, 0),
        "{name}: 50% fired once over four reserve-refund cycles on two replicas"
    );
    // Real usage now 160; usage creeping past 80% fires 80% once, on
    // whichever replica first finds it there.
    for round in 0..10 {
        let gate = &replicas[round % 2];
        let d = gate.check(input(80)).await.expect("decision");
        gate.settle(&d.reservation_id.expect("reserved"), &settled(80))
            .await
            .expect("settle");
    }
    assert_eq!(fifties(&fired), (1, 1), "{name}: 80% once, 50% still once");
    // Concurrent decisions on both replicas past a threshold already fired.
    let mut tasks = Vec::new();
    for gate in replicas {
        let gate = Arc::new(gate);
        for _ in 0..4 {
            let gate = gate.clone();
            tasks.push(tokio::spawn(async move {
                gate.check(CheckInput {
                    attributes: team(),
                    estimate: Estimate {
                        input_tokens: Some(1),
                        output_tokens: Some(0),
                        ..Default::default()
                    },
                    ..Default::default()
                })
                .await
                .expect("decision")
                .alerts
                .len()
            }));
        }
    }
    for t in tasks {
        assert_eq!(
            t.await.unwrap(),
            0,
            "{name}: no decision reports a fired alert again"
        );
    }
    assert_eq!(fifties(&fired), (1, 1), "{name}");
    // The next window is a new counter: its thresholds fire again, once.
    clock.set(at(2026, 11, 22, 0, 5));
    let next =
        gate_with(policy(ALERTING_BUDGET), store.clone(), clock.clone()).with_alerts(fired.clone());
    for _ in 0..3 {
        let d = next.check(input(600)).await.expect("decision");
        next.settle(&d.reservation_id.expect("reserved"), &settled(40))
            .await
            .expect("settle");
    }
    assert_eq!(
        fifties(&fired),
        (2, 1),
        "{name}: a new window fires 50% once more"
    );
}

/// A reservation taken back after its decision was lost gives back every
/// counter and slot, and its request id no longer replays it.
async fn a_withdrawn_reservation_refunds_and_forgets_its_request_id(
    Backend { name, store }: Backend,
) {
    let mut gauge = op("slots", 1, 1);
    gauge.kind = CounterKind::Gauge;
    gauge.unit = tollgate_core::policy::Unit::Concurrent;
    let mut req = request(vec![op("tok", 30, 100), gauge], "w1", 1_000);
    req.request_id = Some("call-1".to_string());
    let first = store.reserve(&req).await.unwrap();
    assert!(first.applied.is_some(), "{name}");
    let id = first.reservation_id.clone().unwrap();
    assert_eq!(
        store.withdraw(&id, Some("call-1"), 1_100).await.unwrap(),
        SettleOutcome::Settled,
        "{name}"
    );
    let s = store.read(&refs(&["tok"]), 1_200).await.unwrap();
    assert_eq!(s[0].used_before, 0, "{name}: refunded");
    // The retry is decided afresh, and charged once.
    let mut retry = request(vec![op("tok", 30, 100), op("slots2", 1, 1)], "w2", 1_300);
    retry.request_id = Some("call-1".to_string());
    let again = store.reserve(&retry).await.unwrap();
    assert!(
        !again.replayed,
        "{name}: a withdrawn request id must not replay"
    );
    assert!(again.applied.is_some(), "{name}");
    let s = store.read(&refs(&["tok"]), 1_400).await.unwrap();
    assert_eq!(s[0].used_before, 30, "{name}: charged once");
    assert_eq!(
        store.withdraw(&id, Some("other"), 1_500).await.unwrap(),
        SettleOutcome::AlreadySettled,
        "{name}: a second withdraw changes nothing"
    );
}

/// A final estimate (nothing settles it) reserved through `reserve`, the
/// path that can outlive the store timeout, can still be taken back: on
/// a leasing store the second one is decided from the lease the first
/// refilled, and must keep what a withdraw needs.
async fn a_final_estimate_reserved_through_reserve_can_be_withdrawn(
    Backend { name, store }: Backend,
) {
    let final_request = |id: &str, now| ReserveRequest {
        final_estimate: true,
        ..request(vec![op("fin", 10, 1_000_000)], id, now)
    };
    let first = store.reserve(&final_request("f1", 1_000)).await.unwrap();
    assert!(first.applied.is_some(), "{name}");
    let second = store.reserve(&final_request("f2", 1_001)).await.unwrap();
    assert!(second.applied.is_some(), "{name}");
    let id = second.reservation_id.clone().unwrap();
    assert_eq!(
        store.withdraw(&id, None, 1_002).await.unwrap(),
        SettleOutcome::Settled,
        "{name}"
    );
    store.close(1_003).await.unwrap();
    let s = store.read(&refs(&["fin"]), 1_004).await.unwrap();
    assert_eq!(s[0].used_before, 10, "{name}: the second was taken back");
}

/// A request id that nothing will settle (`settle: never`, ext_authz
/// alone) is remembered for seconds; one that something will settle, for
/// a minute. Past its window a repeat is decided, and charged, afresh.
async fn a_final_estimates_request_id_is_remembered_seconds_not_a_minute(
    Backend { name, store }: Backend,
) {
    let ask = |reservation: &str, request_id: &str, now, final_estimate| ReserveRequest {
        request_id: Some(request_id.to_string()),
        final_estimate,
        reservation_ttl: if final_estimate { 5_000 } else { 60_000 },
        ..request(vec![op("ids", 1, 1_000)], reservation, now)
    };
    let t = 1_000_000;
    for (res, rid, now, fin) in [("f1", "fin", t, true), ("k1", "kept", t, false)] {
        let first = store.reserve(&ask(res, rid, now, fin)).await.unwrap();
        assert!(first.applied.is_some() && !first.replayed, "{name}: {rid}");
    }
    let within = store
        .reserve(&ask("f2", "fin", t + FINAL_REPLAY_WINDOW - 1_000, true))
        .await
        .unwrap();
    assert!(within.replayed, "{name}: a repeat within seconds replays");
    let past = store
        .reserve(&ask("f3", "fin", t + FINAL_REPLAY_WINDOW + 1_000, true))
        .await
        .unwrap();
    assert!(
        !past.replayed && past.applied.is_some(),
        "{name}: past its window a final estimate's id is forgotten"
    );
    let kept = store
        .reserve(&ask("k2", "kept", t + REPLAY_WINDOW - 1_000, false))
        .await
        .unwrap();
    assert!(
        kept.replayed,
        "{name}: a settled call's id is kept a minute"
    );
    store.close(t + REPLAY_WINDOW).await.unwrap();
    let s = store
        .read(&refs(&["ids"]), t + REPLAY_WINDOW)
        .await
        .unwrap();
    assert_eq!(
        s[0].used_before, 3,
        "{name}: f1, f3 and k1 charged once each"
    );
}

/// On Redis every key a final estimate leaves lives seconds: its
/// reservation record and its request id go within twice their 5 s, where
/// a call that something settles keeps its request id for a minute and
/// more. Checked from the keys' own `PTTL`, with and without leases.
#[tokio::test]
async fn redis_keeps_what_a_final_estimate_leaves_for_seconds() {
    use tollgate_core::store::{RedisConfig, RedisStore};
    let server = common::RedisServer::start();
    let cli = |args: &[&str]| common::redis_cli(server.port, args).trim().to_string();
    let now = 1_000_000;
    for (prefix, leases, final_estimate) in [
        ("final", false, true),
        ("settled", false, false),
        ("leased-final", true, true),
        ("leased-settled", true, false),
    ] {
        let redis = RedisStore::connect(&RedisConfig {
            prefix: format!("{prefix}:"),
            ..RedisConfig::new(server.url())
        })
        .await
        .unwrap();
        let store: Arc<dyn CounterStore> = match leases {
            true => LeasedStore::start(redis, LeaseConfig::default()),
            false => Arc::new(redis),
        };
        for i in 0..20 {
            let req = ReserveRequest {
                request_id: Some(format!("call-{i}")),
                final_estimate,
                reservation_ttl: if final_estimate { 5_000 } else { 600_000 },
                ..request(vec![op("n", 1, 1_000_000)], &format!("r{i}"), now + i)
            };
            assert!(store.reserve(&req).await.unwrap().applied.is_some());
        }
        store.close(now + 100).await.unwrap();
    }
    let mut seen = std::collections::BTreeMap::<&str, usize>::new();
    let keys = cli(&["--scan"]);
    for key in keys.lines() {
        let (prefix, rest) = key.split_once(':').unwrap();
        // Reservation records (`r:`) and request ids (`q:`); counters
        // live to their window's end.
        if !(rest.starts_with("r:") || rest.starts_with("q:")) {
            continue;
        }
        let ttl: i64 = cli(&["PTTL", key]).parse().unwrap();
        if prefix.ends_with("final") {
            assert!((1..=10_000).contains(&ttl), "{key} lives {ttl} ms");
        } else {
            assert!(ttl > 60_000, "{key} lives {ttl} ms");
        }
        if rest.starts_with("q:") {
            let ids: usize = cli(&["HLEN", key]).parse().unwrap();
            *seen.entry(prefix).or_default() += ids;
        }
    }
    for prefix in ["final", "settled", "leased-final", "leased-settled"] {
        assert_eq!(
            seen.get(prefix).copied().unwrap_or(0),
            20,
            "every request id under {prefix} is stored: {seen:?}"
        );
    }
}

const PRICED: &str = "
pricing:
  unpriced_models: reject
  models:
    gpt-4o: { input_per_mtok: 2.50, output_per_mtok: 10.00, cached_input_per_mtok: 1.25 }
    gpt-4o-mini: { input_per_mtok: 0.15, output_per_mtok: 0.60 }
    claude-sonnet-4: { input_per_mtok: 3.00, output_per_mtok: 15.00 }
  families:
    openai: [\"gpt-*\"]
rules:
  - id: team-spend
    match: { team: '*' }
    per: [team]
    limit: { spend: 1000, window: daily }
";

/// A mix of calls on two replicas sharing the store: three models, two
/// teams, one call never settled, one day after midnight. The account
/// equals, by every dimension, the sum of usage times price, exactly; the
/// unsettled estimate is kept apart; the day it was decided on keeps it.
async fn the_spend_account_adds_up_exactly_by_every_dimension(Backend { name, store }: Backend) {
    use rust_decimal::Decimal;
    use tollgate::spend::{report, SpendQuery};
    use tollgate_core::gate::ActualUsage;
    let day1 = at(2026, 12, 1, 23, 0);
    let clock = Arc::new(ManualClock::new(day1));
    let replicas: Vec<_> = (0..2)
        .map(|_| gate_with(policy(PRICED), store.clone(), clock.clone()))
        .collect();
    let call = |team: &str, model: &str, input: u64, output: u64| CheckInput {
        attributes: Attributes {
            team: Some(team.to_string()),
            model: Some(model.to_string()),
            environment: Some("prod".to_string()),
            ..Default::default()
        },
        estimate: Estimate {
            input_tokens: Some(input),
            output_tokens: Some(output),
            ..Default::default()
        },
        ..Default::default()
    };
    // (team, model, estimate out, actual in, cached, out, reasoning)
    let calls: [(&str, &str, u64, u64, u64, u64, u64); 6] = [
        ("growth", "gpt-4o", 4_000, 1_200, 200, 310, 0),
        ("growth", "gpt-4o-mini", 4_000, 900, 0, 1_700, 400),
        ("search", "gpt-4o", 2_000, 5_000, 1_000, 64, 0),
        ("search", "claude-sonnet-4", 8_000, 12_345, 0, 6_789, 0),
        ("growth", "claude-sonnet-4", 1_000, 33, 0, 7, 0),
        ("search", "gpt-4o-mini", 500, 1, 0, 1, 0),
    ];
    let price = |model: &str| -> (Decimal, Decimal, Decimal) {
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        match model {
            "gpt-4o" => (d("2.50"), d("1.25"), d("10.00")),
            "gpt-4o-mini" => (d("0.15"), d("0.15"), d("0.60")),
            _ => (d("3.00"), d("3.00"), d("15.00")),
        }
    };
    let mtok = Decimal::from(1_000_000);
    let mut expected_by_model_team: std::collections::BTreeMap<(String, String), Decimal> =
        Default::default();
    for (i, (team, model, est_out, input, cached, output, reasoning)) in calls.iter().enumerate() {
        let gate = &replicas[i % 2];
        let d = gate
            .check(call(team, model, 100, *est_out))
            .await
            .expect("decision");
        assert_eq!(d.verdict, Verdict::Allow, "{name}: {d:?}");
        // The other replica settles it.
        let other = &replicas[(i + 1) % 2];
        other
            .settle(
                &d.reservation_id.expect("reserved"),
                &ActualUsage {
                    input_tokens: *input,
                    cached_input_tokens: *cached,
                    output_tokens: *output,
                    reasoning_tokens: *reasoning,
                    ..Default::default()
                },
            )
            .await
            .expect("settle");
        let (pi, pc, po) = price(model);
        let cost = (Decimal::from(input - cached) * pi
            + Decimal::from(*cached) * pc
            + Decimal::from(*output) * po)
            / mtok;
        *expected_by_model_team
            .entry((model.to_string(), team.to_string()))
            .or_default() += cost;
    }
    // Never settled: its estimate (100 in, 3,000 out of gpt-4o) stays apart.
    let unsettled = replicas[0]
        .check(call("growth", "gpt-4o", 100, 3_000))
        .await
        .expect("decision");
    assert_eq!(unsettled.verdict, Verdict::Allow);
    let estimate =
        (Decimal::from(100) * price("gpt-4o").0 + Decimal::from(3_000) * price("gpt-4o").2) / mtok;
    // After midnight: decided on day 2, settled on day 2.
    clock.set(at(2026, 12, 2, 0, 30));
    let next_day = replicas[1]
        .check(call("search", "gpt-4o", 10, 10))
        .await
        .expect("decision");
    replicas[1]
        .settle(
            &next_day.reservation_id.unwrap(),
            &ActualUsage {
                input_tokens: 10,
                output_tokens: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for gate in &replicas {
        gate.flush_spend().await.expect("flush");
    }
    let day = tollgate_core::store::spend::utc_day(day1);
    let days = replicas[0].spend(day, day + 1).await.expect("read");
    let q = |by: &str, w: &[&str], to_day: i64| SpendQuery {
        to: to_day,
        ..SpendQuery::parse(
            "2026-12-01",
            "2026-12-01",
            by,
            &w.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .unwrap()
    };
    let by_mt = report(&days, &q("model,team", &[], day), "UTC");
    let got: std::collections::BTreeMap<(String, String), Decimal> = by_mt
        .groups
        .iter()
        .map(|g| {
            (
                (g.group["model"].clone(), g.group["team"].clone()),
                g.settled.spend_usd.parse::<Decimal>().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got, expected_by_model_team,
        "{name}: settled spend by model and team, exact"
    );
    let total: Decimal = expected_by_model_team.values().sum();
    assert_eq!(
        by_mt.total.settled.spend_usd.parse::<Decimal>().unwrap(),
        total,
        "{name}"
    );
    assert_eq!(by_mt.total.settled.requests, 6, "{name}");
    assert_eq!(by_mt.total.settled.reasoning_tokens, 400, "{name}");
    assert_eq!(
        by_mt.total.estimated.requests, 1,
        "{name}: the unsettled call, apart"
    );
    assert_eq!(
        by_mt.total.estimated.spend_usd.parse::<Decimal>().unwrap(),
        estimate,
        "{name}"
    );
    // Every dimension adds up to the same total.
    for by in tollgate_core::store::spend::DIMENSIONS {
        let r = report(&days, &q(by, &[], day), "UTC");
        let sum: Decimal = r
            .groups
            .iter()
            .map(|g| g.settled.spend_usd.parse::<Decimal>().unwrap())
            .sum();
        assert_eq!(sum, total, "{name}: by {by}");
    }
    // A filter keeps one team.
    let growth = report(&days, &q("model", &["team=growth"], day), "UTC");
    let growth_total: Decimal = expected_by_model_team
        .iter()
        .filter(|((_, t), _)| t == "growth")
        .map(|(_, v)| *v)
        .sum();
    assert_eq!(
        growth.total.settled.spend_usd.parse::<Decimal>().unwrap(),
        growth_total,
        "{name}"
    );
    assert_eq!(growth.groups.len(), 3, "{name}: growth used three models");
    let family = report(&days, &q("model_family", &[], day), "UTC");
    assert!(
        family
            .groups
            .iter()
            .any(|g| g.group["model_family"] == "openai"),
        "{name}: {family:?}"
    );
    // Day two holds only the call after midnight.
    let second = report(
        &days,
        &SpendQuery {
            from: day + 1,
            to: day + 1,
            ..q("", &[], day + 1)
        },
        "UTC",
    );
    assert_eq!(second.total.settled.requests, 1, "{name}");
    assert_eq!(second.total.settled.spend_usd, "0.000125", "{name}");
}

/// Past a day's row cap, new rows fold into `other`, and the report says
/// how many did.
async fn the_spend_account_folds_rows_past_its_cap(Backend { name, store }: Backend) {
    use tollgate_core::store::{SpendBounds, SpendDelta, SpendDims, SpendEntry};
    let bounds = SpendBounds {
        max_rows_per_day: 3,
        retention: 86_400_000,
    };
    let delta = |team: &str| SpendDelta {
        day: 20_000,
        dims: SpendDims::new([Some("m"), None, Some(team), None, None, None, None, None]),
        settled: true,
        entry: SpendEntry {
            requests: 1,
            spend_pico: 1_000_000,
            ..Default::default()
        },
    };
    let deltas: Vec<SpendDelta> = (0..10).map(|i| delta(&format!("t{i}"))).collect();
    store
        .record_spend("b1", &deltas, bounds, 20_000 * 86_400_000)
        .await
        .unwrap();
    // The same batch again (its answer was lost): not added twice.
    store
        .record_spend("b1", &deltas, bounds, 20_000 * 86_400_000)
        .await
        .unwrap();
    store
        .record_spend("b2", &[delta("t0")], bounds, 20_000 * 86_400_000)
        .await
        .unwrap();
    let days = store.spend(20_000, 20_000).await.unwrap();
    assert_eq!(days.len(), 1, "{name}");
    let day = &days[0];
    let requests: i64 = day.rows.iter().map(|r| r.settled.requests).sum();
    assert_eq!(requests, 11, "{name}: every call counted once");
    assert!(day.rows.len() <= 4, "{name}: {} rows", day.rows.len());
    let other = day
        .rows
        .iter()
        .find(|r| r.dims == SpendDims::other())
        .expect("an other row");
    assert_eq!(other.settled.requests, 7, "{name}: t3 to t9");
    assert_eq!(day.folded_rows, 7, "{name}");
}

backend_matrix!(
    reserve_is_all_or_nothing_under_contention,
    reserve_across_scopes_leaves_no_partial_charge,
    a_blocked_op_leaves_every_other_counter_untouched,
    settle_applies_the_difference_once,
    a_repeated_request_id_is_not_charged_twice,
    rolling_windows_start_at_first_use_and_lapse,
    a_downgrade_applies_the_first_candidate_that_fits,
    concurrency_slots_are_held_until_settled_or_lapsed,
    one_decision_mixes_every_kind_of_counter_all_or_nothing,
    a_daily_budget_resets_at_utc_midnight_on_an_injected_clock,
    grants_open_gates_and_extend_caps_until_expired_or_revoked,
    a_decision_across_scopes_reads_every_grant,
    logs_keep_entries_in_order,
    a_settled_reservation_is_kept_only_to_recognise_a_repeat,
    an_alert_fires_once_per_threshold_and_window_across_refunds_and_replicas,
    a_withdrawn_reservation_refunds_and_forgets_its_request_id,
    a_final_estimate_reserved_through_reserve_can_be_withdrawn,
    a_final_estimates_request_id_is_remembered_seconds_not_a_minute,
    the_spend_account_adds_up_exactly_by_every_dimension,
    the_spend_account_folds_rows_past_its_cap,
);

/// A decision made from a lease and withdrawn before its batch is written
/// (the caller went away, or the store timed out) leaves no request id in
/// Redis: the retry, sent to another replica, is decided afresh there,
/// not answered with the withdrawn reservation.
#[tokio::test]
async fn a_withdrawn_leased_decision_leaves_no_request_id_for_another_replica() {
    use tollgate_core::store::{RedisConfig, RedisStore};
    let server = common::RedisServer::start();
    let replica = || async {
        let redis = RedisStore::connect(&RedisConfig {
            prefix: "withdrawn:".to_string(),
            ..RedisConfig::new(server.url())
        })
        .await
        .unwrap();
        LeasedStore::start(redis, LeaseConfig::default())
    };
    let (a, b) = (replica().await, replica().await);
    let now = 1_000_000;
    let counter = || vec![op("n", 1, 1_000_000)];
    // A lease first; then the call, decided from it.
    a.reserve(&request(counter(), "r0", now)).await.unwrap();
    let call = ReserveRequest {
        request_id: Some("call-1".to_string()),
        ..request(counter(), "r1", now + 1)
    };
    let made = a.reserve(&call).await.unwrap();
    assert!(a.stats().hits.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let id = made.reservation_id.expect("allowed");
    a.withdraw(&id, call.request_id.as_deref(), now + 2)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let retry = ReserveRequest {
        reservation_id: "r2".to_string(),
        now: now + 3,
        ..call.clone()
    };
    let again = b.reserve(&retry).await.unwrap();
    assert!(!again.replayed, "decided afresh");
    assert!(again.applied.is_some());
    a.close(now + 4).await.unwrap();
    b.close(now + 4).await.unwrap();
    let s = a.read(&refs(&["n"]), now + 5).await.unwrap();
    assert_eq!(s[0].used_before, 2, "the lease's first call and the retry");
}

/// A final estimate decided from a lease after a wait (through `reserve`,
/// which the gate may take back) writes no reservation record to Redis,
/// and the gate can still take it back here after its batch has gone.
#[tokio::test]
async fn a_final_estimate_decided_after_a_wait_is_kept_here_not_in_redis() {
    use tollgate_core::store::{RedisConfig, RedisStore};
    let server = common::RedisServer::start();
    let redis = RedisStore::connect(&RedisConfig {
        prefix: "held:".to_string(),
        ..RedisConfig::new(server.url())
    })
    .await
    .unwrap();
    let store = LeasedStore::start(redis, LeaseConfig::default());
    let now = 1_000_000;
    let call = |id: &str, rid: &str, now| ReserveRequest {
        final_estimate: true,
        reservation_ttl: 5_000,
        request_id: Some(rid.to_string()),
        ..request(vec![op("fin", 10, 1_000_000)], id, now)
    };
    // The first refills the lease in Redis; the second is decided from it.
    store.reserve(&call("f1", "call-1", now)).await.unwrap();
    let second = store.reserve(&call("f2", "call-2", now + 1)).await.unwrap();
    assert!(store.stats().hits.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let id = second.reservation_id.expect("allowed");
    // Past several batches.
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let records = server.cli(&["--scan", "--pattern", "held:r:*"]);
    assert!(
        !records.contains(&id),
        "no record of {id} in Redis: {records:?}"
    );
    assert_eq!(
        store.withdraw(&id, Some("call-2"), now + 2).await.unwrap(),
        SettleOutcome::Settled
    );
    assert_eq!(
        store.withdraw(&id, Some("call-2"), now + 3).await.unwrap(),
        SettleOutcome::AlreadySettled,
        "taken back once"
    );
    store.close(now + 4).await.unwrap();
    let s = store.read(&refs(&["fin"]), now + 5).await.unwrap();
    assert_eq!(s[0].used_before, 10, "the first alone stays charged");
}
