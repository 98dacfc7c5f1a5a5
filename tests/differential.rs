//! One random history, three stores: the same sequence of checks, settles,
//! clock moves, approvals and revocations goes through a gate on the
//! embedded store, one on a Redis and one on a three-master Redis Cluster,
//! and after every step the three must have answered alike and must report
//! the same counters and grants.
//!
//! A failure names its seed and step. To replay one history, and only it:
//! `DIFFERENTIAL_SEEDS=<seed> cargo test --test differential`
//! (`DIFFERENTIAL_STEPS=<n>` changes the length).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{at, policy, RedisCluster, RedisServer};
use tollgate_core::engine::{Attributes, CounterReport, Decision, Estimate};
use tollgate_core::gate::{
    ActualUsage, CheckInput, Gate, GateConfig, GateError, GrantRequest, ManualClock,
};
use tollgate_core::store::{
    CounterStore, Grant, MemoryStore, RedisConfig, RedisStore, SettleOutcome, REPLAY_WINDOW,
    SETTLED_RETENTION,
};

const SEEDS: [u64; 3] = [0x7011_6a7e, 0x0bad_5eed, 0x2026_1121];
const STEPS: usize = 200;

/// Histories that once found a difference, each run (by default, after
/// `SEEDS`) to the step where it showed: lapsed concurrency slots still
/// counted in memory (as did 0x7011_6a7e at step 11); a cluster candidate
/// judged by its first slot that did not fit (missing a denial, a grant or
/// a reset time further on). None repeats a seed: a history's Redis keys
/// are named by its seed.
const REGRESSIONS: [(u64, usize); 8] = [
    (0x23, 342),
    (0x12, 85),
    (0x1, 116),
    (0x2, 27),
    (0x3, 69),
    (0x4, 6),
    (0x5, 431),
    (0x6, 18),
];

/// Short, so that unsettled reservations lapse often.
const RESERVATION_TTL: i64 = 4 * 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

/// Every kind of counter in one decision: a calendar window, a rolling
/// window, a concurrency gauge, priced spend with a downgrade, a cap that
/// approvals extend, an approval gate, and a soft rule with alerts.
const POLICY: &str = "
pricing:
  unpriced_models: reject
  models:
    big: { input_per_mtok: 10.00, output_per_mtok: 40.00 }
    small: { input_per_mtok: 1.00, output_per_mtok: 4.00 }
rules:
  - id: hourly-tokens
    per: [team]
    limit: { tokens: 30000, window: hourly }
    alerts: [50, 90]
  - id: rolling-requests
    per: [team]
    limit: { requests: 7, window: 10m }
  - id: in-flight
    limit: { concurrent: 3 }
  - id: big-spend
    match: { model: big }
    limit: { spend: 0.40, window: daily }
    on_exceed: { downgrade: small }
  - id: small-requests
    match: { model: small }
    limit: { requests: 12, window: daily }
  - id: team-spend
    owner: finance@example.com
    per: [team]
    limit: { spend: 0.30, window: daily }
    on_exceed: approval
  - id: backfills
    owner: data@example.com
    match: { workflow: backfill }
    per: [team]
    limit: { requests: 4, window: daily }
    enforcement: approval
  - id: watch
    limit: { requests: 25, window: hourly }
    enforcement: soft
    alerts: [50, 100, 150]
";

const TEAMS: [&str; 2] = ["a", "b"];
const MODELS: [&str; 2] = ["big", "small"];

/// xorshift64*: small, seeded, the same on every machine.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // Any seed, even 0, gives a non-zero state.
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// In `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    /// Milliseconds in `lo..=hi`.
    fn millis(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo + 1) as u64) as i64
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[(self.next() % items.len() as u64) as usize]
    }
}

#[derive(Debug, Clone)]
struct CheckSpec {
    team: &'static str,
    model: &'static str,
    backfill: bool,
    input: u64,
    output: u64,
    request_id: Option<String>,
    can_switch_model: bool,
}

