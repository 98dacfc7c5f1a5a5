//! Faults of the counter store, injected into real processes: a Redis that
//! stops answering (SIGSTOP, then SIGCONT), a Redis out of memory
//! (`maxmemory` with `noeviction`), and a Redis Cluster master killed under
//! load while its replica takes over. Each test prints what it measured.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, http_request, master_of_slot, metric, policy, policy_dir};
use common::{HttpReply, TollgateProcess};
use common::{RedisCluster, RedisServer};
use tollgate_core::engine::{Attributes, Verdict};
use tollgate_core::gate::{CheckInput, Gate, GateConfig, GateError, ManualClock};
use tollgate_core::policy::Attr;
use tollgate_core::store::{RedisConfig, RedisStore, StoreError};

/// One rule that fails closed, one that fails open, and one already at
/// its cap, told apart by the team the edge proxy names.
const POLICY: &str = "
attributes:
  trusted_headers: { team: x-tollgate-team }
rules:
  - id: closed
    match: { team: closed }
    limit: { requests: 1000000, window: daily }
    on_store_error: fail_closed
  - id: open
    match: { team: open }
    limit: { requests: 1000000, window: daily }
    on_store_error: fail_open
  - id: capped
    match: { team: capped }
    limit: { requests: 2, window: daily }
    on_store_error: fail_closed
";

/// A forward-auth check, as Traefik or Envoy's `http_service` asks it.
async fn check(port: u16, team: &str) -> HttpReply {
    http_request(
        port,
        "POST",
        "/v1/authz/forward/v1/chat/completions",
        &[("x-tollgate-team", team), ("x-tollgate-model", "gpt-4o")],
        "",
    )
    .await
    .unwrap()
}

fn json(reply: &HttpReply) -> serde_json::Value {
    serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("{e}: {}", reply.body))
}

/// A fail-closed refusal on a store fault: 503, the one code, a message
/// saying which fault (`because`), and a hint to retry soon.
fn assert_store_refusal(reply: &HttpReply, because: &str) {
    assert_eq!(reply.status, 503, "{}", reply.body);
    let body = json(reply);
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(because), "{message}");
    assert_eq!(reply.header("x-should-retry"), Some("true"));
    assert!(reply.header("retry-after").is_some(), "{:?}", reply.headers);
}

fn start_tollgate(redis: &RedisServer, timeout_ms: u64) -> (TollgateProcess, tempfile::TempDir) {
    let dir = policy_dir(&[("p.yaml", POLICY)]);
    let url = redis.url();
    let timeout = timeout_ms.to_string();
    // Without leases, so that every decision reaches Redis: these tests
    // are about the decisions that do. Decisions inside a lease go on
    // through an outage (tests/leases.rs).
    let tollgate = TollgateProcess::start(&[
        "--policies",
        dir.path().to_str().unwrap(),
        "--redis",
        &url,
        "--store-timeout-ms",
        &timeout,
        "--redis-leases",
        "off",
    ]);
    (tollgate, dir)
}

