//! Operations against the real binary: readiness that follows a real
//! Redis going away and coming back, and a graceful shutdown under load.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, http_get, policy_dir, RedisServer, TollgateProcess};
use tollgate::proto::v1 as pb;
use tollgate::proto::v1::tollgate_client::TollgateClient;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const POLICY: &str = "
rules:
  - id: plenty
    match: { team: \"*\" }
    per: [team]
    limit: { requests: 100000000, window: daily }
";

async fn channel(endpoint: String) -> Channel {
    Channel::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// `/readyz`'s status and body; the poll runs off the async workers.
async fn readyz(port: u16) -> (u16, String) {
    tokio::task::spawn_blocking(move || http_get(port, "/readyz").unwrap())
        .await
        .unwrap()
}

async fn grpc_health(channel: &Channel, service: &str) -> ServingStatus {
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    ServingStatus::try_from(status).unwrap()
}

/// Waits until both `/readyz` and gRPC health say `ready`, for the overall
/// service and the native API; returns the last `/readyz` body.
async fn wait_for(tollgate: &TollgateProcess, channel: &Channel, ready: bool) -> String {
    let want = if ready {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = readyz(tollgate.http_port).await;
        let http_ok = (code == 200) == ready;
        let grpc_ok = grpc_health(channel, "").await == want
            && grpc_health(channel, "tollgate.v1.Tollgate").await == want;
        if http_ok && grpc_ok {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "not {} within 10 s: /readyz {code} {body}",
            if ready { "ready" } else { "unready" }
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_counter_store() {
    let dir = policy_dir(&[("p.yaml", POLICY)]);
    let redis_port = free_port();
    // Redis is not there yet: the server starts, but is not ready.
    let url = format!("redis://127.0.0.1:{redis_port}");
    let tollgate = TollgateProcess::start(&[
        "--policies",
        dir.path().to_str().unwrap(),
        "--redis",
        &url,
        "--store-probe-every",
        "1s",
    ]);
    let channel = channel(tollgate.endpoint()).await;
    wait_for(&tollgate, &channel, false).await;
    // Unready before the first probe too; wait for the probe's verdict.
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (code, body) = readyz(tollgate.http_port).await;
        assert_eq!(code, 503, "{body}");
        if body.contains("unreachable") || Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let reason: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reason["ready"], false);
    assert_eq!(reason["state"]["policies_loaded"], true);
    assert!(
        reason["reasons"][0]
            .as_str()
            .unwrap()
            .starts_with("counter store unreachable"),
        "{body}"
    );
    // Liveness does not depend on the store.
    assert_eq!(http_get(tollgate.http_port, "/healthz").unwrap().0, 200);

    let mut redis = RedisServer::start_on(redis_port);
    wait_for(&tollgate, &channel, true).await;
    assert_eq!(
        grpc_health(&channel, "envoy.service.auth.v3.Authorization").await,
        ServingStatus::Serving
    );

    redis.kill();
    let body = wait_for(&tollgate, &channel, false).await;
    assert!(body.contains("unreachable"), "{body}");
    assert_eq!(http_get(tollgate.http_port, "/healthz").unwrap().0, 200);

    let _redis = RedisServer::start_on(redis_port);
    wait_for(&tollgate, &channel, true).await;
}

fn check(team: &str) -> pb::CheckRequest {
    pb::CheckRequest {
        attributes: Some(pb::Attributes {
            team: team.to_string(),
            model: "gpt-4o".to_string(),
            ..Default::default()
        }),
        estimate: Some(pb::Estimate::default()),
        request_id: String::new(),
    }
}

/// One Check: when it started, and whether it got an answer.
struct Outcome {
    started: Instant,
    ok: Result<(), tonic::Status>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_answers_every_call_already_sent_and_exits_zero() {
    let dir = policy_dir(&[("p.yaml", POLICY)]);
    let mut tollgate = TollgateProcess::start(&[
        "--policies",
        dir.path().to_str().unwrap(),
        "--drain-timeout",
        "10s",
    ]);
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(channel(tollgate.endpoint()).await);
    }
    let outcomes = Arc::new(Mutex::new(Vec::<Outcome>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..64 {
        let mut client = TollgateClient::new(channels[i % channels.len()].clone());
        let (outcomes, stop) = (outcomes.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let ok = client.check(check(&format!("t{i}"))).await.map(|_| ());
                let failed = ok.is_err();
                outcomes.lock().unwrap().push(Outcome { started, ok });
                // After shutdown, new calls are refused; one is enough.
                if failed {
                    break;
                }
            }
        }));
    }
    // Signal under load: once over 100 calls have been answered.
    let answered = || outcomes.lock().unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(20);
    while answered() <= 100 {
        assert!(
            Instant::now() < deadline,
            "only {} calls answered within 20 s",
            answered()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = outcomes.lock().unwrap().len();
    assert!(before > 100, "only {before} calls before the signal");

    let signalled = Instant::now();
    let pid = tollgate.pid();
    let status = tokio::task::spawn_blocking(move || {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    });
    status.await.unwrap();
    let exit = tokio::task::spawn_blocking(move || {
        let exit = tollgate.wait_exit(Duration::from_secs(15));
        (exit, tollgate)
    });
    let (exit, _tollgate) = exit.await.unwrap();
    let exited = Instant::now();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let exit = exit.expect("tollgate did not exit within 15 s of SIGTERM");
    assert_eq!(exit.code(), Some(0), "{exit:?}");
    assert!(exited - signalled < Duration::from_secs(10));

    let outcomes = outcomes.lock().unwrap();
    let sent_before: Vec<&Outcome> = outcomes.iter().filter(|o| o.started < signalled).collect();
    let failed: Vec<String> = sent_before
        .iter()
        .filter_map(|o| o.ok.as_ref().err().map(|e| format!("{e:?}")))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} calls sent before SIGTERM failed; first: {}",
        failed.len(),
        sent_before.len(),
        failed[0]
    );
}

#[test]
fn a_client_holding_a_connection_open_cannot_delay_exit_past_the_drain() {
    let dir = policy_dir(&[("p.yaml", POLICY)]);
    let mut tollgate = TollgateProcess::start(&[
        "--policies",
        dir.path().to_str().unwrap(),
        "--drain-timeout",
        "2s",
    ]);
    // A request whose headers never end, on each listener.
    use std::io::Write;
    let mut http = std::net::TcpStream::connect(("127.0.0.1", tollgate.http_port)).unwrap();
    http.write_all(b"POST /v1/settle HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        .unwrap();
    let mut grpc = std::net::TcpStream::connect(("127.0.0.1", tollgate.port)).unwrap();
    grpc.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    // The server holds both: it has accepted them and read what was sent.
    for (listener, client) in [(tollgate.http_port, &http), (tollgate.port, &grpc)] {
        let client = client.local_addr().unwrap().port();
        let read = || server_has_read(listener, client);
        assert!(
            common::eventually(Duration::from_secs(20), read),
            "the server did not read the request sent to port {listener} within 20 s"
        );
    }

    let started = Instant::now();
    let status = tollgate.signal_and_wait("TERM");
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exit took {:?} with a 2 s drain",
        started.elapsed()
    );
}

/// Whether the server end of the connection from 127.0.0.1:`client` to
/// 127.0.0.1:`server` has been accepted and read: its receive queue, as
/// Linux shows it in /proc/net/tcp, is empty.
fn server_has_read(server: u16, client: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp (Linux)");
    let (local, remote) = (
        format!("0100007F:{server:04X}"),
        format!("0100007F:{client:04X}"),
    );
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 4
            && fields[1] == local
            && fields[2] == remote
            && fields[4]
                .split_once(':')
                .is_some_and(|(_, rx)| rx.trim_start_matches('0').is_empty())
    })
}
