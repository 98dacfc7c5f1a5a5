//! Metrics, the audit log and `tollgate usage`, against real `tollgate
//! serve` processes (and a real `redis-server` where the store matters).
//! Metrics are read with a Prometheus text-format parser, not by matching
//! strings.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use openmetrics_parser::{MetricsExposition, PrometheusType, PrometheusValue};
use tollgate::proto::v1 as pb;
use tollgate::proto::v1::tollgate_client::TollgateClient;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// A raw key that must never show up in metrics, the audit log or output.
const RAW_KEY: &str = "sk-live-raw-secret-7f3a9c";

const POLICY: &str = "
# The edge proxy sets these headers (and strips them from clients).
attributes:
  trusted_headers: { team: x-tollgate-team, workflow: x-tollgate-workflow }
rules:
  - id: team-daily
    match: { team: \"*\" }
    per: [team]
    limit: { requests: 3, window: daily }
  - id: key-requests
    match: { team: \"*\" }
    per: [key]
    limit: { requests: 100, window: daily }
";

async fn http_get(port: u16, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

/// A forward-auth check on the HTTP port: the status code.
async fn http_check(port: u16, team: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let request = format!(
        "GET /v1/authz/forward/v1/chat/completions HTTP/1.0\r\nHost: x\r\n\
         authorization: Bearer {RAW_KEY}\r\nx-tollgate-team: {team}\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    text.split(' ').nth(1).unwrap().parse().unwrap()
}

struct Scrape {
    text: String,
    parsed: MetricsExposition<PrometheusType, PrometheusValue>,
}

impl Scrape {
    async fn take(port: u16) -> Scrape {
        let (status, text) = http_get(port, "/metrics").await;
        assert_eq!(status, 200, "{text}");
        let parsed = openmetrics_parser::prometheus::parse_prometheus(&text)
            .unwrap_or_else(|e| panic!("/metrics is not valid Prometheus text: {e:?}\n{text}"));
        Scrape { text, parsed }
    }

    /// Every sample of a family as (labels, value); a histogram's value is
    /// its count.
    fn samples(&self, name: &str) -> Vec<(HashMap<String, String>, f64)> {
        let Some(family) = self.parsed.families.get(name) else {
            return Vec::new();
        };
        family
            .iter_samples()
            .map(|s| {
                let labels = s
                    .get_labelset()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let value = match &s.value {
                    PrometheusValue::Counter(c) => c.value.as_f64(),
                    PrometheusValue::Gauge(n) | PrometheusValue::Unknown(n) => n.as_f64(),
                    PrometheusValue::Histogram(h) => h.count.unwrap_or(0) as f64,
                    PrometheusValue::Summary(s) => s.count.unwrap_or(0) as f64,
                };
                (labels, value)
            })
            .collect()
    }

    /// The value of the one sample with exactly these labels.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: HashMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples(name)
            .into_iter()
            .find(|(l, _)| {
                // An empty label value is the same as no label.
                let l: HashMap<_, _> = l.iter().filter(|(_, v)| !v.is_empty()).collect();
                let w: HashMap<_, _> = want.iter().filter(|(_, v)| !v.is_empty()).collect();
                l == w
            })
            .map(|(_, v)| v)
    }

    fn sum(&self, name: &str) -> f64 {
        self.samples(name).iter().map(|(_, v)| v).sum()
    }
}

async fn client(server: &common::TollgateProcess) -> TollgateClient<Channel> {
    let channel = Channel::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    TollgateClient::new(channel)
}

fn check(team: &str, request_id: &str) -> pb::CheckRequest {
    pb::CheckRequest {
        attributes: Some(pb::Attributes {
            api_key: RAW_KEY.to_string(),
            team: team.to_string(),
            ..Default::default()
        }),
        estimate: Some(pb::Estimate {
            input_tokens: Some(300),
            output_tokens: Some(200),
            ..Default::default()
        }),
        request_id: request_id.to_string(),
    }
}

fn verdict(r: &pb::CheckResponse) -> pb::Verdict {
    pb::Verdict::try_from(r.verdict).unwrap()
}

async fn status_version(port: u16) -> serde_json::Value {
    let (_, body) = http_get(port, "/status").await;
    serde_json::from_str(&body).unwrap()
}

/// Polls `/status` until `what` holds; fails after 20 s.
async fn wait_for(port: u16, what: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status_version(port).await;
        if what(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "status did not change within 20 s: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_decision_over_grpc_and_http() {
    let dir = common::policy_dir(&[("p.yaml", POLICY)]);
    let server = common::TollgateProcess::start(&[
        "--policies",
        dir.path().to_str().unwrap(),
        "--metrics-max-scopes",
        "3",
    ]);
    let mut grpc = client(&server).await;

    let mut reservations = Vec::new();
    let mut grpc_verdicts = Vec::new();
    for i in 0..5 {
        let r = grpc
            .check(check("a", &format!("a-{i}")))
            .await
            .unwrap()
            .into_inner();
        grpc_verdicts.push(verdict(&r));
        if !r.reservation_id.is_empty() {
            reservations.push(r.reservation_id);
        }
    }
    assert_eq!(
        grpc_verdicts,
        [[pb::Verdict::Allow; 3].as_slice(), &[pb::Verdict::Deny; 2]].concat()
    );
    let mut http_codes = Vec::new();
    for _ in 0..4 {
        http_codes.push(http_check(server.http_port, "b").await);
    }
    assert_eq!(http_codes, [200, 200, 200, 429]);
    // No attributes at all: a caller error, not a decision.
    let bad = grpc.check(pb::CheckRequest::default()).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    // A fourth scope of team-daily finds the tracked set (3) full.
    let r = grpc.check(check("c", "c-0")).await.unwrap().into_inner();
    assert_eq!(verdict(&r), pb::Verdict::Allow);
    reservations.push(r.reservation_id);
    grpc.settle(pb::SettleRequest {
        reservation_id: reservations[0].clone(),
        usage: Some(pb::ActualUsage::default()),
    })
    .await
    .unwrap();

    let m = Scrape::take(server.http_port).await;
    let decisions = "tollgate_decisions_total";
    assert_eq!(
        m.value(
            decisions,
            &[("result", "allow"), ("reason", "allowed"), ("rule", "")]
        ),
        Some(7.0)
    );
    assert_eq!(
        m.value(
            decisions,
            &[
                ("result", "deny"),
                ("reason", "budget_exceeded"),
                ("rule", "team-daily")
            ]
        ),
        Some(3.0)
    );
    assert_eq!(
        m.value(
            decisions,
            &[
                ("result", "error"),
                ("reason", "invalid_request"),
                ("rule", "")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(m.sum(decisions), 11.0, "{}", m.text);
    assert_eq!(
        m.value("tollgate_decision_duration_seconds", &[]),
        Some(11.0)
    );
    // 10 reservations (the invalid request never reaches the store), and a
    // lookup plus a settle.
    assert_eq!(m.value("tollgate_store_duration_seconds", &[]), Some(12.0));
    assert_eq!(m.sum("tollgate_store_errors_total"), 0.0);
    assert_eq!(m.value("tollgate_reservations_in_flight", &[]), Some(6.0));

    let used = |rule: &str, scope: &str| {
        m.value(
            "tollgate_usage_used",
            &[("rule", rule), ("scope", scope), ("unit", "requests")],
        )
    };
    assert_eq!(used("team-daily", "team=a"), Some(3.0));
    assert_eq!(used("team-daily", "team=b"), Some(3.0));
    assert_eq!(used("team-daily", "team=c"), None, "past the cap");
    let key_scope = format!(
        "key=sha256:{}",
        tollgate_core::policy::hex(&tollgate_core::engine::request::hash_key(RAW_KEY)[..8])
    );
    assert_eq!(used("key-requests", &key_scope), Some(7.0));
    assert_eq!(
        m.value(
            "tollgate_usage_limit",
            &[
                ("rule", "key-requests"),
                ("scope", &key_scope),
                ("unit", "requests")
            ]
        ),
        Some(100.0)
    );
    assert_eq!(
        m.value(
            "tollgate_usage_decisions_total",
            &[("rule", "team-daily"), ("scope", "team=a")]
        ),
        Some(5.0)
    );
    assert_eq!(
        m.value(
            "tollgate_usage_decisions_total",
            &[("rule", "team-daily"), ("scope", "other")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value("tollgate_usage_scopes_overflow_total", &[]),
        Some(1.0)
    );
    assert_eq!(m.value("tollgate_usage_scopes_tracked", &[]), Some(3.0));
    assert!(!m.text.contains(RAW_KEY), "the raw key is in /metrics");

    // Reloads: one applied, one rejected; the info gauge follows.
    let before = status_version(server.http_port).await;
    assert_eq!(
        m.value(
            "tollgate_policy_info",
            &[("version", before["version"].as_str().unwrap())]
        ),
        Some(1.0)
    );
    assert_eq!(m.value("tollgate_policy_rules", &[]), Some(2.0));
    std::fs::write(
        dir.path().join("p.yaml"),
        POLICY.replace("requests: 3,", "requests: 4,"),
    )
    .unwrap();
    let after = wait_for(server.http_port, |s| s["version"] != before["version"]).await;
    std::fs::write(dir.path().join("p.yaml"), "rules: [ {id: broken} ]\n").unwrap();
    wait_for(server.http_port, |s| !s["last_error"].is_null()).await;
    let m = Scrape::take(server.http_port).await;
    let reloads = |result: &str| m.value("tollgate_policy_reloads_total", &[("result", result)]);
    assert_eq!(reloads("success"), Some(1.0));
    assert_eq!(reloads("failure"), Some(1.0));
    assert_eq!(
        m.value(
            "tollgate_policy_info",
            &[("version", after["version"].as_str().unwrap())]
        ),
        Some(1.0)
    );
    assert_eq!(m.samples("tollgate_policy_info").len(), 1);
    // A decision under the new limit moves the scope's limit gauge, which
    // is set only when the limit changes.
    let limit = |m: &Scrape| {
        m.value(
            "tollgate_usage_limit",
            &[
                ("rule", "team-daily"),
                ("scope", "team=a"),
                ("unit", "requests"),
            ],
        )
    };
    assert_eq!(limit(&m), Some(3.0));
    let r = grpc
        .check(check("a", "a-after"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(verdict(&r), pb::Verdict::Allow, "the 4th of a limit of 4");
    assert_eq!(limit(&Scrape::take(server.http_port).await), Some(4.0));
}

/// Store faults are counted by kind, and the decision they failed is
/// counted as an error with the same kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_errors_are_counted_by_kind() {
    let mut redis = common::RedisServer::start();
    let dir = common::policy_dir(&[("p.yaml", POLICY)]);
    let server = common::TollgateProcess::start(&[
        "--policies",
        dir.path().to_str().unwrap(),
        "--redis",
        &redis.url(),
        "--store-timeout-ms",
        "300",
    ]);
    let mut grpc = client(&server).await;
    let ok = grpc.check(check("a", "")).await.unwrap().into_inner();
    assert_eq!(verdict(&ok), pb::Verdict::Allow);
    redis.kill();
    let failed = grpc.check(check("a", "")).await.unwrap_err();
    assert_eq!(failed.code(), tonic::Code::Unavailable);

    let m = Scrape::take(server.http_port).await;
    let errors = m.samples("tollgate_store_errors_total");
    assert_eq!(errors.len(), 1, "{}", m.text);
    let (labels, count) = &errors[0];
    assert_eq!(*count, 1.0);
    let kind = labels["kind"].as_str();
    assert!(["unavailable", "timeout"].contains(&kind), "{kind}");
    assert_eq!(
        m.value(
            "tollgate_decisions_total",
            &[
                ("result", "error"),
                ("reason", &format!("store_{kind}")),
                ("rule", "")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(m.value("tollgate_store_duration_seconds", &[]), Some(2.0));
}

fn audit_lines(path: &std::path::Path) -> (String, Vec<serde_json::Value>) {
    let text = std::fs::read_to_string(path).unwrap();
    let lines = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (text, lines)
}

/// Runs a server with the audit flags, makes `checks` gRPC checks for team
/// a (request ids r-0, r-1, ...), stops it with SIGTERM (which flushes the
/// log) and returns the log.
async fn audited(flags: &[&str], checks: usize) -> (String, Vec<serde_json::Value>) {
    let dir = common::policy_dir(&[("p.yaml", POLICY)]);
    let out = tempfile::tempdir().unwrap();
    let log = out.path().join("audit.jsonl");
    let mut args = vec![
        "--policies",
        dir.path().to_str().unwrap(),
        "--audit-log",
        log.to_str().unwrap(),
    ];
    args.extend_from_slice(flags);
    let mut server = common::TollgateProcess::start(&args);
    let mut grpc = client(&server).await;
    for i in 0..checks {
        grpc.check(check("a", &format!("r-{i}"))).await.unwrap();
    }
    let status = server.signal_and_wait("TERM");
    assert!(status.success(), "{status:?}");
    audit_lines(&log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_has_one_line_per_decision_without_the_raw_key() {
    let (text, lines) = audited(&[], 5).await;
    assert!(!text.contains(RAW_KEY), "the raw key is in the audit log");
    assert_eq!(lines.len(), 5, "{text}");
    let key_hash = tollgate_core::policy::hex(&tollgate_core::engine::request::hash_key(RAW_KEY));
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["request_id"], format!("r-{i}"));
        assert!(line["ts"].as_str().unwrap().ends_with('Z'), "{line}");
        assert_eq!(line["attributes"]["team"], "a");
        assert_eq!(line["attributes"]["api_key_sha256"], key_hash.as_str());
        assert_eq!(
            line["attributes"]["key"],
            format!("sha256:{}", &key_hash[..16])
        );
        assert_eq!(
            line["rules"],
            serde_json::json!(["team-daily", "key-requests"])
        );
        let charge = line["charge"].as_array().unwrap();
        assert_eq!(charge.len(), 2, "{line}");
        assert!(
            charge.contains(&serde_json::json!({
                "rule": "team-daily", "scope": "team=a", "unit": "requests", "amount": "1"
            })),
            "{line}"
        );
    }
    for line in &lines[..3] {
        assert_eq!(line["verdict"], "allow");
        assert_eq!(line["reason"], "allowed");
        assert_eq!(line["charged"], true);
        assert_eq!(line["message"], "within budget");
    }
    for line in &lines[3..] {
        assert_eq!(line["verdict"], "deny");
        assert_eq!(line["reason"], "budget_exceeded");
        assert_eq!(line["rule"], "team-daily");
        assert_eq!(line["scope"], "team=a");
        assert_eq!(line["charged"], false);
        assert!(
            line["message"]
                .as_str()
                .unwrap()
                .contains("rule `team-daily` allows 3 requests"),
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_samples_and_keeps_only_denials_when_asked() {
    // Half of ten decisions, spread evenly: every second one.
    let (text, lines) = audited(&["--audit-sample", "0.5"], 10).await;
    let ids: Vec<&str> = lines
        .iter()
        .map(|l| l["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["r-1", "r-3", "r-5", "r-7", "r-9"], "{text}");

    let (text, lines) = audited(&["--audit-denials-only"], 5).await;
    let ids: Vec<&str> = lines
        .iter()
        .map(|l| l["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["r-3", "r-4"], "{text}");
    assert!(lines.iter().all(|l| l["verdict"] == "deny"));

    let (text, _) = audited(&["--audit-sample", "0"], 5).await;
    assert!(text.is_empty(), "{text}");

    let refused = std::process::Command::new(BIN)
        .args(["serve", "--audit-sample", "1.5"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("between 0 and 1"));
}

const USAGE_POLICY: &str = "
rules:
  - id: team-daily
    match: { team: \"*\" }
    per: [team]
    limit: { requests: 5, window: daily }
  - id: team-tokens
    match: { team: \"*\" }
    per: [team]
    limit: { tokens: 10000, window: daily }
    enforcement: soft
";

fn usage_cmd(args: &[&str]) -> String {
    let out = std::process::Command::new(BIN)
        .arg("usage")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "usage {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains(RAW_KEY));
    text
}

/// The table line of a rule and scope, split into its columns.
fn table_row(table: &str, rule: &str, scope: &str) -> String {
    table
        .lines()
        .find(|l| l.starts_with(rule) && l.contains(&format!(" {scope} ")))
        .unwrap_or_else(|| panic!("no row for {rule} {scope} in:\n{table}"))
        .to_string()
}

fn json_counter<'a>(
    report: &'a serde_json::Value,
    rule: &str,
    scope: &str,
) -> &'a serde_json::Value {
    report["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["rule"] == rule && c["scope"] == scope)
        .unwrap_or_else(|| panic!("no {rule} {scope} in {report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_from_a_running_server() {
    let dir = common::policy_dir(&[("p.yaml", USAGE_POLICY)]);
    let server = common::TollgateProcess::start(&["--policies", dir.path().to_str().unwrap()]);
    let mut grpc = client(&server).await;
    for _ in 0..2 {
        grpc.check(check("growth", "")).await.unwrap();
    }
    grpc.check(check("data", "")).await.unwrap();
    let url = format!("http://127.0.0.1:{}", server.http_port);

    let table = usage_cmd(&["--server", &url]);
    assert!(table.starts_with("RULE"), "{table}");
    let row = table_row(&table, "team-daily", "team=growth");
    assert!(row.contains(" 2 / 5 "), "{row}");
    assert!(
        row.contains(&format!("[{}{}]", "#".repeat(8), ".".repeat(12))),
        "{row}"
    );
    assert!(row.contains(" 40.0% "), "{row}");
    let row = table_row(&table, "team-tokens", "team=growth");
    assert!(row.contains(" 1000 / 10000 "), "{row}");
    assert!(row.contains(" 10.0% "), "{row}");
    assert!(row.ends_with("(soft)"), "{row}");
    assert!(table_row(&table, "team-daily", "team=data").contains(" 1 / 5 "));

    let json: serde_json::Value =
        serde_json::from_str(&usage_cmd(&["--server", &url, "--json"])).unwrap();
    assert_eq!(json["scopes_tracked"], 4);
    assert_eq!(json["scopes_max"], 1000);
    let c = json_counter(&json, "team-daily", "team=growth");
    assert_eq!(c["used"], "2");
    assert_eq!(c["limit"], "5");
    assert_eq!(c["remaining"], "3");
    assert_eq!(c["window"], "daily");
    assert!(c["resets_at"].as_i64().unwrap() > 0);
    assert_eq!(
        json_counter(&json, "team-tokens", "team=data")["used"],
        "500"
    );

    // The server reads the store at the time of asking, not the last
    // decision's numbers: a settle that trues up tokens shows at once.
    let r = grpc.check(check("growth", "")).await.unwrap().into_inner();
    grpc.settle(pb::SettleRequest {
        reservation_id: r.reservation_id,
        usage: Some(pb::ActualUsage {
            input_tokens: 4000,
            output_tokens: 1000,
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(&usage_cmd(&[
        "--server",
        &url,
        "--json",
        "--rule",
        "team-tokens",
    ]))
    .unwrap();
    assert_eq!(
        json_counter(&json, "team-tokens", "team=growth")["used"],
        "6000"
    );
    assert!(json["counters"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["rule"] == "team-tokens"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_straight_from_redis() {
    let redis = common::RedisServer::start();
    let dir = common::policy_dir(&[("p.yaml", USAGE_POLICY)]);
    let policies = dir.path().to_str().unwrap();
    let server = common::TollgateProcess::start(&["--policies", policies, "--redis", &redis.url()]);
    let mut grpc = client(&server).await;
    for _ in 0..3 {
        grpc.check(check("growth", "")).await.unwrap();
    }
    grpc.check(check("data", "")).await.unwrap();
    drop(server);

    let url = redis.url();
    let table = usage_cmd(&[
        "--redis",
        &url,
        "--policies",
        policies,
        "--attr",
        "team=growth",
    ]);
    let row = table_row(&table, "team-daily", "team=growth");
    assert!(row.contains(" 3 / 5 "), "{row}");
    assert!(row.contains(" 60.0% "), "{row}");
    assert!(table_row(&table, "team-tokens", "team=growth").contains(" 1500 / 10000 "));
    assert!(!table.contains("team=data"), "{table}");

    let json: serde_json::Value = serde_json::from_str(&usage_cmd(&[
        "--redis",
        &url,
        "--policies",
        policies,
        "--attr",
        "team=data",
        "--json",
    ]))
    .unwrap();
    let c = json_counter(&json, "team-daily", "team=data");
    assert_eq!(c["used"], "1");
    assert_eq!(c["remaining"], "4");
    assert_eq!(json["counters"].as_array().unwrap().len(), 2);

    // Another prefix is another set of counters.
    let json: serde_json::Value = serde_json::from_str(&usage_cmd(&[
        "--redis",
        &url,
        "--redis-prefix",
        "elsewhere:",
        "--policies",
        policies,
        "--attr",
        "team=data",
        "--json",
    ]))
    .unwrap();
    assert_eq!(json_counter(&json, "team-daily", "team=data")["used"], "0");
}

/// A server on a Redis of its own, with leases (the default), and one
/// rule per team far from its cap, so that its counters are leased.
fn leasing_server() -> (
    common::RedisServer,
    tempfile::TempDir,
    common::TollgateProcess,
) {
    let redis = common::RedisServer::start();
    let dir = common::policy_dir(&[(
        "p.yaml",
        "rules:\n  - id: far\n    match: { team: '*' }\n    per: [team]\n    limit: { requests: 1000000000, window: daily }\n",
    )]);
    let server = common::TollgateProcess::start(&[
        "--policies",
        dir.path().to_str().unwrap(),
        "--redis",
        &redis.url(),
    ]);
    (redis, dir, server)
}

/// On Redis, where leases are on by default, `/metrics` counts the
/// decisions made from a lease, those that went to Redis, the leases
/// granted and the Redis calls, as the lease store counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_metrics_count_hits_misses_refills_and_redis_calls() {
    let (_redis, _dir, server) = leasing_server();
    let mut grpc = client(&server).await;
    for _ in 0..200 {
        let r = grpc.check(check("growth", "")).await.unwrap().into_inner();
        assert_eq!(verdict(&r), pb::Verdict::Allow);
    }
    // The lease store's counts reach the metrics once a second.
    let port = server.http_port;
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = Scrape::take(port).await;
        let counted = m.sum("tollgate_lease_hits_total") + m.sum("tollgate_lease_misses_total");
        if counted >= 200.0 || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (hits, misses) = (
        m.sum("tollgate_lease_hits_total"),
        m.sum("tollgate_lease_misses_total"),
    );
    assert_eq!(hits + misses, 200.0, "every decision is a hit or a miss");
    assert!(misses >= 1.0, "the first decision goes to Redis: {misses}");
    assert!(hits > 150.0, "most are made from the lease: {hits}");
    assert!(m.sum("tollgate_lease_refills_total") >= 1.0);
    let calls = m.sum("tollgate_lease_redis_calls_total");
    assert!(
        calls >= misses && calls < 100.0,
        "Redis calls {calls} for 200 decisions, {misses} of them in Redis"
    );
}

/// What a replica holds unspent in its lease is reported apart from what
/// was used, in `/v1/usage` and in the dashboard's data, not as spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_the_dashboard_show_leases_apart_from_use() {
    let (_redis, _dir, server) = leasing_server();
    let mut grpc = client(&server).await;
    for _ in 0..20 {
        grpc.check(check("growth", "")).await.unwrap();
    }
    // Read while the lease is held (it goes back after 200 ms idle).
    let (_, usage) = http_get(server.http_port, "/v1/usage").await;
    let (_, dashboard) = http_get(server.http_port, "/v1/dashboard").await;
    let usage: serde_json::Value = serde_json::from_str(&usage).unwrap();
    let row = usage["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["rule"] == "far")
        .unwrap_or_else(|| panic!("{usage}"))
        .clone();
    assert_eq!(row["used"], "20", "{row}");
    let leased: u64 = row["leased"]
        .as_str()
        .unwrap_or_else(|| panic!("{row}"))
        .parse()
        .unwrap();
    assert!(leased > 0, "{row}");
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let text = dashboard.to_string();
    assert!(
        text.contains("\"leased\""),
        "the dashboard data shows the lease: {text}"
    );
}

/// `--audit-log -` writes the lines to standard output, flushed by the
/// time the process has exited on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_to_stdout() {
    use std::io::{BufRead, Read};
    let dir = common::policy_dir(&[("p.yaml", POLICY)]);
    let (port, http_port) = (common::free_port(), common::free_port());
    /// Kills the server if the test fails before stopping it.
    struct Guard(std::process::Child);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Guard(
        std::process::Command::new(BIN)
            .args(["serve", "--ephemeral", "--audit-log", "-", "--policies"])
            .arg(dir.path())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = std::io::BufReader::new(child.0.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if line.contains("serving gRPC") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(20)).unwrap();
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = TollgateClient::new(channel);
    for i in 0..4 {
        grpc.check(check("a", &format!("s-{i}"))).await.unwrap();
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status();
    let mut out = String::new();
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(child.0.wait().unwrap().success());
    let verdicts: Vec<String> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["verdict"].to_string())
        .collect();
    assert_eq!(
        verdicts,
        ["\"allow\"", "\"allow\"", "\"allow\"", "\"deny\""],
        "{out}"
    );
    assert!(!out.contains(RAW_KEY));
}

/// A reservation nobody settles stops counting as in flight when it
/// expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_in_flight_expire_with_their_ttl() {
    let dir = common::policy_dir(&[("p.yaml", POLICY)]);
    let server = common::TollgateProcess::start(&[
        "--policies",
        dir.path().to_str().unwrap(),
        "--reservation-ttl",
        "1s",
    ]);
    let mut grpc = client(&server).await;
    for _ in 0..2 {
        grpc.check(check("a", "")).await.unwrap();
    }
    let m = Scrape::take(server.http_port).await;
    assert_eq!(m.value("tollgate_reservations_in_flight", &[]), Some(2.0));
    // Poll until they lapse (1 s, plus at most one 100 ms bucket).
    let deadline = Instant::now() + Duration::from_secs(20);
    let m = loop {
        let m = Scrape::take(server.http_port).await;
        if m.value("tollgate_reservations_in_flight", &[]) == Some(0.0) || Instant::now() > deadline
        {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        m.value("tollgate_reservations_in_flight", &[]),
        Some(0.0),
        "still in flight 20 s after reservations with a 1 s TTL:\n{}",
        m.text
    );
}

/// A caller that gives up mid-decision (here its gRPC deadline passes while
/// Redis is stalled) is counted as cancelled, not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_whose_caller_gives_up_is_counted_as_cancelled() {
    let port = common::free_port();
    let redis = common::RedisServer::start_with(port, &["--enable-debug-command", "yes"]);
    let dir = common::policy_dir(&[("p.yaml", POLICY)]);
    let server = common::TollgateProcess::start(&[
        "--policies",
        dir.path().to_str().unwrap(),
        "--redis",
        &redis.url(),
        "--store-timeout-ms",
        "3000",
    ]);
    let mut grpc = client(&server).await;
    grpc.check(check("a", "")).await.unwrap();
    let sleeper = std::thread::spawn(move || {
        std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string(), "debug", "sleep", "2"])
            .output()
            .unwrap()
    });
    // Wait until Redis really is asleep: a PING goes unanswered. Starting
    // redis-cli can take a while on a loaded machine.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        conn.write_all(b"PING\r\n").await.unwrap();
        let mut buf = [0u8; 16];
        let answered = tokio::time::timeout(Duration::from_millis(100), conn.read(&mut buf))
            .await
            .is_ok();
        if !answered {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Redis never went to sleep"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut request = tonic::Request::new(check("a", ""));
    request.set_timeout(Duration::from_millis(300));
    let status = grpc.check(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Cancelled, "{status:?}");
    sleeper.join().unwrap();
    let m = Scrape::take(server.http_port).await;
    assert_eq!(
        m.value(
            "tollgate_decisions_total",
            &[
                ("result", "cancelled"),
                ("reason", "cancelled"),
                ("rule", "")
            ]
        ),
        Some(1.0),
        "{}",
        m.text
    );
    assert_eq!(m.sum("tollgate_decisions_total"), 2.0);
}
