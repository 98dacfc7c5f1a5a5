//! What a client cannot talk its way past, on every HTTP-shaped front end
//! (Envoy ext_authz over gRPC, forward auth, nginx with the shipped
//! config): its own attribute and model headers do not move a call out of
//! its budgets, a repeated `x-request-id` is charged each time, unknown
//! keys are refused, a downgrade nobody enforces is refused rather than
//! charged at the cheap price, a partial body is priced from its length,
//! and every refusal says whether a retry can help.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::nginx::{nginx, upstream_stub, Nginx};
use common::{free_port, policy_dir, TollgateProcess};
use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

/// The raw key of the registry entry `checkout-prod` (team growth,
/// production) in the shipped policies.
const KEY: &str = "sk-example-checkout-prod";
const AUTH: (&str, &str) = ("authorization", "Bearer sk-example-checkout-prod");

/// The registry entry for [`KEY`], followed by `rest`.
fn with_key(rest: &str) -> String {
    format!(
        "keys:
  - id: checkout-prod
    sha256: \"74c8b108068d5afd4a40bef2782d1ec6a90b0cde13b56d932971801f8b1e4262\"
    team: growth
    environment: production
{rest}"
    )
}

const PRICES: &str = "
pricing:
  models:
    gpt-4o: { input_per_mtok: 2.50, output_per_mtok: 10.00 }
    gpt-4o-mini: { input_per_mtok: 0.15, output_per_mtok: 0.60 }
    gpt-5: { input_per_mtok: 1.25, output_per_mtok: 10.00 }
  families:
    premium: [\"gpt-5*\"]
";

// ---------------------------------------------------------------------------
// Plain HTTP/1.1

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

/// One HTTP/1.1 request over a fresh connection.
async fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
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
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not HTTP: {text:?}"));
    Reply {
        status,
        headers: parse_headers(lines),
        body: body.to_string(),
    }
}

fn parse_headers<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<(String, String)> {
    lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect()
}

fn find<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

// ---------------------------------------------------------------------------
// Envoy's CheckRequest, as Envoy builds it

/// A CheckRequest as Envoy builds it: lower-cased headers including the
/// pseudo-headers, the body as raw bytes, per-route context, and Envoy's own
/// request id, distinct for every request (whatever `x-request-id` the
/// client sent). [`with_proxy_id`] sets the id, as for a retry of one
/// request.
fn envoy_request(
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    context: &[(&str, &str)],
) -> CheckRequest {
    let mut all: std::collections::HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    all.insert(":path".to_string(), path.to_string());
    all.insert(":method".to_string(), "POST".to_string());
    all.insert(":authority".to_string(), "api.example.com".to_string());
    common::envoy_authz::check_request(format!("envoy-{:x}", rand_id()), path, all, body, context)
}

fn http_mut(req: &mut CheckRequest) -> &mut HttpRequest {
    req.attributes
        .as_mut()
        .unwrap()
        .request
        .as_mut()
        .unwrap()
        .http
        .as_mut()
        .unwrap()
}

/// `req` with Envoy's own request id set to `id`.
fn with_proxy_id(mut req: CheckRequest, id: &str) -> CheckRequest {
    http_mut(&mut req).id = id.to_string();
    req
}

fn rand_id() -> u128 {
    static N: AtomicU64 = AtomicU64::new(1);
    u128::from(N.fetch_add(1, Ordering::Relaxed)) << 32 | u128::from(std::process::id())
}

fn pairs(headers: &[HeaderValueOption]) -> Vec<(String, String)> {
    headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect()
}

/// A chat body naming `model`.
fn chat(model: &str) -> String {
    format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"Summarise this."}}],"max_tokens":100}}"#
    )
}

// ---------------------------------------------------------------------------
// One front end in front of a tollgate process

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// Envoy ext_authz, over gRPC, with the body.
    Envoy,
    /// `/v1/authz/forward` as Traefik calls it: no body; the model comes
    /// from `x-tollgate-model`.
    ForwardAuth,
    /// nginx with the shipped config, in front of an upstream stub.
    Nginx,
}