impl CheckSpec {
    fn input(&self) -> CheckInput {
        CheckInput {
            attributes: Attributes {
                team: Some(self.team.to_string()),
                model: Some(self.model.to_string()),
                workflow: self.backfill.then(|| "backfill".to_string()),
                ..Default::default()
            },
            estimate: Estimate {
                input_tokens: Some(self.input),
                output_tokens: Some(self.output),
                ..Default::default()
            },
            request_id: self.request_id.clone(),
            can_switch_model: self.can_switch_model,
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone)]
enum Step {
    Check(CheckSpec),
    /// The n-th reservation made so far (settled, lapsed or not).
    Settle {
        reservation: usize,
        input: u64,
        output: u64,
    },
    Advance {
        by: i64,
        why: &'static str,
    },
    Approve {
        rule: &'static str,
        team: &'static str,
        extra: Option<&'static str>,
        secs: u64,
    },
    Revoke {
        rule: &'static str,
        team: &'static str,
    },
}

/// What the history has produced so far, as the embedded store saw it
/// (the others agreed, or the test has already failed).
struct World {
    now: i64,
    reservations: usize,
    /// Moments where something lapses: reservations, settled
    /// reservations, replays, rolling windows, grants.
    edges: Vec<i64>,
    last_check: Option<CheckSpec>,
    request_ids: u64,
}

impl World {
    fn step(&mut self, rng: &mut Rng) -> Step {
        match rng.range(0, 99) {
            0..=44 => Step::Check(self.check(rng)),
            45..=64 if self.reservations > 0 => {
                // Mostly recent reservations, sometimes any of them.
                let n = self.reservations as u64;
                let reservation = if rng.chance(70) {
                    n - 1 - rng.range(0, (n - 1).min(3))
                } else {
                    rng.range(0, n - 1)
                } as usize;
                Step::Settle {
                    reservation,
                    input: rng.range(0, 5_000),
                    output: rng.range(0, 3_000),
                }
            }
            45..=84 => self.advance(rng),
            85..=94 => {
                let team = rng.pick(&TEAMS);
                if rng.chance(50) {
                    Step::Approve {
                        rule: "team-spend",
                        team,
                        // Zero is refused: a cap's approval must add some.
                        extra: Some(rng.pick(&["0.05", "0.1", "0.25", "0"])),
                        secs: rng.range(1, 45 * 60),
                    }
                } else {
                    Step::Approve {
                        rule: "backfills",
                        team,
                        extra: rng.pick(&[None, None, Some("2")]),
                        secs: rng.range(1, 45 * 60),
                    }
                }
            }
            _ => Step::Revoke {
                rule: rng.pick(&["team-spend", "backfills"]),
                team: rng.pick(&TEAMS),
            },
        }
    }

    fn check(&mut self, rng: &mut Rng) -> CheckSpec {
        if let Some(last) = self.last_check.clone().filter(|c| c.request_id.is_some()) {
            if rng.chance(12) {
                // The same request again: a replay within the window.
                return last;
            }
        }
        let request_id = rng.chance(25).then(|| {
            self.request_ids += 1;
            format!("req-{}", self.request_ids)
        });
        let spec = CheckSpec {
            team: rng.pick(&TEAMS),
            model: rng.pick(&MODELS),
            backfill: rng.chance(25),
            input: rng.range(0, 4_000),
            output: rng.range(0, 2_000),
            request_id,
            can_switch_model: rng.chance(85),
        };
        self.last_check = Some(spec.clone());
        spec
    }

