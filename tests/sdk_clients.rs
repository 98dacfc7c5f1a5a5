//! The official OpenAI and Anthropic Python SDKs (pinned in
//! scripts/test-deps, in `target/sdk-venv`) calling through tollgate's HTTP
//! front ends: nginx with the shipped config, and a forward-auth proxy that
//! asks `/v1/authz/forward` the way Traefik's ForwardAuth does. A budget
//! denial with an hour left must reach the SDK as its rate-limit error at
//! once, after one attempt; a concurrency denial must be retried by the SDK
//! after a short wait, and succeed.

mod common;

use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::response::Response;
use common::nginx::{api_upstream_stub, nginx, Nginx};
use common::{policy_dir, TollgateProcess};
use http_body_util::{BodyExt, Full};

const POLICY: &str = r#"
rules:
  - id: attempts-per-action
    match: { action: "job-*" }
    per: [action]
    limit: { requests: 2, window: 1h }
  - id: one-at-a-time
    match: { action: "slot-*" }
    per: [action]
    limit: { concurrent: 1 }
"#;

/// The longest an SDK script may run before the test calls it hung.
const SCRIPT_LIMIT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug)]
enum Front {
    Nginx,
    ForwardAuth,
}

#[derive(Clone, Copy, Debug)]
enum Sdk {
    OpenAi,
    Anthropic,
}

impl Sdk {
    fn name(self) -> &'static str {
        match self {
            Sdk::OpenAi => "openai",
            Sdk::Anthropic => "anthropic",
        }
    }

    /// The path the SDK calls, as a front end sees it.
    fn path(self) -> &'static str {
        match self {
            Sdk::OpenAi => "/v1/chat/completions",
            Sdk::Anthropic => "/v1/messages",
        }
    }
}

/// tollgate, the upstream stub, and the front end in front of both.
struct Stack {
    tollgate: TollgateProcess,
    /// Where the SDK is pointed: the front end.
    base_url: String,
    /// Requests that reached the upstream.
    hits: Arc<AtomicU64>,
    _nginx: Option<Nginx>,
    _dir: tempfile::TempDir,
}

impl Stack {
    async fn start(front: Front) -> Stack {
        let dir = policy_dir(&[("p.yaml", POLICY)]);
        let tollgate = TollgateProcess::start(&["--policies", dir.path().to_str().unwrap()]);
        let (upstream, hits, _) = api_upstream_stub().await;
        let (port, nginx) = match front {
            Front::Nginx => {
                let n = nginx(upstream, tollgate.http_port);
                (n.port, Some(n))
            }
            Front::ForwardAuth => (forward_auth_proxy(tollgate.http_port, upstream).await, None),
        };
        Stack {
            tollgate,
            base_url: format!("http://127.0.0.1:{port}"),
            hits,
            _nginx: nginx,
            _dir: dir,
        }
    }

    /// `tollgate_decisions_total`, summed over its labels.
    async fn decisions(&self) -> u64 {
        let req = hyper::Request::get("/metrics")
            .header("host", "127.0.0.1")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (status, _, body) = send(self.tollgate.http_port, req).await;
        assert_eq!(status, 200, "/metrics");
        String::from_utf8_lossy(&body)
            .lines()
            .filter(|l| l.split(['{', ' ']).next() == Some("tollgate_decisions_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }
}

/// One request over a fresh connection: status, headers and the whole body.
async fn send(port: u16, req: hyper::Request<Full<Bytes>>) -> (StatusCode, HeaderMap, Bytes) {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("connect to {port}: {e}"));
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let response = sender.send_request(req).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, body)
}

/// Headers that belong to one connection, never copied across a proxy.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "content-length"
            | "host"
    )
}

#[derive(Clone, Copy)]
struct ForwardAuth {
    tollgate_http: u16,
    upstream: u16,
}