/// What the client (and, when allowed, the upstream) got.
struct Answer {
    /// The HTTP status the client gets; 0 when Envoy got a gRPC error.
    status: u16,
    /// What the client sees: a denial's headers, or on an allow the
    /// headers added to its response.
    headers: Vec<(String, String)>,
    /// On an allow, the headers the upstream got from tollgate.
    upstream: Vec<(String, String)>,
    body: String,
    /// Envoy only: the CheckResponse's status, or the RPC's error.
    grpc_code: Option<tonic::Code>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }

    fn upstream_header(&self, name: &str) -> Option<&str> {
        find(&self.upstream, name)
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn message(&self) -> String {
        self.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

fn envoy_answer(r: Result<tonic::Response<CheckResponse>, tonic::Status>) -> Answer {
    let r = match r {
        Ok(r) => r.into_inner(),
        Err(status) => {
            return Answer {
                status: 0,
                headers: Vec::new(),
                upstream: Vec::new(),
                body: status.message().to_string(),
                grpc_code: Some(status.code()),
            }
        }
    };
    let code = tonic::Code::from(r.status.as_ref().map(|s| s.code).unwrap_or(-1));
    match r.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            assert_eq!(code, tonic::Code::Ok, "an allow carries an OK status");
            Answer {
                status: 200,
                headers: pairs(&ok.response_headers_to_add),
                upstream: pairs(&ok.headers),
                body: String::new(),
                grpc_code: Some(code),
            }
        }
        Some(HttpResponse::DeniedResponse(d)) => {
            assert_ne!(
                code,
                tonic::Code::Ok,
                "a denial must not carry an OK status"
            );
            Answer {
                status: d.status.map(|s| s.code as u16).unwrap_or(0),
                headers: pairs(&d.headers),
                upstream: Vec::new(),
                body: d.body,
                grpc_code: Some(code),
            }
        }
        other => panic!("unexpected response {other:?}"),
    }
}

type Seen = Arc<Mutex<Vec<String>>>;

struct Front {
    kind: Kind,
    grpc: Option<AuthorizationClient<Channel>>,
    nginx: Option<(Nginx, Arc<AtomicU64>, Seen)>,
    tollgate: TollgateProcess,
    _policies: tempfile::TempDir,
}

impl Front {
    async fn start(kind: Kind, policy: &str, args: &[&str]) -> Front {
        let dir = policy_dir(&[("p.yaml", policy)]);
        let mut all = vec!["--policies", dir.path().to_str().unwrap()];
        all.extend_from_slice(args);
        let tollgate = TollgateProcess::start(&all);
        let grpc = match kind {
            Kind::Envoy => {
                let channel = Channel::from_shared(tollgate.endpoint())
                    .unwrap()
                    .connect()
                    .await
                    .unwrap();
                Some(AuthorizationClient::new(channel))
            }
            _ => None,
        };
        let nginx = match kind {
            Kind::Nginx => {
                let (upstream, hits, seen) = upstream_stub().await;
                Some((nginx(upstream, tollgate.http_port), hits, seen))
            }
            _ => None,
        };
        Front {
            kind,
            grpc,
            nginx,
            tollgate,
            _policies: dir,
        }
    }