    fn advance(&mut self, rng: &mut Rng) -> Step {
        let now = self.now;
        let to = |t: i64, why| Step::Advance { by: t - now, why };
        match rng.range(0, 99) {
            0..=34 => Step::Advance {
                by: rng.millis(1, 3_000),
                why: "a little",
            },
            35..=59 => Step::Advance {
                by: rng.millis(3_000, 120_000),
                why: "minutes",
            },
            60..=74 => Step::Advance {
                by: rng.millis(120_000, 20 * 60_000),
                why: "past reservation lifetimes",
            },
            75..=79 => Step::Advance {
                by: rng.millis(DAY, DAY + 3 * HOUR),
                why: "past the day",
            },
            80..=87 => {
                let edge = (now / HOUR + 1) * HOUR;
                to(edge + rng.millis(-1, 1), "to the hour's edge")
            }
            _ => {
                let ahead: Vec<i64> = self.edges.iter().copied().filter(|&t| t > now).collect();
                if ahead.is_empty() {
                    return Step::Advance {
                        by: 1,
                        why: "a millisecond",
                    };
                }
                let edge = rng.pick(&ahead);
                // Just before, at, or just after the moment it lapses.
                let t = (edge + rng.millis(-1, 1)).max(now + 1);
                to(t, "to a lapse")
            }
        }
    }

    /// Records the moments the embedded store's answer says will matter.
    fn learn(&mut self, step: &Step, seen: &Seen) {
        match (step, seen) {
            (Step::Check(_), Seen::Decision(Ok(d))) => {
                if d.reservation_id.is_some() {
                    self.reservations += 1;
                    self.edges.push(d.decided_at + RESERVATION_TTL);
                }
                self.edges.push(d.decided_at + REPLAY_WINDOW);
                self.edges
                    .extend(d.counters.iter().filter_map(|c| c.resets_at));
            }
            (Step::Settle { .. }, Seen::Settle(Ok(SettleOutcome::Settled))) => {
                self.edges.push(self.now + SETTLED_RETENTION);
            }
            (Step::Approve { .. }, Seen::Grant(Ok(g))) => self.edges.push(g.expires_at),
            _ => {}
        }
        let now = self.now;
        self.edges.retain(|&t| t >= now);
        self.edges.sort_unstable();
        self.edges.dedup();
    }
}

/// One backend's answer to one step, with what differs by backend by
/// design (reservation ids) taken out.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Decision(Result<Decision, String>),
    Settle(Result<SettleOutcome, String>),
    Grant(Result<Grant, String>),
    Moved,
}

/// What every backend reports after each step.
#[derive(Debug, Clone, PartialEq)]
struct Report {
    usage: Vec<(String, Result<Vec<CounterReport>, String>)>,
    grants: Result<Vec<Grant>, String>,
}

fn error(e: GateError) -> String {
    match e {
        // Names the backend's own reservation id.
        GateError::UnknownReservation(_) => e.code().to_string(),
        e => format!("{}: {e}", e.code()),
    }
}

fn without_ids(d: Decision) -> Decision {
    Decision {
        reservation_id: d.reservation_id.map(|_| "<reservation>".to_string()),
        action_id: d.action_id.map(|_| "<action>".to_string()),
        ..d
    }
}

struct Lane {
    name: &'static str,
    gate: Gate,
    /// This backend's id for each reservation made so far, by index.
    reservations: Vec<Option<String>>,
}

impl Lane {
    async fn apply(&mut self, step: &Step) -> Seen {
        match step {
            Step::Check(spec) => {
                let result = self.gate.check(spec.input()).await;
                if let Ok(d) = &result {
                    if d.reservation_id.is_some() {
                        self.reservations.push(d.reservation_id.clone());
                    }
                }
                Seen::Decision(result.map(without_ids).map_err(error))
            }
            Step::Settle {
                reservation,
                input,
                output,
            } => {
                let Some(Some(id)) = self.reservations.get(*reservation) else {
                    return Seen::Settle(Err(format!("no reservation #{reservation} here")));
                };
                let actual = ActualUsage {
                    input_tokens: *input,
                    output_tokens: *output,
                    ..Default::default()
                };
                Seen::Settle(self.gate.settle(id, &actual).await.map_err(error))
            }
            // The clock is shared: `run` has moved it for every lane.
            Step::Advance { .. } => Seen::Moved,
            Step::Approve {
                rule,
                team,
                extra,
                secs,
            } => {
                let request = GrantRequest {
                    rule: rule.to_string(),
                    scope: format!("team={team}"),
                    extra: extra.map(|e| e.parse().unwrap()),
                    duration: Duration::from_secs(*secs),
                    approver: "ana@example.com".to_string(),
                    reason: "differential".to_string(),
                };
                Seen::Grant(self.gate.approve(request).await.map_err(error))
            }
            Step::Revoke { rule, team } => Seen::Grant(
                self.gate
                    .revoke(rule, &format!("team={team}"), "bo", "done")
                    .await
                    .map_err(error),
            ),
        }
    }