/// A stopped Redis accepts connections and reads commands but never
/// answers. Every check must still answer within `--store-timeout-ms`
/// (plus the slack of a busy machine), each by its rule's failure policy,
/// and decisions come back by themselves once Redis runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_costs_at_most_the_store_timeout_and_recovers_alone() {
    const TIMEOUT_MS: u64 = 100;
    // Scheduling slack on a shared two-core machine: measured at 5-30 ms
    // (see the figures printed), bounded well above.
    const SLACK_MS: u64 = 250;
    let redis = RedisServer::start();
    let (mut tollgate, _dir) = start_tollgate(&redis, TIMEOUT_MS);
    let port = tollgate.http_port;
    assert_eq!(check(port, "closed").await.status, 200);
    assert_eq!(check(port, "open").await.status, 200);

    redis.signal("STOP");
    let stopped = Instant::now();
    let (mut closed, mut open, mut slowest) = (0u32, 0u32, Duration::ZERO);
    // One at a time, then bursts that wait together.
    while stopped.elapsed() < Duration::from_millis(1500) {
        for team in ["closed", "open"] {
            let asked = Instant::now();
            let reply = check(port, team).await;
            slowest = slowest.max(asked.elapsed());
            match team {
                "closed" => {
                    assert_store_refusal(&reply, "timed out");
                    closed += 1;
                }
                _ => {
                    assert_eq!(reply.status, 200, "fail-open rule: {}", reply.body);
                    assert_eq!(reply.header("x-tollgate-decision"), Some("allow"));
                    open += 1;
                }
            }
        }
    }
    let burst = Instant::now();
    let replies = futures_join(16, |i| {
        let team = if i % 2 == 0 { "closed" } else { "open" };
        async move { (team, check(port, team).await) }
    })
    .await;
    let burst_took = burst.elapsed();
    for (team, reply) in &replies {
        match *team {
            "closed" => assert_store_refusal(reply, "timed out"),
            _ => assert_eq!(reply.status, 200, "{}", reply.body),
        }
    }
    closed += 8;
    open += 8;
    let bound = Duration::from_millis(TIMEOUT_MS + SLACK_MS);
    assert!(slowest < bound, "slowest check took {slowest:?}");
    assert!(burst_took < bound, "a burst of 16 took {burst_took:?}");

    redis.signal("CONT");
    let resumed = Instant::now();
    let mut recovered = None;
    while resumed.elapsed() < Duration::from_secs(5) {
        if check(port, "closed").await.status == 200 {
            recovered = Some(resumed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let recovered = recovered.expect("decisions did not recover after SIGCONT");
    for _ in 0..20 {
        assert_eq!(check(port, "closed").await.status, 200);
    }
    // The reserves sent while Redis was stopped ran when it resumed; those
    // of refused checks are taken back, so the fail-closed counter comes
    // to the checks it allowed, and no more.
    let mut closed_allowed = 1 + 1 + 20;
    let settle_by = Instant::now() + Duration::from_secs(3);
    while usage(port, "closed").await != Some(closed_allowed) {
        assert!(
            Instant::now() < settle_by,
            "the closed counter is at {:?} for {closed_allowed} checks allowed",
            usage(port, "closed").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(check(port, "closed").await.status, 200);
        closed_allowed += 1;
    }
    assert_eq!(check(port, "open").await.status, 200);
    let open_used = usage(port, "open").await;
    let timeouts = metric(port, "tollgate_store_errors_total{kind=\"timeout\"}");
    assert!(
        timeouts >= f64::from(closed + open),
        "{timeouts} store timeouts counted for {} faults",
        closed + open
    );
    assert!(tollgate.is_running(), "tollgate must not have restarted");
    println!(
        "stalled Redis: {closed} fail-closed refusals, {open} fail-open allows in {:?}; \
         slowest check {slowest:?} (timeout {TIMEOUT_MS} ms), burst of 16 in {burst_took:?}; \
         decisions back {recovered:?} after SIGCONT; the fail-closed counter at \
         {closed_allowed} for as many allowed, the fail-open one at {open_used:?} for {} checks",
        stopped.elapsed(),
        open + 2
    );
}

/// The requests a rule's counter holds, from `/v1/usage` (as the last
/// decision that touched it saw it).
async fn usage(port: u16, rule: &str) -> Option<u64> {
    let reply = http_request(port, "GET", "/v1/usage", &[], "")
        .await
        .unwrap();
    let body = json(&reply);
    body["counters"]
        .as_array()?
        .iter()
        .find(|c| c["rule"] == rule)
        .and_then(|c| c["used"].as_str()?.parse().ok())
}

/// Runs `n` futures made by `make` at once and collects their results.
async fn futures_join<F, T>(n: usize, make: impl Fn(usize) -> F) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(make(i))).collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// A Redis at `maxmemory` with `noeviction` refuses every write. A check
/// then gets a refusal that says so (in the message, the log and the
/// `kind="full"` store-error metric) under a fail-closed rule, an allow
/// under a fail-open one, and never an allow a full budget would deny.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_is_a_clear_refusal_under_the_failure_policy() {
    let redis = RedisServer::start_with(
        free_port(),
        &["--maxmemory", "8mb", "--maxmemory-policy", "noeviction"],
    );
    let (mut tollgate, _dir) = start_tollgate(&redis, 1000);
    let port = tollgate.http_port;
    assert_eq!(check(port, "closed").await.status, 200);
    assert_eq!(check(port, "open").await.status, 200);
    assert_eq!(check(port, "capped").await.status, 200);
    assert_eq!(check(port, "capped").await.status, 200);
    assert_eq!(check(port, "capped").await.status, 429);

    // Each script may write past maxmemory once it has begun, so fill in
    // batches until one is refused at its first write.
    let mut batches = 0;
    loop {
        batches += 1;
        assert!(batches < 50, "Redis never filled");
        let fill = format!(
            "for i=1,2000 do redis.call('set','fill:{batches}:'..i,string.rep('x',1000)) end"
        );
        if redis.cli(&["eval", &fill, "0"]).contains("OOM") {
            break;
        }
    }
    assert!(redis.cli(&["set", "one-more", "x"]).contains("OOM"));

    let errors_before = metric(port, "tollgate_store_errors_total{kind=\"full\"}");
    let rounds = 10;
    for _ in 0..rounds {
        assert_store_refusal(&check(port, "closed").await, "out of memory");
        let open = check(port, "open").await;
        assert_eq!(open.status, 200, "fail-open rule: {}", open.body);
        // At its cap: denied, or refused; never allowed.
        let capped = check(port, "capped").await;
        assert!(
            capped.status == 429 || capped.status == 503,
            "a full store must not let a capped rule through: {} {}",
            capped.status,
            capped.body
        );
    }
    let full = metric(port, "tollgate_store_errors_total{kind=\"full\"}") - errors_before;
    assert!(
        full >= f64::from(2 * rounds),
        "{full} store errors of kind full for {} faults",
        2 * rounds
    );
    let log = tollgate.log();
    assert!(
        log.iter()
            .any(|l| l.contains("out of memory") && l.contains("maxmemory")),
        "the log must say why: {log:#?}"
    );
    assert!(!log.iter().any(|l| l.contains("panicked")), "{log:#?}");

    // Given memory again, it decides again, with no restart.
    redis.cli(&["config", "set", "maxmemory", "0"]);
    assert_eq!(check(port, "closed").await.status, 200);
    assert_eq!(check(port, "capped").await.status, 429);
    assert!(tollgate.is_running());
    println!(
        "full Redis: filled in {batches} batches; {rounds} fail-closed refusals, {rounds} fail-open \
         allows, {rounds} capped checks never allowed; {full} store errors of kind full"
    );
}

/// The hard cap of the failover test, and how much of it is spent before
/// the master is killed.
const CAP: u64 = 1500;
const KILL_AT: u64 = 500;

const FAILOVER_POLICY: &str = "
rules:
  - id: failover
    match: { team: \"*\" }
    limit: { requests: 1500, window: daily }
    on_store_error: fail_closed
";

/// Two gates (as two tollgate replicas) on a three-master, three-replica
/// Redis Cluster run a steady load of checks against one hard cap. The
/// master holding the counter is killed part-way; its replica is promoted
/// after `cluster-node-timeout`. Decisions must resume within a bound, by
/// themselves, and the store stay usable. Replication is asynchronous, so
/// writes a master acknowledged but had not yet sent may be lost with it:
/// the allowed total past the cap (the overshoot) is measured and printed,
/// not assumed zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_failover_under_load_resumes_and_reports_the_overshoot() {
    const NODE_TIMEOUT_MS: u64 = 1000;
    const RESUME_WITHIN: Duration = Duration::from_secs(15);
    let mut cluster = RedisCluster::start_with_replicas(NODE_TIMEOUT_MS);
    let now = common::at(2026, 3, 2, 12, 0);
    let config = RedisConfig {
        cluster: true,
        prefix: "faults:".to_string(),
        ..RedisConfig::new(cluster.urls())
    };
    let mut gates = Vec::new();
    for _ in 0..2 {
        let store = RedisStore::connect(&config).await.unwrap();
        let gate = Gate::new(
            policy(FAILOVER_POLICY),
            Arc::new(store),
            Arc::new(ManualClock::new(now)),
            GateConfig {
                store_timeout: Duration::from_millis(250),
                ..GateConfig::default()
            },
        );
        gates.push(Arc::new(gate));
    }
    let input = || {
        let mut attributes = Attributes::default();
        attributes.set(&Attr::parse("team").unwrap(), "load".to_string());
        CheckInput {
            attributes,
            ..Default::default()
        }
    };
    // The first decision makes the counter; then find its master.
    assert_eq!(
        gates[0].check(input()).await.unwrap().verdict,
        Verdict::Allow
    );
    let pattern = "faults:*failover*";
    let (victim, key) = (0..cluster.nodes.len())
        .find_map(|i| {
            let node = &cluster.nodes[i];
            let keys = node.cli(&["--scan", "--pattern", pattern]);
            let key = keys.lines().next()?.to_string();
            node.cli(&["info", "replication"])
                .contains("role:master")
                .then_some((i, key))
        })
        .expect("no master holds the counter");
    let victim_port = cluster.nodes[victim].port;
    let slot: u16 = cluster.nodes[victim]
        .cli(&["cluster", "keyslot", &key])
        .trim()
        .parse()
        .unwrap();
    let survivor = (victim + 1) % cluster.nodes.len();

    let allowed = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let outcomes: Arc<Mutex<Outcomes>> = Arc::default();
    let mut workers = Vec::new();
    for w in 0..6 {
        let gate = gates[w % 2].clone();
        let (allowed, stop, killed_at, outcomes) = (
            allowed.clone(),
            stop.clone(),
            killed_at.clone(),
            outcomes.clone(),
        );
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let asked = Instant::now();
                let result = gate.check(input()).await;
                let at = Instant::now();
                // Only a check asked after the kill shows the new master.
                let after_kill = killed_at.lock().unwrap().is_some_and(|k| asked > k);
                {
                    let mut o = outcomes.lock().unwrap();
                    match result {
                        Ok(d) if d.verdict == Verdict::Allow => {
                            allowed.fetch_add(1, Ordering::Relaxed);
                            o.decided(at, after_kill);
                        }
                        Ok(_) => {
                            o.denied += 1;
                            o.decided(at, after_kill);
                        }
                        Err(GateError::Store(StoreError::Timeout(_))) => o.timeouts += 1,
                        Err(GateError::Store(_)) => o.unavailable += 1,
                        Err(e) => panic!("not a store fault: {e}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }

    let deadline = Instant::now() + Duration::from_secs(40);
    while allowed.load(Ordering::Relaxed) < KILL_AT {
        assert!(
            Instant::now() < deadline,
            "the load never reached {KILL_AT}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    cluster.nodes[victim].kill();
    let kill = Instant::now();
    *killed_at.lock().unwrap() = Some(kill);
    let allowed_at_kill = allowed.load(Ordering::Relaxed);
    // When the cluster itself names a new master for the slot, to tell
    // Redis's failover apart from the client's catching up with it.
    let survivor_port = cluster.nodes[survivor].port;
    let promotion = std::thread::spawn(move || {
        let deadline = kill + RESUME_WITHIN;
        while Instant::now() < deadline {
            if master_of_slot(survivor_port, slot).is_some_and(|p| p != victim_port) {
                return Some(kill.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    });

    // Run until the cap has been met after the failover and checks are
    // being denied, or the bound passes.
    loop {
        let done = {
            let o = outcomes.lock().unwrap();
            o.first_after_kill.is_some() && o.denied >= 50
        };
        if done || kill.elapsed() > RESUME_WITHIN + Duration::from_secs(10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let o = outcomes.lock().unwrap().clone();
    let resumed = o
        .first_after_kill
        .map(|t| t - kill)
        .expect("decisions never resumed after the master was killed");
    let promoted = cluster.master_of_slot(slot, survivor);
    let promoted_after = promotion.join().unwrap();
    let total = allowed.load(Ordering::Relaxed);
    let overshoot = total as i64 - CAP as i64;
    println!(
        "cluster failover: master {victim_port} (slot {slot}) killed at {allowed_at_kill} allowed of {CAP}; \
         replica promoted after {promoted_after:?}, decisions resumed after {resumed:?} \
         (node timeout {NODE_TIMEOUT_MS} ms); \
         during it {} timeouts and {} unavailable; in all {total} allowed, overshoot {overshoot}; \
         {} denied; slot now served by {promoted:?}",
        o.timeouts, o.unavailable, o.denied
    );
    assert!(
        resumed < RESUME_WITHIN,
        "decisions resumed only after {resumed:?}"
    );
    assert!(o.denied > 0, "the cap was never reached after the failover");
    // The store stays usable: both gates decide on the counter, at its cap.
    for gate in &gates {
        assert_eq!(gate.check(input()).await.unwrap().verdict, Verdict::Deny);
    }
    assert!(cluster.is_ok(), "the cluster must be whole again");
    assert!(
        promoted.is_some_and(|p| p != victim_port),
        "a replica must serve slot {slot} now: {promoted:?}"
    );
}

#[derive(Debug, Default, Clone)]
struct Outcomes {
    denied: u64,
    timeouts: u64,
    unavailable: u64,
    first_after_kill: Option<Instant>,
}

impl Outcomes {
    fn decided(&mut self, at: Instant, after_kill: bool) {
        if after_kill && self.first_after_kill.is_none() {
            self.first_after_kill = Some(at);
        }
    }
}

/// A usage report is not a decision: it waits out a Redis busy for longer
/// than a decision would (each of its store calls, 100 scopes a call, up
/// to 2 s), where a check at the same moment fails closed at the store
/// timeout, and is not charged. Redis is held busy by a script that runs for 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_report_waits_out_a_busy_redis_that_a_decision_does_not() {
    let redis = RedisServer::start();
    let (tollgate, _dir) = start_tollgate(&redis, 50);
    let port = tollgate.http_port;
    assert_eq!(check(port, "closed").await.status, 200);
    assert_eq!(usage(port, "closed").await, Some(1));

    let busy = {
        let port = redis.port;
        std::thread::spawn(move || {
            let spin = "local t = redis.call('TIME'); \
                 local start = t[1] * 1000000 + t[2]; \
                 repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - start > 1000000";
            common::redis_cli(port, &["EVAL", spin, "0"])
        })
    };
    // Long enough for redis-cli to have started the script: Redis runs
    // nothing else until it ends (it answers BUSY only after 5 s).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (decision, report) = tokio::join!(check(port, "closed"), async {
        let started = Instant::now();
        (usage(port, "closed").await, started.elapsed())
    });
    assert_store_refusal(&decision, "timed out");
    let (used, took) = report;
    // The refused check's script ran once Redis was free, and the gate
    // takes back what it reserved: the report may come between the two.
    assert!(
        matches!(used, Some(1 | 2)),
        "the report waited for Redis ({took:?}): {used:?}"
    );
    assert!(
        took > Duration::from_millis(300),
        "{took:?}: Redis was busy"
    );
    busy.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while usage(port, "closed").await != Some(1) {
        assert!(
            Instant::now() < deadline,
            "the refused check stayed charged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
