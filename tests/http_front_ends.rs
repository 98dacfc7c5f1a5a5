//! The HTTP front ends for real: nginx (Debian's package) in front of an
//! upstream stub with tollgate behind `auth_request`, and the forward-auth
//! endpoint sharing counters with the Envoy gRPC path.

mod common;

use std::sync::atomic::Ordering;

use common::nginx::{nginx, upstream_stub};
use common::{policy_dir, TollgateProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const POLICY: &str = "
# As if the edge proxy set these headers (and stripped them from clients).
attributes:
  trusted_headers: { team: x-tollgate-team, workflow: x-tollgate-workflow }
pricing:
  models:
    gpt-4o: { input_per_mtok: 2.50, output_per_mtok: 10.00 }
rules:
  - id: team-requests
    match: { team: \"*\" }
    per: [team]
    limit: { requests: 3, window: daily }
  - id: backfills
    owner: data-lead@example.com
    match: { workflow: backfill }
    limit: { requests: 100, window: daily }
    enforcement: approval
";

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request over a fresh connection.
async fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_enforces_budgets_before_the_upstream() {
    let dir = policy_dir(&[("p.yaml", POLICY)]);
    let tollgate = TollgateProcess::start(&["--policies", dir.path().to_str().unwrap()]);
    let (upstream, hits, seen) = upstream_stub().await;
    let nginx = nginx(upstream, tollgate.http_port);
    let ask = [
        ("x-tollgate-team", "growth"),
        ("x-tollgate-model", "gpt-4o"),
        ("x-tollgate-max-tokens", "100"),
    ];
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

    for i in 0..3 {
        let r = http(nginx.port, "POST", "/v1/chat/completions", &ask, body).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
        assert_eq!(r.body, "{\"ok\":true}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    let forwarded = seen.lock().unwrap().clone();
    assert!(
        forwarded.iter().all(|req| req
            .to_ascii_lowercase()
            .contains("x-tollgate-reservation: ")),
        "{forwarded:?}"
    );
    assert!(forwarded.iter().all(|req| req
        .to_ascii_lowercase()
        .contains("x-tollgate-decision: allow")));

    // Over the cap: a 429 with the JSON error at the client, and the
    // upstream is never reached.
    let denied = http(nginx.port, "POST", "/v1/chat/completions", &ask, body).await;
    assert_eq!(denied.status, 429, "{}", denied.body);
    assert_eq!(denied.header("content-type"), Some("application/json"));
    let json: serde_json::Value =
        serde_json::from_str(&denied.body).unwrap_or_else(|e| panic!("{e}: {}", denied.body));
    assert_eq!(json["error"]["code"], "budget_exceeded");
    assert!(json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("team-requests"));
    assert_eq!(denied.header("x-tollgate-rule"), Some("team-requests"));
    assert_eq!(denied.header("x-tollgate-retryable"), Some("false"));
    assert!(
        denied
            .header("retry-after")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 0
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        3,
        "a denied request must not reach the upstream"
    );

    // An approval gate is a 403 with its own code.
    let gated = http(
        nginx.port,
        "POST",
        "/v1/chat/completions",
        &[("x-tollgate-workflow", "backfill")],
        body,
    )
    .await;
    assert_eq!(gated.status, 403);
    let json: serde_json::Value = serde_json::from_str(&gated.body).unwrap();
    assert_eq!(json["error"]["code"], "approval_required");
    assert_eq!(hits.load(Ordering::SeqCst), 3);
}

/// The same request through the Envoy gRPC path and the HTTP forward-auth
/// path gets the same decision from the same counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_http_paths_decide_alike_and_share_counters() {
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
        HttpRequest, Request as AttrRequest,
    };
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};

    let dir = policy_dir(&[("p.yaml", POLICY)]);
    let tollgate = TollgateProcess::start(&["--policies", dir.path().to_str().unwrap()]);
    let channel = tonic::transport::Channel::from_shared(tollgate.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut envoy = AuthorizationClient::new(channel);
    let envoy_check = || CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    method: "POST".to_string(),
                    path: "/v1/chat/completions".to_string(),
                    headers: [
                        ("x-tollgate-team", "shared"),
                        ("x-tollgate-model", "gpt-4o"),
                        (":path", "/v1/chat/completions"),
                    ]
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let forward = || {
        http(
            tollgate.http_port,
            "POST",
            "/v1/authz/forward/v1/chat/completions",
            &[
                ("x-tollgate-team", "shared"),
                ("x-tollgate-model", "gpt-4o"),
            ],
            "",
        )
    };

    let remaining_envoy =
        |r: &envoy_types::pb::envoy::service::auth::v3::CheckResponse| match &r.http_response {
            Some(HttpResponse::OkResponse(ok)) => ok
                .response_headers_to_add
                .iter()
                .filter_map(|h| h.header.as_ref())
                .find(|h| h.key == "x-ratelimit-remaining-requests")
                .map(|h| h.value.clone()),
            _ => None,
        };
    let a = envoy.check(envoy_check()).await.unwrap().into_inner();
    assert_eq!(remaining_envoy(&a).as_deref(), Some("2"));
    let b = forward().await;
    assert_eq!(b.status, 200);
    assert_eq!(
        b.header("x-ratelimit-remaining-requests"),
        Some("1"),
        "the forward path counts on the same counter"
    );
    assert_eq!(b.header("x-tollgate-decision"), Some("allow"));
    let c = envoy.check(envoy_check()).await.unwrap().into_inner();
    assert_eq!(remaining_envoy(&c).as_deref(), Some("0"));

    let d = envoy.check(envoy_check()).await.unwrap().into_inner();
    let Some(HttpResponse::DeniedResponse(denied)) = d.http_response else {
        panic!("must deny")
    };
    let e = forward().await;
    assert_eq!(
        e.status,
        denied.status.unwrap().code as u16,
        "the same decision on both paths"
    );
    assert_eq!(e.status, 429);
    let grpc_body: serde_json::Value = serde_json::from_str(&denied.body).unwrap();
    let http_body: serde_json::Value = serde_json::from_str(&e.body).unwrap();
    assert_eq!(grpc_body["error"]["code"], http_body["error"]["code"]);
    assert_eq!(e.header("x-tollgate-rule"), Some("team-requests"));

    // Settle over HTTP, for callers without gRPC.
    let reservation = b.header("x-tollgate-reservation").unwrap().to_string();
    let body = format!(
        r#"{{"reservation_id":"{reservation}","usage":{{"input_tokens":10,"output_tokens":5}}}}"#
    );
    let settled = http(
        tollgate.http_port,
        "POST",
        "/v1/settle",
        &[("content-type", "application/json")],
        &body,
    )
    .await;
    assert_eq!(settled.status, 200, "{}", settled.body);
    assert!(settled.body.contains("\"settled\""));
    let again = http(
        tollgate.http_port,
        "POST",
        "/v1/settle",
        &[("content-type", "application/json")],
        &body,
    )
    .await;
    assert!(again.body.contains("already_settled"));
    let bad = http(
        tollgate.http_port,
        "POST",
        "/v1/settle",
        &[],
        "{\"reservation\":1}",
    )
    .await;
    assert_eq!(bad.status, 400);
    let unknown = http(
        tollgate.http_port,
        "POST",
        "/v1/settle",
        &[],
        r#"{"reservation_id":"nope"}"#,
    )
    .await;
    assert_eq!(unknown.status, 404);
}

/// Every HTTP error is the JSON error body, even for a path or a method
/// the port does not serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_methods_get_the_json_error_body() {
    let dir = policy_dir(&[("p.yaml", POLICY)]);
    let tollgate = TollgateProcess::start(&["--policies", dir.path().to_str().unwrap()]);
    for (method, path, status, code) in [
        ("GET", "/v1/nowhere", 404, "not_found"),
        ("GET", "/v1/settle", 405, "method_not_allowed"),
        ("POST", "/v1/settle", 400, "invalid_request"),
    ] {
        let r = http(tollgate.http_port, method, path, &[], "").await;
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
        assert_eq!(
            r.header("content-type"),
            Some("application/json"),
            "{method} {path}"
        );
        let json: serde_json::Value = serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}: {}", r.body));
        assert_eq!(json["error"]["code"], code, "{method} {path}");
    }
}
