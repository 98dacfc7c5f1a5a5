//! The HTTP port: forward-auth endpoints for proxies that speak HTTP, settle
//! for callers without gRPC, and `/status`.
//!
//! - `/v1/authz/forward` (Traefik ForwardAuth, Envoy `http_service`): 200
//!   with the headers to copy upstream, or the denial itself (429 or 403
//!   with the JSON error body).
//! - `/v1/authz/nginx` (nginx `auth_request`): nginx turns every status but
//!   2xx, 401 and 403 into a 500, so a denial answers 403 and says what the
//!   client should get in `x-tollgate-status`, `x-tollgate-body` and
//!   `retry-after`; the shipped nginx config replays them.
//! - `/healthz` answers 200 while the process runs; `/readyz` answers 200
//!   only when policies are loaded and the counter store answers, else 503
//!   with the reasons as JSON.
//! - `/metrics`: Prometheus text format; `/v1/usage`: the tracked scopes
//!   with their counters read from the store now (`tollgate usage`).
//! - A counter-store fault answers 503: both proxies then refuse the
//!   request (nginx's `auth_request` treats it as an error).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use rust_decimal::Decimal;
use serde::Deserialize;
use tokio::net::TcpListener;

use super::health::Readiness;
use super::http_request::{check_input, HttpRequest};
use super::status::{
    allowance, denial, http_gate_error, request_denial, store_fault_denial, HttpDenial,
};
use super::ListenerOptions;
use crate::engine::Verdict;
use crate::gate::{ActualUsage, Gate};
use crate::reload::{PolicyStatus, Reloader};
use crate::store::SettleOutcome;
use crate::usage::{UsageReport, UsageRow};

/// Largest body read by the forward endpoint and settle.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

#[derive(Clone)]
struct HttpState {
    gate: Arc<Gate>,
    reloader: Arc<Reloader>,
    readiness: Readiness,
}

pub fn router(gate: Arc<Gate>, reloader: Arc<Reloader>) -> Router {
    router_with(gate, reloader, Readiness::always_ready())
}

pub fn router_with(gate: Arc<Gate>, reloader: Arc<Reloader>, readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/v1/usage", get(usage))
        .route("/v1/authz/forward", any(forward))
        .route("/v1/authz/forward/{*rest}", any(forward))
        .route("/v1/authz/nginx", any(nginx))
        .route("/v1/settle", post(settle))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(HttpState {
            gate,
            reloader,
            readiness,
        })
}

/// Liveness: answering at all is the whole test.
async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(state): State<HttpState>) -> Response {
    let s = state.readiness.state();
    let body = serde_json::json!({
        "ready": s.is_ready(),
        "reasons": s.reasons(),
        "state": s,
    });
    let code = if s.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// The policy in force and the last reload error, as JSON.
async fn status(State(state): State<HttpState>) -> Json<PolicyStatus> {
    Json(state.reloader.status())
}

async fn metrics(State(state): State<HttpState>) -> Response {
    let status = state.reloader.status();
    match state
        .gate
        .telemetry()
        .and_then(|t| t.render(state.gate.now(), &status))
    {
        Some(text) => {
            let mut response = text.into_response();
            put(
                response.headers_mut(),
                "content-type",
                "text/plain; version=0.0.4; charset=utf-8",
            );
            response
        }
        None => (StatusCode::NOT_FOUND, "metrics are not enabled").into_response(),
    }
}

/// Every (rule, scope) this process tracks, read from the store now.
async fn usage(State(state): State<HttpState>) -> Response {
    let Some(telemetry) = state.gate.telemetry() else {
        return (StatusCode::NOT_FOUND, "usage tracking is not enabled").into_response();
    };
    let scopes = telemetry.scopes();
    let version = state.gate.policy().version.clone();
    match state.gate.read_scopes(&scopes.list()).await {
        Ok(counters) => Json(UsageReport {
            policy_version: version,
            scopes_tracked: Some(scopes.len()),
            scopes_max: Some(scopes.max()),
            scopes_overflowed: Some(scopes.overflowed()),
            counters: counters.iter().map(UsageRow::from).collect(),
        })
        .into_response(),
        Err(e) => match http_gate_error(&e) {
            Ok(d) => deny(Flavor::Forward, d),
            Err(store) => deny(Flavor::Forward, store_fault_denial(&store)),
        },
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Forward,
    Nginx,
}

async fn forward(
    State(state): State<HttpState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    decide(&state, Flavor::Forward, method, uri, headers, body).await
}

async fn nginx(
    State(state): State<HttpState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    decide(&state, Flavor::Nginx, method, uri, headers, Bytes::new()).await
}

async fn decide(
    state: &HttpState,
    flavor: Flavor,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let raw: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
        .collect();
    let header = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| headers.get(*n).and_then(|v| v.to_str().ok()))
            .map(str::to_string)
    };
    // The original request, as the proxy describes it.
    let original_method =
        header(&["x-original-method", "x-forwarded-method"]).unwrap_or_else(|| method.to_string());
    let original_path = header(&["x-original-uri", "x-forwarded-uri"]).unwrap_or_else(|| {
        // Envoy's http_service appends the original path to ours.
        uri.path()
            .strip_prefix("/v1/authz/forward")
            .filter(|p| !p.is_empty())
            .unwrap_or("/")
            .to_string()
    });
    let context = route_context(&uri);
    let view = HttpRequest {
        method: &original_method,
        path: &original_path,
        headers: raw,
        context: Some(&context),
        body: (!body.is_empty()).then_some(&body[..]),
        proxy_request_id: None,
    };
    let policy = state.gate.policy();
    let mapping = &policy.set.attributes;
    let input = match check_input(mapping, &view) {
        Ok(input) => input,
        Err(e) => return deny(flavor, request_denial(&e)),
    };
    match state.gate.check(input).await {
        Ok(d) if d.verdict == Verdict::Deny => deny(flavor, denial(&d)),
        Ok(d) => {
            let a = allowance(&d, &mapping.model_header, state.gate.now());
            let mut response = StatusCode::OK.into_response();
            for (k, v) in a.upstream.into_iter().chain(a.downstream) {
                put(response.headers_mut(), &k, &v);
            }
            response
        }
        Err(e) => match http_gate_error(&e) {
            Ok(d) => deny(flavor, d),
            Err(store) => {
                tracing::warn!(error = %store, "counter store fault");
                deny(flavor, store_fault_denial(&store))
            }
        },
    }
}

