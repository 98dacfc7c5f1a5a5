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
//!   with their counters read from the store now (`tollgate usage`);
//!   `/v1/spend`: the spend account, grouped and filtered (`tollgate
//!   spend`); `/v1/pricing/missing`: models seen without a price
//!   (`tollgate pricing missing`).
//! - `/ui/` and `/v1/dashboard`: the budget dashboard (`server::dashboard`),
//!   unless `--dashboard off`; `/` redirects to `/ui/`.
//! - A counter-store fault answers 503: both proxies then refuse the
//!   request (nginx's `auth_request` treats it as an error).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;

use super::authorize::{authorize, Answer, FrontEnd};
use super::health::Readiness;
use super::http_request::HttpRequest;
use super::settle::{outcome_name, SettleForm};
use super::status::Refusal;
use super::ListenerOptions;
use crate::reload::{PolicyStatus, Reloader};
use crate::telemetry::Telemetry;
use crate::usage::{UsageReport, UsageRow};
use tollgate_core::engine::RequestError;
use tollgate_core::gate::Gate;

/// Largest body read by the forward endpoint and settle.
pub(crate) const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

#[derive(Clone)]
struct HttpState {
    gate: Arc<Gate>,
    reloader: Arc<Reloader>,
    readiness: Readiness,
    telemetry: Option<Arc<Telemetry>>,
}

pub fn router(gate: Arc<Gate>, reloader: Arc<Reloader>) -> Router {
    router_with(gate, reloader, &ListenerOptions::default())
}

