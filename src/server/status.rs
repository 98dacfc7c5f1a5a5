//! The one place where errors become protocol responses.

use tonic::{Code, Status};

use crate::engine::window::{seconds_until, Millis};
use crate::engine::{Decision, Reason, RequestError, Verdict};
use crate::gate::GateError;
use crate::store::StoreError;

/// Caller mistakes are INVALID_ARGUMENT with the specific reason; store
/// faults are UNAVAILABLE, so a proxy's own failure mode decides (Envoy's
/// `failure_mode_allow`); never a silent allow.
pub fn grpc_status(err: &GateError) -> Status {
    match err {
        GateError::Request(e) => Status::new(Code::InvalidArgument, format!("{}: {e}", e.code())),
        GateError::Store(
            e @ (StoreError::Unavailable(_) | StoreError::Timeout(_) | StoreError::Full(_)),
        ) => Status::new(Code::Unavailable, e.to_string()),
        GateError::UnknownReservation(_) | GateError::NoGrant { .. } => {
            Status::new(Code::NotFound, err.to_string())
        }
        GateError::InvalidGrant(_) => {
            Status::new(Code::InvalidArgument, format!("invalid_grant: {err}"))
        }
    }
}

/// An admin call without the right credential. The reason is logged, not
/// told: a caller probing for tokens learns nothing from the answer.
pub fn admin_refused() -> Status {
    Status::new(
        Code::Unauthenticated,
        "admin calls need `authorization: Bearer <admin token>`",
    )
}

/// The HTTP form of [`admin_refused`] and of admin errors.
pub fn http_admin_error(err: Option<&GateError>) -> (u16, String) {
    let Some(err) = err else {
        return (
            401,
            error_body(
                "admin calls need `Authorization: Bearer <admin token>`",
                "authentication_error",
                "unauthenticated",
            ),
        );
    };
    let (status, code) = match err {
        GateError::Request(e) => (400, e.code()),
        GateError::InvalidGrant(_) => (400, "invalid_grant"),
        GateError::NoGrant { .. } => (404, "no_grant"),
        GateError::UnknownReservation(_) => (404, "unknown_reservation"),
        GateError::Store(_) => (503, "store_unavailable"),
    };
    (
        status,
        error_body(&err.to_string(), "invalid_request_error", code),
    )
}

/// A malformed field of a request, named.
pub fn bad_field(field: &str, problem: impl std::fmt::Display) -> Status {
    Status::new(
        Code::InvalidArgument,
        format!("invalid_request: `{field}` {problem}"),
    )
}

/// A denial as an HTTP response: status, headers and an OpenAI-style JSON
/// error body. Every HTTP-shaped front end (Envoy, nginx, forward auth)
/// sends exactly this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpDenial {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// What an allowed request carries: headers for the upstream, and headers
/// for the client's response (its remaining headroom).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpAllowance {
    pub upstream: Vec<(String, String)>,
    pub downstream: Vec<(String, String)>,
}

fn error_body(message: &str, kind: &str, code: &str) -> String {
    serde_json::json!({ "error": { "message": message, "type": kind, "code": code } }).to_string()
}

/// Below this wait, `retry-after-ms` goes beside `retry-after`, so that an
/// SDK that reads it waits exactly as long as needed, not a rounded second.
const RETRY_AFTER_MS_BELOW: u64 = 10_000;

/// How long a client should wait after a store fault before it retries.
pub const STORE_FAULT_RETRY_SECS: u64 = 1;

/// The retry hints every official OpenAI and Anthropic SDK obeys:
/// `x-should-retry` first, then `retry-after-ms` and `retry-after`. Only a
/// retryable denial's wait is short enough to be worth sleeping on.
fn retry_headers(
    retryable: bool,
    after_secs: Option<u64>,
    after_ms: Option<u64>,
) -> Vec<(String, String)> {
    let mut h = vec![
        ("x-should-retry".to_string(), retryable.to_string()),
        ("x-tollgate-retryable".to_string(), retryable.to_string()),
    ];
    if let Some(secs) = after_secs {
        h.push(("retry-after".to_string(), secs.to_string()));
    }
    if let Some(ms) = after_ms.filter(|ms| *ms < RETRY_AFTER_MS_BELOW) {
        h.push(("retry-after-ms".to_string(), ms.to_string()));
    }
    h
}