/// The route context of an auth endpoint: its query, which the proxy's
/// configuration writes (`/v1/authz/nginx?customer=acme&downgrade=header`).
/// Only the bare endpoints have one: where Envoy's `http_service` appends
/// the client's path, the query is the client's.
fn route_context(uri: &Uri) -> HashMap<String, String> {
    let bare = matches!(uri.path(), "/v1/authz/forward" | "/v1/authz/nginx");
    let Some(query) = uri.query().filter(|_| bare) else {
        return HashMap::new();
    };
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn put(headers: &mut HeaderMap, name: &str, value: &str) {
    // from_bytes keeps non-ASCII text (a model or team name in a message)
    // and still refuses control characters, so nothing can split a header.
    if let (Ok(n), Ok(v)) = (
        HeaderName::try_from(name),
        HeaderValue::from_bytes(value.as_bytes()),
    ) {
        headers.insert(n, v);
    }
}

fn deny(flavor: Flavor, d: HttpDenial) -> Response {
    let status = match flavor {
        Flavor::Forward => StatusCode::from_u16(d.status).unwrap_or(StatusCode::TOO_MANY_REQUESTS),
        Flavor::Nginx => StatusCode::FORBIDDEN,
    };
    let mut response = (status, d.body.clone()).into_response();
    let headers = response.headers_mut();
    put(headers, "content-type", "application/json");
    if flavor == Flavor::Nginx {
        put(headers, "x-tollgate-status", &d.status.to_string());
        put(headers, "x-tollgate-body", &d.body);
    }
    for (k, v) in &d.headers {
        put(headers, k, v);
    }
    response
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettleBody {
    reservation_id: String,
    #[serde(default)]
    usage: UsageBody,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct UsageBody {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    cached_input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    images: u64,
    image_quality: Option<String>,
    video_seconds: Option<serde_json::Number>,
    audio_seconds: Option<serde_json::Number>,
}

/// `POST /v1/settle` with `{"reservation_id": "...", "usage": {...}}`.
async fn settle(State(state): State<HttpState>, body: Bytes) -> Response {
    let bad = |message: String| {
        let d = HttpDenial {
            status: 400,
            headers: Vec::new(),
            body: serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "code": "invalid_request"}}).to_string(),
        };
        deny(Flavor::Forward, d)
    };
    let parsed: SettleBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return bad(format!("settle body: {e}")),
    };
    let seconds = |n: &Option<serde_json::Number>, name: &str| -> Result<Decimal, String> {
        match n {
            None => Ok(Decimal::ZERO),
            Some(n) => n
                .to_string()
                .parse::<Decimal>()
                .ok()
                .filter(|d| !d.is_sign_negative())
                .ok_or_else(|| format!("`usage.{name}` must be a non-negative number")),
        }
    };
    let u = &parsed.usage;
    let actual = match (
        seconds(&u.video_seconds, "video_seconds"),
        seconds(&u.audio_seconds, "audio_seconds"),
    ) {
        (Ok(video_seconds), Ok(audio_seconds)) => ActualUsage {
            input_tokens: u.input_tokens,
            cached_input_tokens: u.cached_input_tokens,
            output_tokens: u.output_tokens,
            images: u.images,
            image_quality: u.image_quality.clone(),
            video_seconds,
            audio_seconds,
        },
        (Err(e), _) | (_, Err(e)) => return bad(e),
    };
    match state.gate.settle(&parsed.reservation_id, &actual).await {
        Ok(outcome) => {
            let outcome = match outcome {
                SettleOutcome::Settled => "settled",
                SettleOutcome::AlreadySettled => "already_settled",
                SettleOutcome::Unknown => "unknown",
            };
            Json(serde_json::json!({ "outcome": outcome })).into_response()
        }
        Err(e) => match http_gate_error(&e) {
            Ok(d) => deny(Flavor::Forward, d),
            Err(store) => deny(Flavor::Forward, store_fault_denial(&store)),
        },
    }
}

/// Serves the HTTP endpoints on `listener` until `shutdown`.
pub async fn serve_http(
    gate: Arc<Gate>,
    reloader: Arc<Reloader>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_http_with(
        gate,
        reloader,
        listener,
        ListenerOptions::default(),
        shutdown,
    )
    .await
}

/// [`serve_http`] with `/readyz` following `options.readiness` and
/// optional TLS. On `shutdown` it stops accepting and finishes the
/// requests in flight.
pub async fn serve_http_with(
    gate: Arc<Gate>,
    reloader: Arc<Reloader>,
    listener: TcpListener,
    options: ListenerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut app = router_with(gate, reloader, options.readiness());
    if let Some(admin) = &options.admin {
        app = app.merge(admin.http_routes());
    }
    match options.tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
        Some(config) => {
            axum::serve(super::tls::accept(listener, config), app)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}