/// A forward-auth proxy as Traefik's ForwardAuth middleware works by
/// default: for each request it sends tollgate a GET with no body, the
/// client's headers and `X-Forwarded-Method`, `-Uri`, `-Host`, `-Proto` and
/// `-For`. On a 2xx the request goes to the upstream with tollgate's
/// `x-tollgate-*` answer headers added; on anything else tollgate's
/// answer (status, headers, body) goes back to the client as it is.
async fn forward_auth_proxy(tollgate_http: u16, upstream: u16) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new()
        .fallback(forward_auth)
        .with_state(ForwardAuth {
            tollgate_http,
            upstream,
        });
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

async fn forward_auth(State(fa): State<ForwardAuth>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 16 * 1024 * 1024).await.unwrap();
    let uri = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    let client_host = parts
        .headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();

    let mut auth_request = end_to_end(&parts.headers);
    for (k, v) in [
        ("host", format!("127.0.0.1:{}", fa.tollgate_http)),
        ("x-forwarded-method", parts.method.to_string()),
        ("x-forwarded-uri", uri.clone()),
        ("x-forwarded-host", client_host),
        ("x-forwarded-proto", "http".to_string()),
        ("x-forwarded-for", "127.0.0.1".to_string()),
    ] {
        auth_request.insert(k, v.parse().unwrap());
    }
    let mut auth = hyper::Request::get("/v1/authz/forward")
        .body(Full::new(Bytes::new()))
        .unwrap();
    *auth.headers_mut() = auth_request;
    let (status, auth_headers, auth_body) = send(fa.tollgate_http, auth).await;
    if !status.is_success() {
        return response(status, &auth_headers, auth_body);
    }

    // Like `authResponseHeadersRegex: ^X-Tollgate-`: tollgate's values
    // replace any the client sent.
    let mut upstream_headers = end_to_end(&parts.headers);
    for (k, v) in &auth_headers {
        if k.as_str().starts_with("x-tollgate-") {
            upstream_headers.insert(k.clone(), v.clone());
        }
    }
    upstream_headers.insert(
        "host",
        format!("127.0.0.1:{}", fa.upstream).parse().unwrap(),
    );
    let mut upstream = hyper::Request::builder()
        .method(parts.method.clone())
        .uri(&uri)
        .body(Full::new(body))
        .unwrap();
    *upstream.headers_mut() = upstream_headers;
    let (status, headers, body) = send(fa.upstream, upstream).await;
    response(status, &headers, body)
}

/// The headers a proxy passes on: all but the hop-by-hop ones.
fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (k, v) in headers {
        if !hop_by_hop(k) {
            out.append(k.clone(), v.clone());
        }
    }
    out
}

fn response(status: StatusCode, headers: &HeaderMap, body: Bytes) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    *r.headers_mut() = end_to_end(headers);
    r
}