    async fn report(&self) -> Report {
        let mut usage = Vec::new();
        for team in TEAMS {
            for (model, backfill) in [("big", true), ("small", false)] {
                let attributes = Attributes {
                    team: Some(team.to_string()),
                    model: Some(model.to_string()),
                    workflow: backfill.then(|| "backfill".to_string()),
                    ..Default::default()
                };
                let counters = self.gate.usage(attributes, None).await.map_err(error);
                usage.push((format!("team={team} model={model}"), counters));
            }
        }
        Report {
            usage,
            grants: self.gate.approvals().await.map_err(error),
        }
    }
}

fn describe(step: &Step) -> String {
    match step {
        Step::Check(c) => format!(
            "check team={} model={}{} in={} out={}{}{}",
            c.team,
            c.model,
            if c.backfill { " workflow=backfill" } else { "" },
            c.input,
            c.output,
            c.request_id
                .as_deref()
                .map(|r| format!(" request_id={r}"))
                .unwrap_or_default(),
            if c.can_switch_model {
                ""
            } else {
                " (cannot switch model)"
            }
        ),
        Step::Settle {
            reservation,
            input,
            output,
        } => format!("settle reservation #{reservation} in={input} out={output}"),
        Step::Advance { by, why } => format!("advance {by} ms ({why})"),
        Step::Approve {
            rule,
            team,
            extra,
            secs,
        } => format!(
            "approve {rule} team={team} extra={} for {secs} s",
            extra.unwrap_or("-")
        ),
        Step::Revoke { rule, team } => format!("revoke {rule} team={team}"),
    }
}

/// The first part of `got` that differs from `want`, as text for both.
fn first_difference(
    want: &(Seen, Report),
    got: &(Seen, Report),
) -> Option<(String, String, String)> {
    if want.0 != got.0 {
        return Some((
            "the step's answer".to_string(),
            format!("{:#?}", want.0),
            format!("{:#?}", got.0),
        ));
    }
    for ((probe, w), (_, g)) in want.1.usage.iter().zip(&got.1.usage) {
        if w != g {
            let (w, g) = match (w, g) {
                (Ok(w), Ok(g)) if w.len() == g.len() => {
                    // Only the counters that differ.
                    let pairs: Vec<_> = w.iter().zip(g).filter(|(a, b)| a != b).collect();
                    (
                        format!("{:#?}", pairs.iter().map(|p| p.0).collect::<Vec<_>>()),
                        format!("{:#?}", pairs.iter().map(|p| p.1).collect::<Vec<_>>()),
                    )
                }
                _ => (format!("{w:#?}"), format!("{g:#?}")),
            };
            return Some((format!("usage for {probe}"), w, g));
        }
    }
    if want.1.grants != got.1.grants {
        return Some((
            "the active grants".to_string(),
            format!("{:#?}", want.1.grants),
            format!("{:#?}", got.1.grants),
        ));
    }
    None
}

async fn connect(url: String, cluster: bool, seed: u64) -> Arc<dyn CounterStore> {
    // A prefix of its own for each history: nothing carries over.
    let config = RedisConfig {
        cluster,
        prefix: format!("diff-{seed:x}:"),
        ..RedisConfig::new(url)
    };
    Arc::new(RedisStore::connect(&config).await.unwrap())
}