pub(crate) fn router_with(
    gate: Arc<Gate>,
    reloader: Arc<Reloader>,
    options: &ListenerOptions,
) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/v1/usage", get(usage))
        .route("/v1/spend", get(spend))
        .route("/v1/pricing/missing", get(pricing_missing))
        .route("/v1/authz/forward", any(forward))
        .route("/v1/authz/forward/{*rest}", any(forward))
        .route("/v1/authz/nginx", any(nginx))
        .route("/v1/settle", post(settle))
        .fallback(not_found)
        .method_not_allowed_fallback(not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(HttpState {
            gate,
            reloader,
            readiness: options.readiness(),
            telemetry: options.telemetry.clone(),
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
        .telemetry
        .as_ref()
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
        None => refuse(Flavor::Forward, Refusal::not_enabled("metrics")),
    }
}

/// Every (rule, scope) this process tracks, read from the store now.
async fn usage(State(state): State<HttpState>) -> Response {
    let Some(telemetry) = &state.telemetry else {
        return refuse(Flavor::Forward, Refusal::not_enabled("usage tracking"));
    };
    let scopes = telemetry.scopes();
    let version = state.gate.policy().version.clone();
    match state.gate.read_all_scopes(&scopes.list()).await {
        Ok(counters) => Json(UsageReport {
            policy_version: version.to_string(),
            scopes_tracked: Some(scopes.len()),
            scopes_max: Some(scopes.max()),
            scopes_overflowed: Some(scopes.overflowed()),
            counters: counters.iter().map(UsageRow::from).collect(),
        })
        .into_response(),
        Err(e) => refuse(Flavor::Forward, Refusal::from_gate_error(&e)),
    }
}

/// The models requests named that have no price (`tollgate pricing
/// missing`).
async fn pricing_missing(State(state): State<HttpState>) -> Json<crate::usage::MissingReport> {
    Json(super::pricing::report(&state.gate))
}

/// The spend account, as `tollgate spend --json` prints it.
async fn spend(State(state): State<HttpState>, uri: Uri) -> Response {
    let mut params = super::spend::SpendParams::default();
    for (name, value) in uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
    {
        match name.as_str() {
            "from" => params.from = Some(value),
            "to" => params.to = Some(value),
            "by" => params.by = value,
            "where" => {
                if !params.filters.is_empty() {
                    params.filters.push(',');
                }
                params.filters.push_str(&value);
            }
            other => {
                let e = RequestError::invalid(format!(
                    "unknown query parameter {other:?}; /v1/spend takes from, to, by and where"
                ));
                return refuse(Flavor::Forward, Refusal::invalid(&e));
            }
        }
    }
    match super::spend::spend_report(&state.gate, params).await {
        Ok(report) => Json(report).into_response(),
        Err(super::spend::SpendError::Query(message)) => refuse(
            Flavor::Forward,
            Refusal::invalid(&RequestError::invalid(message)),
        ),
        Err(super::spend::SpendError::Gate(e)) => {
            refuse(Flavor::Forward, Refusal::from_gate_error(&e))
        }
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
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match body {
        Ok(body) => decide(&state, Flavor::Forward, method, uri, headers, body).await,
        Err(e) => refuse(Flavor::Forward, rejected(&e)),
    }
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
    match authorize(&state.gate, &view, FrontEnd::default()).await {
        Answer::Allowed(allowed) => {
            let mut response = StatusCode::OK.into_response();
            let a = allowed.allowance;
            for (k, v) in a.upstream.into_iter().chain(a.downstream) {
                put(response.headers_mut(), &k, &v);
            }
            response
        }
        Answer::Refused(r) => refuse(flavor, r),
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

/// A refusal as the proxy at this endpoint needs it. nginx's
/// `auth_request` turns every status but 2xx, 401 and 403 into a 500, so
/// its endpoint always answers 403 and says in `x-tollgate-status` and
/// `x-tollgate-body` what the client should get; the shipped nginx config
/// replays them.
fn refuse(flavor: Flavor, r: Refusal) -> Response {
    let body = r.body();
    let status = match flavor {
        Flavor::Forward => StatusCode::from_u16(r.http).unwrap_or(StatusCode::BAD_REQUEST),
        Flavor::Nginx => StatusCode::FORBIDDEN,
    };
    let mut response = (status, body.clone()).into_response();
    let headers = response.headers_mut();
    put(headers, "content-type", "application/json");
    if flavor == Flavor::Nginx {
        put(headers, "x-tollgate-status", &r.http.to_string());
        put(headers, "x-tollgate-body", &body);
    }
    for (k, v) in &r.headers {
        put(headers, k, v);
    }
    response
}

/// A body axum could not read (too large, cut short) is refused in the
/// same JSON as every other error.
fn rejected(e: &BytesRejection) -> Refusal {
    Refusal {
        http: e.status().as_u16(),
        ..Refusal::invalid(&RequestError::invalid(format!(
            "request body: {}",
            e.body_text()
        )))
    }
}

/// Any path or method this port does not serve.
async fn not_found(method: Method, uri: Uri) -> Response {
    refuse(
        Flavor::Forward,
        Refusal::not_found(&format!(
            "{method} {}: unknown endpoint on this port",
            uri.path()
        )),
    )
}

/// A path served here, asked with a method it does not take.
async fn not_allowed(method: Method, uri: Uri) -> Response {
    let refusal = Refusal {
        http: 405,
        code: "method_not_allowed",
        ..Refusal::not_found(&format!("{method} is not allowed on {}", uri.path()))
    };
    refuse(Flavor::Forward, refusal)
}

/// `POST /v1/settle` with `{"reservation_id": "...", "usage": {...}}`.
async fn settle(State(state): State<HttpState>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(e) => return refuse(Flavor::Forward, rejected(&e)),
    };
    let form: SettleForm = match serde_json::from_slice(&body) {
        Ok(form) => form,
        Err(e) => {
            let e = RequestError::invalid(format!("settle body: {e}"));
            return refuse(Flavor::Forward, Refusal::invalid(&e));
        }
    };
    let (reservation_id, actual) = match form.checked() {
        Ok(checked) => checked,
        Err(e) => return refuse(Flavor::Forward, Refusal::invalid(&e)),
    };
    match state.gate.settle(&reservation_id, &actual).await {
        Ok(outcome) => {
            Json(serde_json::json!({ "outcome": outcome_name(outcome) })).into_response()
        }
        Err(e) => refuse(Flavor::Forward, Refusal::from_gate_error(&e)),
    }
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
    let mut app = router_with(gate, reloader, &options);
    if let Some(admin) = &options.admin {
        app = app.merge(admin.http_routes());
    }
    if let Some(dashboard) = &options.dashboard {
        app = app.merge(dashboard.routes());
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