/// Starts tests/sdk/client.py: `calls` SDK calls in turn with `action` as
/// the action id.
fn start_sdk(sdk: Sdk, base_url: &str, action: &str, calls: u32) -> Child {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/client.py");
    let mut cmd = common::sdk::python();
    cmd.arg(script)
        .args([sdk.name(), base_url, action, &calls.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn()
        .unwrap_or_else(|e| panic!("start the SDK script: {e}; run scripts/test-deps"))
}

/// Waits for the script and returns what it printed. A script still running
/// after [`SCRIPT_LIMIT`] is killed and fails the test: an SDK asleep on a
/// long Retry-After is the bug these tests exist for.
async fn finish(mut child: Child, started: Instant) -> serde_json::Value {
    let exited = loop {
        if child.try_wait().unwrap().is_some() {
            break true;
        }
        if started.elapsed() > SCRIPT_LIMIT {
            let _ = child.kill();
            break false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        exited,
        "the SDK call had not returned after {SCRIPT_LIMIT:?} (asleep before a retry?); \
         what it did:\n{stderr}"
    );
    assert!(
        out.status.success(),
        "the SDK script failed ({}):\n{stderr}",
        out.status
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: the SDK script printed {stdout:?}\n{stderr}"))
}

fn header<'a>(v: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    v["headers"][name].as_str()
}

/// Two calls with the same action id succeed; the third is over the
/// budget with an hour left, and must reach the SDK as its rate-limit
/// error after one attempt, at once, with `x-should-retry: false`.
async fn budget_denial_fails_fast(front: Front, sdk: Sdk) {
    let stack = Stack::start(front).await;
    let before = stack.decisions().await;
    let started = Instant::now();
    let out = finish(start_sdk(sdk, &stack.base_url, "job-1", 3), started).await;
    let decided = stack.decisions().await - before;

    let calls = out["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 3, "{out}");
    for (i, c) in calls[..2].iter().enumerate() {
        assert_eq!(c["ok"], true, "call {i} must succeed: {c}");
        assert_eq!(c["text"], "hi", "call {i}: {c}");
        assert_eq!(c["retries_taken"], 0, "call {i}: {c}");
    }
    assert_eq!(stack.hits.load(Ordering::SeqCst), 2);

    let denied = &calls[2];
    assert_eq!(
        denied["ok"], false,
        "the third call must be denied: {denied}"
    );
    assert_eq!(
        denied["rate_limit"], true,
        "the SDK must raise its RateLimitError: {denied}"
    );
    assert_eq!(denied["status"], 429, "{denied}");
    let attempts = denied["attempts"].as_array().unwrap();
    assert_eq!(
        attempts.len(),
        1,
        "the SDK must not retry a budget denial: {denied}"
    );
    assert_eq!(
        decided, 3,
        "two allowed calls and one attempt at the denied one: {out}"
    );
    let elapsed = denied["elapsed"].as_f64().unwrap();
    assert!(
        elapsed < 2.0,
        "the denial must reach the caller at once, took {elapsed:.2} s: {denied}"
    );
    assert_eq!(
        header(denied, "x-should-retry"),
        Some("false"),
        "a budget with an hour left must tell the SDK not to retry: {denied}"
    );
    assert_eq!(
        header(denied, "x-tollgate-retryable"),
        Some("false"),
        "{denied}"
    );
    assert_eq!(
        header(denied, "x-tollgate-reason"),
        Some("budget_exceeded"),
        "every denial names its reason: {denied}"
    );
    assert_eq!(
        header(denied, "x-tollgate-rule"),
        Some("attempts-per-action"),
        "{denied}"
    );
    let retry_after: u64 = header(denied, "retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("retry-after in seconds: {denied}"));
    assert!(retry_after > 0, "{denied}");
    let body: serde_json::Value = serde_json::from_str(denied["body"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {denied}"));
    assert_eq!(body["error"]["code"], "budget_exceeded", "{denied}");
    assert!(body["error"]["message"].is_string() && body["error"]["type"].is_string());
    assert_eq!(
        stack.hits.load(Ordering::SeqCst),
        2,
        "a denied call must not reach the upstream"
    );
}

/// The test holds the action's one slot; the SDK's call is denied for
/// concurrency, the slot is freed while the SDK waits, and its retry goes
/// through.
async fn concurrency_denial_is_retried(front: Front, sdk: Sdk) {
    let stack = Stack::start(front).await;
    let hold = hyper::Request::get("/v1/authz/forward")
        .header("host", "127.0.0.1")
        .header("x-tollgate-action-id", "slot-1")
        .header("x-forwarded-method", "POST")
        .header("x-forwarded-uri", sdk.path())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, headers, body) = send(stack.tollgate.http_port, hold).await;
    assert_eq!(status, 200, "{body:?}");
    let reservation = headers
        .get("x-tollgate-reservation")
        .expect("the held slot's reservation")
        .to_str()
        .unwrap()
        .to_string();

    let before = stack.decisions().await;
    let started = Instant::now();
    let mut child = start_sdk(sdk, &stack.base_url, "slot-1", 1);
    // The SDK's first attempt is decided (and denied: the slot is held)...
    loop {
        if stack.decisions().await > before {
            break;
        }
        if child.try_wait().unwrap().is_some() || started.elapsed() > SCRIPT_LIMIT {
            let out = finish(child, started).await;
            panic!("the SDK finished without asking tollgate: {out}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...and the slot is freed while it waits to retry.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let settle = hyper::Request::post("/v1/settle")
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!(
            r#"{{"reservation_id":"{reservation}","usage":{{}}}}"#
        ))))
        .unwrap();
    let (status, _, body) = send(stack.tollgate.http_port, settle).await;
    assert_eq!(status, 200, "settle: {body:?}");

    let out = finish(child, started).await;
    let decided = stack.decisions().await - before;
    let call = &out["calls"][0];
    assert_eq!(call["ok"], true, "the retried call must succeed: {out}");
    assert_eq!(call["text"], "hi", "{call}");
    assert!(
        call["retries_taken"].as_u64().unwrap() >= 1,
        "the SDK must have retried: {call}"
    );
    assert!(decided >= 2, "{decided} decisions: {call}");
    assert_eq!(stack.hits.load(Ordering::SeqCst), 1, "{call}");

    let attempts = call["attempts"].as_array().unwrap();
    let first = &attempts[0];
    assert_eq!(first["status"], 429, "{call}");
    assert_eq!(
        header(first, "x-should-retry"),
        Some("true"),
        "a concurrency denial must tell the SDK to retry: {call}"
    );
    let retry_after: u64 = header(first, "retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("retry-after in seconds: {call}"));
    assert!(retry_after <= 120, "{call}");
    let retry_after_ms: u64 = header(first, "retry-after-ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a short wait carries retry-after-ms: {call}"));
    assert!(retry_after_ms <= 5_000, "{call}");
    assert_eq!(attempts.last().unwrap()["status"], 200, "{call}");
    let elapsed = call["elapsed"].as_f64().unwrap();
    assert!(elapsed < 5.0, "a short wait, took {elapsed:.2} s: {call}");
    assert_eq!(
        header(first, "x-tollgate-reason"),
        Some("concurrency_limit"),
        "every denial names its reason: {call}"
    );
    assert_eq!(
        header(first, "x-tollgate-retryable"),
        Some("true"),
        "{call}"
    );
}

macro_rules! sdk_test {
    ($name:ident, $scenario:ident, $front:expr, $sdk:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            $scenario($front, $sdk).await
        }
    };
}

sdk_test!(
    nginx_openai_budget_denial_fails_fast,
    budget_denial_fails_fast,
    Front::Nginx,
    Sdk::OpenAi
);
sdk_test!(
    nginx_anthropic_budget_denial_fails_fast,
    budget_denial_fails_fast,
    Front::Nginx,
    Sdk::Anthropic
);
sdk_test!(
    forward_auth_openai_budget_denial_fails_fast,
    budget_denial_fails_fast,
    Front::ForwardAuth,
    Sdk::OpenAi
);
sdk_test!(
    forward_auth_anthropic_budget_denial_fails_fast,
    budget_denial_fails_fast,
    Front::ForwardAuth,
    Sdk::Anthropic
);
sdk_test!(
    nginx_openai_concurrency_denial_is_retried,
    concurrency_denial_is_retried,
    Front::Nginx,
    Sdk::OpenAi
);
sdk_test!(
    nginx_anthropic_concurrency_denial_is_retried,
    concurrency_denial_is_retried,
    Front::Nginx,
    Sdk::Anthropic
);
sdk_test!(
    forward_auth_openai_concurrency_denial_is_retried,
    concurrency_denial_is_retried,
    Front::ForwardAuth,
    Sdk::OpenAi
);
sdk_test!(
    forward_auth_anthropic_concurrency_denial_is_retried,
    concurrency_denial_is_retried,
    Front::ForwardAuth,
    Sdk::Anthropic
);