async fn run(seed: u64, steps: usize, redis: &RedisServer, cluster: &RedisCluster) {
    let start = at(2026, 11, 21, 9, 17) + (seed % 3_600_000) as i64;
    let clock = Arc::new(ManualClock::new(start));
    let config = GateConfig {
        reservation_ttl: Duration::from_millis(RESERVATION_TTL as u64),
        // What the stores decide is under test here, not how fast.
        store_timeout: Duration::from_secs(5),
        ..GateConfig::default()
    };
    let gate = |store: Arc<dyn CounterStore>| {
        Gate::new(policy(POLICY), store, clock.clone(), config.clone())
    };
    let mut lanes = [
        Lane {
            name: "memory",
            gate: gate(Arc::new(MemoryStore::default())),
            reservations: Vec::new(),
        },
        Lane {
            name: "redis",
            gate: gate(connect(redis.url(), false, seed).await),
            reservations: Vec::new(),
        },
        Lane {
            name: "redis-cluster",
            gate: gate(connect(cluster.urls(), true, seed).await),
            reservations: Vec::new(),
        },
    ];
    let mut rng = Rng::new(seed);
    let mut world = World {
        now: start,
        reservations: 0,
        edges: Vec::new(),
        last_check: None,
        request_ids: 0,
    };
    let mut history: Vec<String> = Vec::new();
    for n in 1..=steps {
        let step = world.step(&mut rng);
        history.push(format!("{n:>4} {}", describe(&step)));
        if let Step::Advance { by, .. } = step {
            clock.advance(by);
            world.now += by;
        }
        let mut seen = Vec::new();
        for lane in lanes.iter_mut() {
            let answer = lane.apply(&step).await;
            seen.push((answer, lane.report().await));
        }
        for (lane, got) in lanes.iter().zip(&seen).skip(1) {
            if let Some((what, want, got)) = first_difference(&seen[0], got) {
                let from = history.len().saturating_sub(30);
                panic!(
                    "backends disagree on {what}\n\
                     seed {seed:#x}, step {n} of {steps}: {}\n\
                     clock {} (started at {start})\n\
                     replay with DIFFERENTIAL_SEEDS={seed:#x} DIFFERENTIAL_STEPS={n}\n\n\
                     memory (expected):\n{want}\n\n{} (got):\n{got}\n\n\
                     the steps before it:\n{}",
                    describe(&step),
                    world.now,
                    lane.name,
                    history[from..].join("\n"),
                );
            }
        }
        world.learn(&step, &seen[0].0);
    }
}

fn seeds() -> Vec<u64> {
    match std::env::var("DIFFERENTIAL_SEEDS") {
        Ok(list) => list
            .split(',')
            .map(|s| {
                let s = s.trim();
                match s.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => s.parse(),
                }
                .unwrap_or_else(|e| panic!("DIFFERENTIAL_SEEDS: {s:?}: {e}"))
            })
            .collect(),
        Err(_) => SEEDS.to_vec(),
    }
}

fn steps() -> usize {
    std::env::var("DIFFERENTIAL_STEPS")
        .map(|s| s.parse().expect("DIFFERENTIAL_STEPS is a number"))
        .unwrap_or(STEPS)
}

#[test]
fn memory_redis_and_a_cluster_answer_every_history_alike() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let redis = RedisServer::start();
    let cluster = RedisCluster::start();
    let steps = steps();
    let mut histories: Vec<(u64, usize)> = seeds().into_iter().map(|s| (s, steps)).collect();
    if std::env::var_os("DIFFERENTIAL_SEEDS").is_none() {
        histories.extend(REGRESSIONS);
    }
    for (seed, steps) in histories {
        eprintln!("differential: seed {seed:#x}, {steps} steps");
        runtime.block_on(run(seed, steps, &redis, &cluster));
    }
}