/// 429 for budgets and concurrency, 403 for approvals and unknown keys.
pub fn denial(d: &Decision) -> HttpDenial {
    let (status, kind) = match d.reason {
        Reason::ConcurrencyLimit => (429, "rate_limit_exceeded"),
        Reason::ApprovalRequired | Reason::UnknownKey | Reason::Blocked => {
            (403, "permission_denied")
        }
        _ => (429, "insufficient_quota"),
    };
    let mut headers = vec![("x-tollgate-reason".to_string(), d.reason.code().to_string())];
    headers.extend(retry_headers(d.retryable, d.retry_after, d.retry_after_ms));
    if let Some(rule) = &d.rule {
        headers.push(("x-tollgate-rule".to_string(), rule.clone()));
    }
    HttpDenial {
        status,
        headers,
        body: error_body(&d.message, kind, d.reason.code()),
    }
}

/// A request that cannot be decided is refused with 400, never let through.
pub fn request_denial(e: &RequestError) -> HttpDenial {
    let mut headers = vec![("x-tollgate-reason".to_string(), e.code().to_string())];
    headers.extend(retry_headers(false, None, None));
    HttpDenial {
        status: 400,
        headers,
        body: error_body(&e.to_string(), "invalid_request_error", e.code()),
    }
}

/// A store fault on a rule that fails closed: 503, worth a retry shortly,
/// since the store is usually back within moments.
pub fn store_fault_denial(e: &StoreError) -> HttpDenial {
    let mut headers = vec![(
        "x-tollgate-reason".to_string(),
        "store_unavailable".to_string(),
    )];
    headers.extend(retry_headers(
        true,
        Some(STORE_FAULT_RETRY_SECS),
        Some(STORE_FAULT_RETRY_SECS * 1000),
    ));
    HttpDenial {
        status: 503,
        headers,
        body: error_body(
            &format!("the counter store is unavailable and the matched rules fail closed: {e}"),
            "api_error",
            "store_unavailable",
        ),
    }
}

/// Headers for an allowed or downgraded request.
pub fn allowance(d: &Decision, model_header: &str, now: Millis) -> HttpAllowance {
    let mut a = HttpAllowance::default();
    let downgraded = d.verdict == Verdict::Downgrade;
    a.upstream.push((
        "x-tollgate-decision".to_string(),
        if downgraded { "downgrade" } else { "allow" }.to_string(),
    ));
    if let Some(id) = &d.reservation_id {
        a.upstream
            .push(("x-tollgate-reservation".to_string(), id.clone()));
    }
    if let Some(id) = &d.action_id {
        // Both ways: the upstream service and the client learn the action
        // id to send with this action's retries and fallbacks.
        a.upstream
            .push(("x-tollgate-action-id".to_string(), id.clone()));
        a.downstream
            .push(("x-tollgate-action-id".to_string(), id.clone()));
    }
    if let (true, Some(model)) = (downgraded, &d.model) {
        a.upstream.push((model_header.to_string(), model.clone()));
    }
    if let Some(c) = d.counters.iter().find(|c| c.enforced) {
        let unit = c.unit.name().replace('_', "-");
        a.downstream
            .push((format!("x-ratelimit-limit-{unit}"), c.limit.to_string()));
        a.downstream.push((
            format!("x-ratelimit-remaining-{unit}"),
            c.remaining.to_string(),
        ));
        if let Some(t) = c.resets_at {
            a.downstream.push((
                format!("x-ratelimit-reset-{unit}"),
                format!("{}s", seconds_until(now, t)),
            ));
        }
        a.downstream
            .push(("x-tollgate-rule".to_string(), c.rule.clone()));
    }
    a
}

/// How an HTTP-shaped front end answers a gate error: a store fault is
/// `Err` (the proxy's own failure mode decides); anything else is a 400.
pub fn http_gate_error(e: &GateError) -> Result<HttpDenial, StoreError> {
    match e {
        GateError::Store(s) => Err(s.clone()),
        GateError::Request(r) => Ok(request_denial(r)),
        GateError::InvalidGrant(_) | GateError::NoGrant { .. } => Ok(HttpDenial {
            status: 400,
            headers: retry_headers(false, None, None),
            body: error_body(&e.to_string(), "invalid_request_error", "invalid_grant"),
        }),
        GateError::UnknownReservation(_) => Ok(HttpDenial {
            status: 404,
            headers: retry_headers(false, None, None),
            body: error_body(
                &e.to_string(),
                "invalid_request_error",
                "unknown_reservation",
            ),
        }),
    }
}
