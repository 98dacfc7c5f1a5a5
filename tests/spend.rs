//! The spend account end to end: two tollgate processes share one Redis;
//! calls are checked on one and settled on the other over the native API,
//! one streamed call goes through ext_proc, and one is never settled. The
//! account, read over `GET /v1/spend`, with `tollgate spend` from the
//! server and straight from Redis, and as CSV, gives the same exact
//! figures as usage times price.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::envoy_ext_proc::{FakeEnvoy, HttpRequest, UpstreamResponse};
use common::{eventually, http_get, policy_dir, RedisServer, TollgateProcess};
use rust_decimal::Decimal;
use tollgate::proto::v1 as pb;
use tollgate::spend::{SpendGroup, SpendReport};

const POLICY: &str = "
pricing:
  unpriced_models: reject
  models:
    gpt-4o: { input_per_mtok: 2.50, output_per_mtok: 10.00, cached_input_per_mtok: 1.25 }
    gpt-4o-mini: { input_per_mtok: 0.15, output_per_mtok: 0.60 }
    claude-sonnet-4: { input_per_mtok: 3.00, output_per_mtok: 15.00 }
rules:
  - id: team-spend
    match: { team: '*' }
    per: [team]
    limit: { spend: 1000, window: daily }
";

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

fn spend_json(port: u16, query: &str) -> SpendReport {
    let (status, body) = http_get(port, &format!("/v1/spend?{query}")).expect("GET /v1/spend");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn cli(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("spend")
        .args(args)
        .output()
        .expect("tollgate spend");
    assert!(
        out.status.success(),
        "tollgate spend {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn by_group(groups: &[SpendGroup], dims: &[&str]) -> BTreeMap<Vec<String>, Decimal> {
    groups
        .iter()
        .map(|g| {
            (
                dims.iter().map(|d| g.group[*d].clone()).collect(),
                g.settled.spend_usd.parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn the_account_adds_up_across_replicas_paths_and_reports() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let redis = RedisServer::start();
    let dir = policy_dir(&[("p.yaml", POLICY)]);
    let url = redis.url();
    let args = [
        "--policies",
        dir.path().to_str().unwrap(),
        "--redis",
        &url,
        "--store-timeout-ms",
        "2000",
    ];
    let servers = [TollgateProcess::start(&args), TollgateProcess::start(&args)];
    let today = tollgate::spend::day_text(tollgate_core::store::spend::utc_day(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64,
    ));

    // (team, model, input, cached, output) settled over the native API, on
    // the other replica than the one that decided.
    let native: [(&str, &str, u64, u64, u64); 4] = [
        ("growth", "gpt-4o", 1_200, 200, 310),
        ("growth", "gpt-4o-mini", 900, 0, 1_700),
        ("search", "claude-sonnet-4", 12_345, 0, 6_789),
        ("search", "gpt-4o", 5_000, 1_000, 64),
    ];
    let mut expected: BTreeMap<Vec<String>, Decimal> = BTreeMap::new();
    let price = |model: &str| match model {
        "gpt-4o" => (d("2.50"), d("1.25"), d("10.00")),
        "gpt-4o-mini" => (d("0.15"), d("0.15"), d("0.60")),
        _ => (d("3.00"), d("3.00"), d("15.00")),
    };
    let mtok = Decimal::from(1_000_000);
    rt.block_on(async {
        let mut clients = common::grpc_clients(&servers).await;
        for (i, (team, model, input, cached, output)) in native.iter().enumerate() {
            let decision = clients[i % 2]
                .check(pb::CheckRequest {
                    attributes: Some(pb::Attributes {
                        team: team.to_string(),
                        model: model.to_string(),
                        environment: "prod".to_string(),
                        ..Default::default()
                    }),
                    estimate: Some(pb::Estimate {
                        input_tokens: Some(*input),
                        output_tokens: Some(4_000),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(decision.verdict, pb::Verdict::Allow as i32, "{decision:?}");
            let settled = clients[(i + 1) % 2]
                .settle(pb::SettleRequest {
                    reservation_id: decision.reservation_id,
                    usage: Some(pb::ActualUsage {
                        input_tokens: *input,
                        cached_input_tokens: *cached,
                        output_tokens: *output,
                        ..Default::default()
                    }),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(settled.outcome, "settled");
            let (pi, pc, po) = price(model);
            let cost = (Decimal::from(input - cached) * pi
                + Decimal::from(*cached) * pc
                + Decimal::from(*output) * po)
                / mtok;
            *expected
                .entry(vec![model.to_string(), team.to_string()])
                .or_default() += cost;
        }
        // Never settled: 100 in and 2,000 out of gpt-4o, estimated.
        let unsettled = clients[0]
            .check(common::native_check("growth", "gpt-4o", 100, 2_000))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(unsettled.verdict, pb::Verdict::Allow as i32);

        // A streamed call through ext_proc, on the first replica: the
        // stream's last chunk reports 14 in, 21 out of gpt-4o-mini.
        let envoy = FakeEnvoy::connect(servers[0].endpoint()).await;
        let body = serde_json::json!({
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 500,
            "stream": true,
            "stream_options": {"include_usage": true},
        })
        .to_string();
        let sse = concat!(
            "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}],\"usage\":null}\n\n",
            "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":14,\"completion_tokens\":21,\"total_tokens\":35}}\n\n",
            "data: [DONE]\n\n",
        );
        let request = HttpRequest::post("/v1/chat/completions", &body)
            .route("team", "search")
            .route("environment", "prod");
        let x = envoy
            .run(request, |_| UpstreamResponse::sse(&[sse], true))
            .await;
        assert_eq!(x.response().0, 200);
        let (pi, _, po) = price("gpt-4o-mini");
        *expected
            .entry(vec!["gpt-4o-mini".to_string(), "search".to_string()])
            .or_default() += (Decimal::from(14) * pi + Decimal::from(21) * po) / mtok;
    });
    let total: Decimal = expected.values().sum();
    let unsettled_estimate =
        (Decimal::from(100) * d("2.50") + Decimal::from(2_000) * d("10")) / mtok;

    // Each replica writes its part within about a second.
    let query = format!("from={today}&to={today}&by=model,team");
    let port = servers[0].http_port;
    let mut last = None;
    let complete = eventually(Duration::from_secs(10), || {
        let r = spend_json(port, &query);
        let done = r.total.settled.requests == 5 && r.total.estimated.requests == 1;
        last = Some(r);
        done
    });
    let report = last.unwrap();
    assert!(complete, "the account never filled: {report:?}");
    assert_eq!(
        by_group(&report.groups, &["model", "team"]),
        expected,
        "exact by model and team"
    );
    assert_eq!(d(&report.total.settled.spend_usd), total);
    assert_eq!(
        d(&report.total.estimated.spend_usd),
        unsettled_estimate,
        "the unsettled call, apart"
    );
    assert_eq!(report.total.settled.cached_input_tokens, 1_200);

    // Every dimension adds up to the same total; a filter keeps one team.
    for by in [
        "model",
        "model_family",
        "team",
        "key",
        "workflow",
        "environment",
        "customer",
        "modality",
    ] {
        let r = spend_json(servers[1].http_port, &format!("from={today}&by={by}"));
        let sum: Decimal = r.groups.iter().map(|g| d(&g.settled.spend_usd)).sum();
        assert_eq!(sum, total, "by {by}");
    }
    let growth = spend_json(port, &format!("from={today}&by=model&where=team%3Dgrowth"));
    let growth_total: Decimal = expected
        .iter()
        .filter(|(k, _)| k[1] == "growth")
        .map(|(_, v)| *v)
        .sum();
    assert_eq!(d(&growth.total.settled.spend_usd), growth_total);

    // The CLI, from the server as CSV and JSON, and straight from Redis.
    let server_url = format!("http://127.0.0.1:{port}");
    let csv = cli(&[
        "--server",
        &server_url,
        "--from",
        &today,
        "--by",
        "model,team",
        "--csv",
    ]);
    let groups = SpendReport::groups_from_csv(&csv).expect("CSV reads back");
    assert_eq!(
        groups, report.groups,
        "CSV round-trips to the JSON's groups"
    );
    let json = cli(&[
        "--server",
        &server_url,
        "--from",
        &today,
        "--by",
        "model,team",
        "--json",
    ]);
    let from_cli: SpendReport = serde_json::from_str(&json).unwrap();
    assert_eq!(from_cli, report);
    let direct = cli(&[
        "--redis",
        &url,
        "--from",
        &today,
        "--by",
        "model,team",
        "--json",
    ]);
    let direct: SpendReport = serde_json::from_str(&direct).unwrap();
    assert_eq!(direct, report, "straight from Redis, the same account");
    let table = cli(&["--redis", &url, "--from", &today, "--by", "team"]);
    assert!(
        table.contains("growth") && table.contains("total"),
        "{table}"
    );

    // A bad query is a clear 400.
    let (status, body) = http_get(port, "/v1/spend?by=colour").unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("model_family"), "{body}");
}

/// What a server gathered in its last second is written when it stops
/// gracefully, and rows past the day's cap are counted as folded.
#[test]
fn a_graceful_stop_writes_the_last_second_and_the_row_cap_folds() {
    let redis = RedisServer::start();
    let policy = "
rules:
  - id: requests
    match: { team: '*' }
    per: [team]
    limit: { requests: 1000, window: daily }
";
    let dir = policy_dir(&[("p.yaml", policy)]);
    let url = redis.url();
    let mut server = TollgateProcess::start(&[
        "--policies",
        dir.path().to_str().unwrap(),
        "--redis",
        &url,
        "--spend-max-rows",
        "2",
    ]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut client = common::grpc_clients(std::slice::from_ref(&server))
            .await
            .remove(0);
        for team in ["a", "b", "c", "d", "e"] {
            let d = client
                .check(pb::CheckRequest {
                    attributes: Some(pb::Attributes {
                        team: team.to_string(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(d.verdict, pb::Verdict::Allow as i32);
        }
    });
    // Stopped at once: the periodic flush may not have run yet.
    server.signal_and_wait("TERM");
    let json = cli(&["--redis", &url, "--by", "team", "--json"]);
    let report: SpendReport = serde_json::from_str(&json).unwrap();
    assert_eq!(report.total.estimated.requests, 5, "{report:?}");
    let teams: Vec<&str> = report
        .groups
        .iter()
        .map(|g| g.group["team"].as_str())
        .collect();
    assert!(teams.contains(&"other"), "{teams:?}");
    assert_eq!(report.groups.len(), 3, "two rows, then other: {teams:?}");
    assert_eq!(report.folded_rows, 3);
}