    /// A chat completion for `model` from a client sending `headers`, on a
    /// route with `route` as its context (Envoy's `context_extensions`,
    /// the forward-auth URL's query; nginx's is fixed by its config).
    async fn send(
        &mut self,
        route: &[(&str, &str)],
        headers: &[(&str, &str)],
        model: &str,
    ) -> Answer {
        match self.kind {
            Kind::Envoy => {
                let req = envoy_request("/v1/chat/completions", headers, &chat(model), route);
                self.check(req).await
            }
            Kind::ForwardAuth => {
                let query: Vec<String> = route.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let path = if query.is_empty() {
                    "/v1/authz/forward".to_string()
                } else {
                    format!("/v1/authz/forward?{}", query.join("&"))
                };
                let mut all = vec![
                    ("x-forwarded-method", "POST"),
                    ("x-forwarded-uri", "/v1/chat/completions"),
                    ("x-tollgate-model", model),
                ];
                all.extend_from_slice(headers);
                let r = http(self.tollgate.http_port, "GET", &path, &all, "").await;
                Answer {
                    status: r.status,
                    upstream: if r.status == 200 {
                        r.headers.clone()
                    } else {
                        Vec::new()
                    },
                    headers: r.headers,
                    body: r.body,
                    grpc_code: None,
                }
            }
            Kind::Nginx => {
                assert!(route.is_empty(), "nginx's route context is its config's");
                let (nginx, _, seen) = self.nginx.as_ref().unwrap();
                let mut all = vec![("x-tollgate-model", model)];
                all.extend_from_slice(headers);
                let before = seen.lock().unwrap().len();
                let r = http(
                    nginx.port,
                    "POST",
                    "/v1/chat/completions",
                    &all,
                    &chat(model),
                )
                .await;
                let seen = seen.lock().unwrap();
                let upstream = if seen.len() > before {
                    let request = seen.last().unwrap();
                    let head = request.split("\r\n\r\n").next().unwrap_or("");
                    parse_headers(head.lines().skip(1))
                } else {
                    Vec::new()
                };
                Answer {
                    status: r.status,
                    headers: r.headers,
                    upstream,
                    body: r.body,
                    grpc_code: None,
                }
            }
        }
    }

    /// Envoy only: one CheckRequest.
    async fn check(&mut self, req: CheckRequest) -> Answer {
        let client = self.grpc.as_mut().expect("an Envoy front");
        envoy_answer(client.check(req).await)
    }

    /// nginx only: how many requests reached the upstream.
    fn upstream_hits(&self) -> u64 {
        self.nginx.as_ref().unwrap().1.load(Ordering::SeqCst)
    }

