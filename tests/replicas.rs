//! Several tollgate processes sharing one real Redis: budgets hold exactly
//! under concurrency, and a Redis outage is answered, then recovered from.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{policy_dir, RedisServer, TollgateProcess};
use rust_decimal::Decimal;
use tollgate::proto::v1 as pb;
use tollgate::proto::v1::tollgate_client::TollgateClient;
use tonic::transport::Channel;

const POLICY: &str = "
# The edge proxy sets these headers (and strips them from clients).
attributes:
  trusted_headers: { team: x-tollgate-team, workflow: x-tollgate-workflow }
pricing:
  models:
    gpt-4o: { input_per_mtok: 2.50, output_per_mtok: 10.00 }
rules:
  - id: requests
    match: { team: requests }
    limit: { requests: 100, window: daily }
  - id: spend
    match: { team: spend, model: gpt-4o }
    limit: { spend: 1, window: daily }
  # Counted per scope as well, so that on a cluster each decision spans
  # two slots and takes the one-script-per-slot path.
  - id: per-team-too
    match: { team: [requests, spend] }
    per: [team]
    limit: { requests: 100000, window: daily }
  - id: open
    match: { team: open }
    limit: { requests: 1000000, window: daily }
    on_store_error: fail_open
  - id: closed
    match: { team: closed }
    limit: { requests: 1000000, window: daily }
";

