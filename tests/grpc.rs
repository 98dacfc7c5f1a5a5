//! The native gRPC API against a real server on a free port.

mod common;

use std::sync::Arc;

use tokio::net::TcpListener;
use tollgate::proto::v1 as pb;
use tollgate::proto::v1::tollgate_client::TollgateClient;
use tollgate_core::gate::{Gate, GateConfig, SystemClock};
use tollgate_core::store::MemoryStore;
use tonic::Code;

const POLICY: &str = "
pricing:
  unpriced_models: reject
  models:
    gpt-4o: { input_per_mtok: 2.50, output_per_mtok: 10.00 }
    gpt-4o-mini: { input_per_mtok: 0.15, output_per_mtok: 0.60 }
    claude-sonnet-4:
      input_per_mtok: 3.00
      cache_write_per_mtok: 3.75
      output_per_mtok: 15.00
      batch_discount: 0.5
      per_call: { web_search: 0.01 }
rules:
  - id: team-spend
    match: { team: \"*\" }
    per: [team]
    limit: { spend: 0.05, window: monthly }
  - id: per-customer
    match: { customer: \"*\" }
    per: [customer]
    limit: { requests: 2, window: daily }
";

/// Starts a server on a free port; it stops when the sender is dropped.
async fn start() -> (tonic::transport::Channel, tokio::sync::oneshot::Sender<()>) {
    let gate = Arc::new(Gate::new(
        common::policy(POLICY),
        Arc::new(MemoryStore::default()),
        Arc::new(SystemClock),
        GateConfig::default(),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let reloader = tollgate::reload::Reloader::new(gate.clone(), common::reload_config(&[]));
    tokio::spawn(tollgate::server::serve_grpc(
        gate,
        reloader,
        listener,
        async {
            let _ = stopped.await;
        },
    ));
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (channel, stop)
}

async fn client() -> (
    TollgateClient<tonic::transport::Channel>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (channel, stop) = start().await;
    (TollgateClient::new(channel), stop)
}

fn check(team: &str, customer: &str, model: &str) -> pb::CheckRequest {
    pb::CheckRequest {
        attributes: Some(pb::Attributes {
            team: team.to_string(),
            customer: customer.to_string(),
            model: model.to_string(),
            ..Default::default()
        }),
        estimate: Some(pb::Estimate {
            input_tokens: Some(1000),
            output_tokens: Some(1000),
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

#[tokio::test]
async fn check_settle_and_usage_end_to_end() {
    let (mut client, _stop) = client().await;

    let allowed = client
        .check(check("growth", "acme", "gpt-4o"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(allowed.verdict(), pb::Verdict::Allow);
    assert_eq!(allowed.reason, "allowed");
    assert!(!allowed.reservation_id.is_empty());
    assert!(!allowed.policy_version.is_empty());
    let spend = allowed
        .counters
        .iter()
        .find(|c| c.rule == "team-spend")
        .unwrap();
    assert_eq!(
        (spend.used.as_str(), spend.remaining.as_str()),
        ("0.0125", "0.0375")
    );
    assert!(spend.resets_at > 0);

    // Settle with the real usage: 200 in, 100 out = 0.0005 + 0.001.
    let settled = client
        .settle(pb::SettleRequest {
            reservation_id: allowed.reservation_id.clone(),
            usage: Some(pb::ActualUsage {
                input_tokens: 200,
                output_tokens: 100,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(settled.outcome, "settled");
    let again = client
        .settle(pb::SettleRequest {
            reservation_id: allowed.reservation_id,
            usage: Some(pb::ActualUsage::default()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.outcome, "already_settled");

    let usage = client
        .usage(pb::UsageRequest {
            attributes: check("growth", "acme", "gpt-4o").attributes,
        })
        .await
        .unwrap()
        .into_inner();
    let spend = usage
        .counters
        .iter()
        .find(|c| c.rule == "team-spend")
        .unwrap();
    assert_eq!(spend.used, "0.0015");
    let per_customer = usage
        .counters
        .iter()
        .find(|c| c.rule == "per-customer")
        .unwrap();
    assert_eq!(
        (per_customer.used.as_str(), per_customer.scope.as_str()),
        ("1", "customer=acme")
    );

    client
        .check(check("growth", "acme", "gpt-4o"))
        .await
        .unwrap();
    let denied = client
        .check(check("growth", "acme", "gpt-4o"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(denied.verdict(), pb::Verdict::Deny);
    assert_eq!(denied.reason, "budget_exceeded");
    assert_eq!(denied.rule, "per-customer");
    assert_eq!(denied.scope, "customer=acme");
    assert!(!denied.retryable);
    assert!(denied.retry_after_seconds > 0 && denied.retry_after_seconds <= 86_400);
    assert!(denied.reservation_id.is_empty());
}

#[tokio::test]
async fn request_ids_make_checks_idempotent() {
    let (mut client, _stop) = client().await;
    let mut req = check("t", "idem", "gpt-4o-mini");
    req.request_id = "req-42".to_string();
    let a = client.check(req.clone()).await.unwrap().into_inner();
    let b = client.check(req.clone()).await.unwrap().into_inner();
    assert_eq!(a.reservation_id, b.reservation_id);
    let usage = client
        .usage(pb::UsageRequest {
            attributes: req.attributes.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let c = usage
        .counters
        .iter()
        .find(|c| c.rule == "per-customer")
        .unwrap();
    assert_eq!(c.used, "1", "a repeated request id must not charge again");
}

#[tokio::test]
async fn malformed_requests_get_invalid_argument_with_a_reason() {
    let (mut client, _stop) = client().await;
    let expect_invalid = |r: Result<tonic::Response<pb::CheckResponse>, tonic::Status>,
                          needle: &str| {
        let status = r.expect_err("must be refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(needle),
            "{needle:?} not in {:?}",
            status.message()
        );
    };

    // Nothing to attribute the request to.
    expect_invalid(
        client.check(pb::CheckRequest::default()).await,
        "no attributes",
    );
    // Unknown model under a spend rule.
    expect_invalid(
        client.check(check("growth", "", "mystery-model")).await,
        "unpriced_model",
    );
    // Bad modality and attempt kind.
    let mut r = check("growth", "", "gpt-4o");
    r.attributes.as_mut().unwrap().modality = "smell".to_string();
    expect_invalid(client.check(r).await, "modality");
    // Absurd and malformed estimates.
    let mut r = check("growth", "", "gpt-4o");
    r.estimate.as_mut().unwrap().input_tokens = Some(u64::MAX);
    expect_invalid(client.check(r).await, "input_tokens");
    let mut r = check("growth", "", "gpt-4o");
    r.estimate.as_mut().unwrap().video_seconds = "-3".to_string();
    expect_invalid(client.check(r).await, "video_seconds");
    let mut r = check("growth", "", "gpt-4o");
    r.estimate.as_mut().unwrap().audio_seconds = "lots".to_string();
    expect_invalid(client.check(r).await, "audio_seconds");
    // A value far beyond any real attribute.
    let mut r = check("growth", "", "gpt-4o");
    r.attributes.as_mut().unwrap().user = "u".repeat(10_000);
    expect_invalid(client.check(r).await, "`user`");

    // A field of megabytes is refused before it is decoded.
    let mut r = check("growth", "", "gpt-4o");
    r.attributes.as_mut().unwrap().workflow = "w".repeat(3 * 1024 * 1024);
    let status = client.check(r).await.expect_err("must be refused");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    // Settle without an id, and with an unknown one.
    let status = client
        .settle(pb::SettleRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = client
        .settle(pb::SettleRequest {
            reservation_id: "nope".to_string(),
            usage: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // The server is still healthy after all of that.
    let ok = client
        .check(check("growth", "", "gpt-4o"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.verdict(), pb::Verdict::Allow);
}

#[tokio::test]
async fn grpc_health_reports_serving() {
    let (channel, _stop) = start().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "tollgate.v1.Tollgate".to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

/// The native Settle carries every way a provider bills: cache writes at
/// their own rate, per-call fees and the batch discount, as HTTP's does.
#[tokio::test]
async fn a_native_settle_prices_cache_writes_calls_and_batch() {
    let (mut client, _stop) = client().await;
    let allowed = client
        .check(check("research", "acme", "claude-sonnet-4"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(allowed.verdict(), pb::Verdict::Allow, "{}", allowed.message);
    let settled = client
        .settle(pb::SettleRequest {
            reservation_id: allowed.reservation_id,
            usage: Some(pb::ActualUsage {
                input_tokens: 2000,
                cache_write_tokens: 1000,
                output_tokens: 100,
                calls: [("web_search".to_string(), 2)].into(),
                batch: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(settled.outcome, "settled");
    let usage = client
        .usage(pb::UsageRequest {
            attributes: check("research", "acme", "claude-sonnet-4").attributes,
        })
        .await
        .unwrap()
        .into_inner();
    let spend = usage
        .counters
        .iter()
        .find(|c| c.rule == "team-spend")
        .unwrap();
    // 1000 plain input at 3.00 and 1000 written at 3.75 per million, 100
    // output at 15.00: 0.003 + 0.00375 + 0.0015 = 0.00825, halved by the
    // batch discount, plus two searches at 0.01.
    let used: rust_decimal::Decimal = spend.used.parse().unwrap();
    assert_eq!(
        used,
        "0.024125".parse::<rust_decimal::Decimal>().unwrap(),
        "spend {used}"
    );
}