    /// The sum of `name`'s samples whose labels contain `label` on the
    /// process's `/metrics`; 0 when it has none yet.
    async fn metric(&self, name: &str, label: &str) -> f64 {
        let r = http(self.tollgate.http_port, "GET", "/metrics", &[], "").await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// `(rule, used)` for every counter the process tracks, from `/v1/usage`.
    async fn usage(&self) -> Vec<(String, String)> {
        let r = http(self.tollgate.http_port, "GET", "/v1/usage", &[], "").await;
        assert_eq!(r.status, 200, "{}", r.body);
        let json: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        json["counters"]
            .as_array()
            .unwrap_or_else(|| panic!("no counters: {}", r.body))
            .iter()
            .map(|c| {
                (
                    c["rule"].as_str().unwrap_or_default().to_string(),
                    c["used"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }
}

/// One test a path: `mod $name { envoy, forward_auth, nginx }`, each running
/// `$case(kind)`.
macro_rules! on_paths {
    ($name:ident => $case:ident: $($path:ident = $kind:ident),+) => {
        mod $name {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $path() {
                    super::$case(super::Kind::$kind).await
                }
            )+
        }
    };
    ($name:ident => $case:ident) => {
        on_paths!($name => $case: envoy = Envoy, forward_auth = ForwardAuth, nginx = Nginx);
    };
}

// ---------------------------------------------------------------------------
// 1. A production key claiming another environment and team

fn claims_policy() -> String {
    with_key(&format!(
        "{PRICES}
rules:
  - id: prod-key
    match: {{ environment: production }}
    per: [key]
    limit: {{ requests: 2, window: daily }}
  - id: team-cap
    match: {{ team: growth }}
    limit: {{ requests: 2, window: daily }}
"
    ))
}

async fn claimed_attributes(kind: Kind) {
    let mut front = Front::start(kind, &claims_policy(), &[]).await;
    let ignored = "tollgate_client_attributes_ignored_total";
    let env_before = front.metric(ignored, "attribute=\"environment\"").await;
    let team_before = front.metric(ignored, "attribute=\"team\"").await;
    let claims = [
        [
            AUTH,
            ("x-tollgate-environment", "staging"),
            ("x-tollgate-team", "data"),
        ],
        [
            AUTH,
            ("x-tollgate-environment", "development"),
            ("x-tollgate-team", "data"),
        ],
        [
            AUTH,
            ("x-tollgate-environment", "staging"),
            ("x-tollgate-team", "data"),
        ],
    ];
    for (i, headers) in claims[..2].iter().enumerate() {
        let a = front.send(&[], headers, "gpt-4o").await;
        assert_eq!(a.status, 200, "{kind:?} request {i}: {}", a.body);
    }
    let denied = front.send(&[], &claims[2], "gpt-4o").await;
    assert_eq!(
        denied.status, 429,
        "{kind:?}: a production key claiming staging/data must still be counted as \
         production/growth: {}",
        denied.body
    );
    let rule = denied.header("x-tollgate-rule");
    assert!(
        matches!(rule, Some("prod-key" | "team-cap")),
        "{kind:?}: x-tollgate-rule {rule:?}"
    );
    assert_eq!(denied.code(), "budget_exceeded", "{kind:?}");
    assert_eq!(denied.header("x-should-retry"), Some("false"), "{kind:?}");
    assert!(!denied.body.contains(KEY), "the raw key never leaves");

    // Both rules counted both allowed requests: neither claim escaped.
    let usage = front.usage().await;
    for rule in ["prod-key", "team-cap"] {
        assert!(
            usage.iter().any(|(r, used)| r == rule && used == "2"),
            "{kind:?}: {rule} should have used 2: {usage:?}"
        );
    }

    let env_after = front.metric(ignored, "attribute=\"environment\"").await;
    let team_after = front.metric(ignored, "attribute=\"team\"").await;
    assert!(
        env_after >= env_before + 3.0,
        "{kind:?}: {ignored}{{attribute=\"environment\"}} {env_before} -> {env_after}"
    );
    assert!(
        team_after >= team_before + 3.0,
        "{kind:?}: {ignored}{{attribute=\"team\"}} {team_before} -> {team_after}"
    );
}

on_paths!(claimed_attributes_cannot_escape => claimed_attributes);

// ---------------------------------------------------------------------------
// 2. The body names the model, whatever the header says

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_header_cannot_override_the_body_on_envoy() {
    let policy = format!(
        "{PRICES}
rules:
  - id: no-premium
    match: {{ model_family: premium }}
    limit: {{ requests: 0, window: daily }}
"
    );
    let mut front = Front::start(Kind::Envoy, &policy, &[]).await;
    let claim = [("x-tollgate-model", "gpt-4o-mini")];
    let body = r#"{"model":"gpt-5","messages":[{"role":"user","content":"hi"}],"max_tokens":10}"#;
    let a = front
        .check(envoy_request("/v1/chat/completions", &claim, body, &[]))
        .await;
    assert_eq!(
        a.status, 403,
        "a gpt-5 body claiming gpt-4o-mini in x-tollgate-model: {}",
        a.body
    );
    assert_eq!(a.code(), "blocked");
    assert_eq!(a.header("x-tollgate-rule"), Some("no-premium"));

    // The rule blocks only what the body asks for.
    let mini =
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":10}"#;
    let a = front
        .check(envoy_request("/v1/chat/completions", &[], mini, &[]))
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
}

// ---------------------------------------------------------------------------
// 3. Replays: only the proxy's own request id dedups

fn replay_policy(attributes: &str) -> String {
    with_key(&format!(
        "{attributes}{PRICES}
rules:
  - id: prod-requests
    match: {{ environment: production }}
    limit: {{ requests: 2, window: daily }}
"
    ))
}

async fn repeated_client_id(kind: Kind) {
    let mut front = Front::start(kind, &replay_policy(""), &[]).await;
    let headers = [AUTH, ("x-request-id", "same-1")];
    for i in 0..2 {
        let a = front.send(&[], &headers, "gpt-4o").await;
        assert_eq!(a.status, 200, "{kind:?} request {i}: {}", a.body);
    }
    let third = front.send(&[], &headers, "gpt-4o").await;
    assert_eq!(
        third.status, 429,
        "{kind:?}: the third request with x-request-id same-1 must be charged and denied: {} {:?}",
        third.body, third.headers
    );
    assert_eq!(third.header("x-tollgate-rule"), Some("prod-requests"));
    if kind == Kind::Nginx {
        assert_eq!(front.upstream_hits(), 2);
    }
}

on_paths!(repeated_client_request_id_is_charged_each_time => repeated_client_id);

/// Envoy retrying one request sends its own id again: that is one charge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_repeating_its_own_request_id_is_charged_once() {
    let mut front = Front::start(Kind::Envoy, &replay_policy(""), &[]).await;
    let headers = [AUTH, ("x-request-id", "same-1")];
    let request = |id: &str| {
        with_proxy_id(
            envoy_request("/v1/chat/completions", &headers, &chat("gpt-4o"), &[]),
            id,
        )
    };
    for i in 0..3 {
        let a = front.check(request("envoy-retried-1")).await;
        assert_eq!(a.status, 200, "attempt {i} of one request: {}", a.body);
        assert_eq!(
            a.header("x-ratelimit-remaining-requests"),
            Some("1"),
            "attempt {i}: charged once"
        );
    }
    let second = front.check(request("envoy-other-2")).await;
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(second.header("x-ratelimit-remaining-requests"), Some("0"));
    let third = front.check(request("envoy-other-3")).await;
    assert_eq!(third.status, 429, "{}", third.body);
}

/// A header the operator declares the proxy's own request id dedups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_request_id_header_dedups_on_forward_auth() {
    let attributes = "attributes:\n  trusted_headers: { request_id: x-request-id }\n";
    let mut front = Front::start(Kind::ForwardAuth, &replay_policy(attributes), &[]).await;
    for i in 0..3 {
        let a = front
            .send(&[], &[AUTH, ("x-request-id", "same-1")], "gpt-4o")
            .await;
        assert_eq!(a.status, 200, "repeat {i}: {}", a.body);
        assert_eq!(
            a.header("x-ratelimit-remaining-requests"),
            Some("1"),
            "repeat {i}: charged once"
        );
    }
    let other = front
        .send(&[], &[AUTH, ("x-request-id", "other-2")], "gpt-4o")
        .await;
    assert_eq!(other.status, 200, "{}", other.body);
    assert_eq!(other.header("x-ratelimit-remaining-requests"), Some("0"));
    let over = front
        .send(&[], &[AUTH, ("x-request-id", "other-3")], "gpt-4o")
        .await;
    assert_eq!(over.status, 429, "{}", over.body);
}

// ---------------------------------------------------------------------------
// 4. Unknown keys

fn unknown_key_policy(attributes: &str) -> String {
    with_key(&format!(
        "{attributes}{PRICES}
rules:
  - id: team-cap
    match: {{ team: \"*\" }}
    per: [team]
    limit: {{ requests: 100, window: daily }}
"
    ))
}

fn random_key() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("sk-random-{nanos:x}{:x}", rand_id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_is_denied_by_default_on_forward_auth() {
    let mut front = Front::start(Kind::ForwardAuth, &unknown_key_policy(""), &[]).await;
    let bearer = format!("Bearer {}", random_key());
    let a = front
        .send(&[], &[("authorization", &bearer)], "gpt-4o")
        .await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert_eq!(a.code(), "unknown_key");
    assert_eq!(a.header("x-should-retry"), Some("false"));
    assert_eq!(a.header("x-tollgate-retryable"), Some("false"));
    assert!(!a.body.contains("sk-random-"), "the raw key never leaves");
    // The registered key is let in.
    let known = front.send(&[], &[AUTH], "gpt-4o").await;
    assert_eq!(known.status, 200, "{}", known.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_is_allowed_when_the_policy_says_so() {
    let attributes = "attributes:\n  unknown_keys: allow\n";
    let mut front = Front::start(Kind::ForwardAuth, &unknown_key_policy(attributes), &[]).await;
    let bearer = format!("Bearer {}", random_key());
    let a = front
        .send(&[], &[("authorization", &bearer)], "gpt-4o")
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
}

// ---------------------------------------------------------------------------
// 5. A downgrade nobody enforces is refused, not charged at the cheap price

fn downgrade_policy() -> String {
    format!(
        "{PRICES}
rules:
  - id: premium
    match: {{ model_family: premium }}
    limit: {{ requests: 1, window: daily }}
    on_exceed: {{ downgrade: gpt-4o-mini }}
"
    )
}

async fn unenforced_downgrade(kind: Kind) {
    let mut front = Front::start(kind, &downgrade_policy(), &[]).await;
    let first = front.send(&[], &[], "gpt-5").await;
    assert_eq!(first.status, 200, "{kind:?}: {}", first.body);
    assert_eq!(
        first.upstream_header("x-tollgate-decision"),
        Some("allow"),
        "{kind:?}"
    );

    let refused = front.send(&[], &[], "gpt-5").await;
    assert_eq!(
        refused.status, 429,
        "{kind:?}: a downgrade the route cannot enforce must be refused: {} {:?}",
        refused.body, refused.upstream
    );
    assert_eq!(refused.header("x-should-retry"), Some("false"), "{kind:?}");
    let message = refused.message();
    assert!(
        message.contains("send it again with model gpt-4o-mini"),
        "{kind:?}: {message}"
    );
    assert_eq!(refused.code(), "budget_exceeded", "{kind:?}");

    match kind {
        Kind::Nginx => assert_eq!(
            front.upstream_hits(),
            1,
            "the refused request must not reach the upstream"
        ),
        Kind::Envoy | Kind::ForwardAuth => {
            let honoured = front.send(&[("downgrade", "header")], &[], "gpt-5").await;
            assert_eq!(honoured.status, 200, "{kind:?}: {}", honoured.body);
            assert_eq!(
                honoured.upstream_header("x-tollgate-decision"),
                Some("downgrade"),
                "{kind:?}"
            );
            assert_eq!(
                honoured.upstream_header("x-tollgate-model"),
                Some("gpt-4o-mini"),
                "{kind:?}"
            );
        }
    }
}

on_paths!(unenforced_downgrade_is_refused => unenforced_downgrade);

// ---------------------------------------------------------------------------
// 6. A 5 MB prompt that Envoy cut at 1 MiB is priced at its full length

enum Unpriced {
    CatchAll,
    Reject,
}

/// `unpriced` is what a spend rule matching every model needs besides
/// gpt-4o's price: a catch-all price (an entry of `pricing.models`), or a
/// `pricing` setting such as `unpriced_models: reject`.
async fn five_megabyte_prompt(unpriced: Unpriced) {
    let (setting, catch_all) = match unpriced {
        Unpriced::CatchAll => (
            "",
            "    \"*\": { input_per_mtok: 100, output_per_mtok: 100 }\n",
        ),
        Unpriced::Reject => ("  unpriced_models: reject\n", ""),
    };
    let policy = format!(
        "pricing:
{setting}  models:
    gpt-4o: {{ input_per_mtok: 2.50, output_per_mtok: 10.00 }}
{catch_all}rules:
  - id: all-spend
    match: {{ model: \"*\" }}
    limit: {{ spend: 1000, window: daily }}
"
    );
    let mut front = Front::start(Kind::Envoy, &policy, &[]).await;
    let mut prefix = String::from(
        r#"{"model":"gpt-4o","max_tokens":500,"messages":[{"role":"user","content":""#,
    );
    prefix.push_str(&"a".repeat(1_048_576 - prefix.len()));
    assert_eq!(prefix.len(), 1_048_576);
    let partial = [
        ("x-envoy-auth-partial-body", "true"),
        ("content-length", "5000000"),
        ("content-type", "application/json"),
    ];
    let mut req = envoy_request("/v1/chat/completions", &partial, &prefix, &[]);
    http_mut(&mut req).size = 5_000_000;
    let a = front.check(req).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.header("x-tollgate-rule"), Some("all-spend"));
    assert_eq!(a.header("x-ratelimit-limit-spend"), Some("1000"));
    // 5,000,000 bytes / 4 = 1,250,000 input tokens at $2.50/M = $3.125,
    // and 500 output tokens at $10/M = $0.005: $3.13 in all.
    assert_eq!(
        a.header("x-ratelimit-remaining-spend"),
        Some("996.87"),
        "{:?}",
        a.headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_megabyte_prompt_on_ext_authz_is_priced() {
    // gpt-4o's own price applies, not the catch-all.
    five_megabyte_prompt(Unpriced::CatchAll).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_megabyte_prompt_on_ext_authz_is_priced_when_unpriced_models_are_rejected() {
    five_megabyte_prompt(Unpriced::Reject).await;
}

// ---------------------------------------------------------------------------
// 7. Retry hints: a store fault is worth a retry, a bad request is not

const FAULT_POLICY: &str = "
pricing:
  models:
    gpt-4o: { input_per_mtok: 2.50, output_per_mtok: 10.00 }
rules:
  - id: everything
    match: { model: \"*\" }
    limit: { requests: 100, window: daily }
    on_store_error: fail_closed
";

async fn store_fault(kind: Kind) {
    // Nothing listens there: every store call fails.
    let redis = format!("redis://127.0.0.1:{}", free_port());
    let mut front = Front::start(kind, FAULT_POLICY, &["--redis", &redis]).await;
    let a = front.send(&[], &[], "gpt-4o").await;
    match kind {
        Kind::Envoy => {
            assert_eq!(
                a.grpc_code,
                Some(tonic::Code::Unavailable),
                "a store fault is a gRPC UNAVAILABLE, for Envoy's failure_mode to decide: {} {:?}",
                a.status,
                a.body
            );
            assert_eq!(a.status, 0, "no HTTP response of tollgate's own");
        }
        Kind::ForwardAuth | Kind::Nginx => {
            assert_eq!(a.status, 503, "{kind:?}: {} {:?}", a.body, a.headers);
            assert_eq!(a.code(), "store_unavailable", "{kind:?}");
            assert_eq!(a.header("x-should-retry"), Some("true"), "{kind:?}");
            assert_eq!(a.header("retry-after"), Some("1"), "{kind:?}");
            assert_eq!(a.header("retry-after-ms"), Some("1000"), "{kind:?}");
            if kind == Kind::Nginx {
                assert_eq!(front.upstream_hits(), 0);
            }
        }
    }
}

on_paths!(store_fault_is_worth_a_retry => store_fault);

async fn bad_estimate(kind: Kind) {
    let mut front = Front::start(kind, FAULT_POLICY, &[]).await;
    let a = front
        .send(&[], &[("x-tollgate-max-tokens", "many")], "gpt-4o")
        .await;
    assert_eq!(a.status, 400, "{kind:?}: {} {:?}", a.body, a.headers);
    assert_eq!(a.code(), "invalid_request", "{kind:?}");
    assert_eq!(a.header("x-should-retry"), Some("false"), "{kind:?}");
    assert_eq!(a.header("x-tollgate-retryable"), Some("false"), "{kind:?}");
    if kind == Kind::Nginx {
        assert_eq!(front.upstream_hits(), 0);
    }
}

on_paths!(bad_estimate_header_is_not_worth_a_retry => bad_estimate: forward_auth = ForwardAuth, nginx = Nginx);