async fn channel(endpoint: String) -> Channel {
    Channel::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn request(team: &str, output_tokens: u64) -> pb::CheckRequest {
    pb::CheckRequest {
        attributes: Some(pb::Attributes {
            team: team.to_string(),
            model: "gpt-4o".to_string(),
            ..Default::default()
        }),
        estimate: Some(pb::Estimate {
            input_tokens: Some(0),
            output_tokens: Some(output_tokens),
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

/// Sends `n` concurrent Checks spread evenly over the clients; returns the
/// allowed responses. Any RPC error fails the test.
async fn burst(
    clients: &[TollgateClient<Channel>],
    n: usize,
    make: impl Fn(usize) -> pb::CheckRequest,
) -> Vec<(usize, pb::CheckResponse)> {
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let mut client = clients[i % clients.len()].clone();
        let req = make(i);
        tasks.push(tokio::spawn(async move { client.check(req).await }));
    }
    let mut allowed = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let resp = t.await.unwrap().expect("no Check may fail").into_inner();
        if resp.verdict() == pb::Verdict::Allow {
            allowed.push((i, resp));
        }
    }
    allowed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_one_budget_exactly() {
    let redis = RedisServer::start();
    two_replicas_hold_the_caps(&["--redis", &redis.url()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_on_a_redis_cluster_share_one_budget_exactly() {
    let cluster = common::RedisCluster::start();
    two_replicas_hold_the_caps(&["--redis-cluster", "--redis", &cluster.urls()]).await;
}

/// 1,000 concurrent Checks over two tollgate processes against a cap of
/// 100 requests, then against a 1 USD spend cap with mixed sizes.
async fn two_replicas_hold_the_caps(store_args: &[&str]) {
    let dir = policy_dir(&[("p.yaml", POLICY)]);
    let mut args: Vec<&str> = store_args.to_vec();
    args.extend([
        "--policies",
        dir.path().to_str().unwrap(),
        // A burst of 1,000 on two cores queues; this test is about
        // correctness, the timeout is tested below.
        "--store-timeout-ms",
        "5000",
    ]);
    let a = TollgateProcess::start(&args);
    let b = TollgateProcess::start(&args);
    let clients = vec![
        TollgateClient::new(channel(a.endpoint()).await),
        TollgateClient::new(channel(b.endpoint()).await),
    ];

    let allowed = burst(&clients, 1000, |_| request("requests", 1)).await;
    assert_eq!(allowed.len(), 100, "exactly the cap of 100 must be allowed");

    // Mixed sizes against 1 USD: each request costs 0.001 to 0.01 USD.
    let size = |i: usize| (i % 10 + 1) as u64 * 100;
    let allowed = burst(&clients, 1000, |i| request("spend", size(i))).await;
    let per_token = Decimal::new(1, 5); // 10 USD per million output tokens
    let reserved: Decimal = allowed
        .iter()
        .map(|(i, _)| Decimal::from(size(*i)) * per_token)
        .sum();
    let mut usage_client = clients[1].clone();
    let usage = usage_client
        .usage(pb::UsageRequest {
            attributes: request("spend", 0).attributes,
        })
        .await
        .unwrap()
        .into_inner();
    let spend = usage.counters.iter().find(|c| c.rule == "spend").unwrap();
    let used = Decimal::from_str_exact(&spend.used).unwrap();
    assert_eq!(
        used, reserved,
        "the counter must hold exactly what the allowed requests reserved"
    );
    assert!(used <= Decimal::ONE, "spend {used} passed the cap");
    // Filled to within one request: the largest costs 0.01.
    assert!(
        used > Decimal::ONE - Decimal::new(1, 2),
        "cap not filled: {used}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_outage_is_answered_within_the_timeout_and_recovered_from() {
    let mut redis = RedisServer::start();
    let port = redis.port;
    let dir = policy_dir(&[("p.yaml", POLICY)]);
    // Without leases, every decision needs Redis; with them, decisions
    // inside a lease go on through an outage (tests/leases.rs).
    let server = TollgateProcess::start(&[
        "--redis",
        &redis.url(),
        "--policies",
        dir.path().to_str().unwrap(),
        "--redis-leases",
        "off",
    ]);
    let mut client = TollgateClient::new(channel(server.endpoint()).await);

    for team in ["open", "closed"] {
        let r = client.check(request(team, 1)).await.unwrap().into_inner();
        assert_eq!(r.reason, "allowed", "{team} before the outage");
    }

    // Load in the background while Redis dies under it.
    let mut load_client = client.clone();
    let answered = Arc::new(AtomicUsize::new(0));
    let load = tokio::spawn({
        let answered = answered.clone();
        async move {
            let until = Instant::now() + Duration::from_millis(1500);
            while Instant::now() < until {
                let _ = load_client.check(request("closed", 1)).await;
                answered.fetch_add(1, Ordering::Relaxed);
            }
            answered.load(Ordering::Relaxed)
        }
    });
    // Kill it once the load is running.
    let deadline = Instant::now() + Duration::from_secs(20);
    while answered.load(Ordering::Relaxed) < 5 {
        assert!(
            Instant::now() < deadline,
            "the background load got fewer than 5 answers within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    redis.kill();

    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        let closed = client.check(request("closed", 1)).await;
        worst = worst.max(started.elapsed());
        let status = closed.expect_err("a fail-closed rule must not allow without its store");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");

        let started = Instant::now();
        let open = client.check(request("open", 1)).await.unwrap().into_inner();
        worst = worst.max(started.elapsed());
        assert_eq!(open.verdict(), pb::Verdict::Allow);
        assert_eq!(open.reason, "store_unavailable_fail_open");
    }
    // On the Envoy path a store fault is a gRPC error, so that Envoy's own
    // failure mode decides; never a silent allow.
    let channel = channel(server.endpoint()).await;
    let mut envoy =
        envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::new(
            channel,
        );
    let check = envoy_types::pb::envoy::service::auth::v3::CheckRequest {
        attributes: Some(envoy_types::pb::envoy::service::auth::v3::AttributeContext {
            request: Some(envoy_types::pb::envoy::service::auth::v3::attribute_context::Request {
                http: Some(envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest {
                    path: "/v1/chat/completions".to_string(),
                    headers: [("x-tollgate-team".to_string(), "closed".to_string())].into_iter().collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let status = envoy
        .check(check)
        .await
        .expect_err("a store fault is not a decision");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");

    // The store timeout is 50 ms; the rest is the round trip to tollgate.
    assert!(
        worst < Duration::from_millis(300),
        "a Check took {worst:?} with Redis down"
    );
    assert!(load.await.unwrap() > 0);

    // Redis comes back on the same address; tollgate is not restarted.
    let _redis = RedisServer::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.check(request("closed", 1)).await {
            Ok(r) if r.get_ref().reason == "allowed" => break,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "decisions did not resume: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_auth_is_used_and_a_wrong_password_fails_closed() {
    let port = common::free_port();
    let _redis = RedisServer::start_with(port, &["--requirepass", "s3cret"]);
    let dir = policy_dir(&[("p.yaml", POLICY)]);
    let policies = dir.path().to_str().unwrap();

    let good = TollgateProcess::start(&[
        "--redis",
        &format!("redis://:s3cret@127.0.0.1:{port}"),
        "--policies",
        policies,
    ]);
    let mut client = TollgateClient::new(channel(good.endpoint()).await);
    let r = client
        .check(request("closed", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.reason, "allowed");

    let bad = TollgateProcess::start(&[
        "--redis",
        &format!("redis://:wrong@127.0.0.1:{port}"),
        "--policies",
        policies,
    ]);
    let mut client = TollgateClient::new(channel(bad.endpoint()).await);
    let status = client.check(request("closed", 1)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_works_with_a_private_ca_and_refuses_an_untrusted_certificate() {
    let (redis, ca) = RedisServer::start_tls();
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let dir = policy_dir(&[("p.yaml", POLICY)]);
    let policies = dir.path().to_str().unwrap();

    let trusted = TollgateProcess::start(&[
        "--redis",
        &url,
        "--redis-ca-file",
        ca.to_str().unwrap(),
        "--policies",
        policies,
    ]);
    let mut client = TollgateClient::new(channel(trusted.endpoint()).await);
    let r = client
        .check(request("closed", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.reason, "allowed");
    let r = client
        .check(request("closed", 1))
        .await
        .unwrap()
        .into_inner();
    let c = r.counters.iter().find(|c| c.rule == "closed").unwrap();
    assert_eq!(c.used, "2", "counted in the TLS Redis");

    // The same server, without trusting its CA: the handshake fails, and a
    // fail-closed rule answers UNAVAILABLE.
    let untrusted = TollgateProcess::start(&["--redis", &url, "--policies", policies]);
    let mut client = TollgateClient::new(channel(untrusted.endpoint()).await);
    let status = client.check(request("closed", 1)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
}
