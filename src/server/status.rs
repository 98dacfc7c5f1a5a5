//! The one place where denials and errors become protocol responses.
//!
//! Every refusal, whatever caused it, is one [`Refusal`]: the gRPC status,
//! the HTTP status, the machine-readable code, the message and the
//! headers. The front ends only encode it (a tonic `Status`, an Envoy
//! `DeniedHttpResponse`, an axum response); none decides a status itself.
//! Every HTTP refusal carries the same JSON error body.

use tonic::{Code, Status};

use tollgate_core::engine::window::seconds_until;
use tollgate_core::engine::{Decision, Reason, RequestError, Verdict};
use tollgate_core::gate::GateError;
use tollgate_core::store::StoreError;

/// Below this wait, `retry-after-ms` goes beside `retry-after`, so that an
/// SDK that reads it waits exactly as long as needed, not a rounded second.
const RETRY_AFTER_MS_BELOW: u64 = 10_000;

/// How long a client should wait after a store fault before it retries.
pub(crate) const STORE_FAULT_RETRY_SECS: u64 = 1;

/// A request refused, in every protocol's terms at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub http: u16,
    pub grpc: Code,
    /// The stable, machine-readable reason (`budget_exceeded`, ...).
    pub code: &'static str,
    /// The OpenAI-style error type, for SDKs that switch on it.
    pub kind: &'static str,
    /// For people: what was refused and why.
    pub message: String,
    pub headers: Vec<(String, String)>,
}

impl Refusal {
    /// A decision that denied: 429 for budgets and concurrency, 403 for
    /// approvals, blocks and unknown keys.
    pub fn denied(d: &Decision) -> Refusal {
        let (http, grpc, kind) = match d.reason {
            Reason::ConcurrencyLimit => (429, Code::ResourceExhausted, "rate_limit_exceeded"),
            Reason::ApprovalRequired | Reason::UnknownKey | Reason::Blocked => {
                (403, Code::PermissionDenied, "permission_denied")
            }
            _ => (429, Code::ResourceExhausted, "insufficient_quota"),
        };
        let mut r = Refusal {
            http,
            grpc,
            code: d.reason.code(),
            kind,
            message: d.message.clone(),
            headers: Vec::new(),
        }
        .retry(d.retryable, d.retry_after, d.retry_after_ms);
        if let Some(rule) = &d.rule {
            r.headers
                .push(("x-tollgate-rule".to_string(), rule.clone()));
        }
        r
    }

    /// A request that cannot be decided: 400, never let through.
    pub fn invalid(e: &RequestError) -> Refusal {
        Refusal::bad_request(e.code(), e.to_string())
    }

    fn bad_request(code: &'static str, message: String) -> Refusal {
        Refusal {
            http: 400,
            grpc: Code::InvalidArgument,
            code,
            kind: "invalid_request_error",
            message,
            headers: Vec::new(),
        }
        .retry(false, None, None)
    }

    /// A store fault on a rule that fails closed: 503 and UNAVAILABLE,
    /// worth a retry shortly, since the store is usually back within
    /// moments. On Envoy it stays a gRPC error, so that Envoy's own
    /// failure mode decides.
    pub fn store_fault(e: &StoreError) -> Refusal {
        Refusal {
            http: 503,
            grpc: Code::Unavailable,
            // One code for every store fault, so that clients need match
            // only one; the message says which.
            code: "store_unavailable",
            kind: "api_error",
            message: format!(
                "the counter store is unavailable and the matched rules fail closed: {e}"
            ),
            headers: Vec::new(),
        }
        .retry(
            true,
            Some(STORE_FAULT_RETRY_SECS),
            Some(STORE_FAULT_RETRY_SECS * 1000),
        )
    }

    pub fn from_gate_error(e: &GateError) -> Refusal {
        let not_found = |code| Refusal {
            http: 404,
            grpc: Code::NotFound,
            code,
            kind: "invalid_request_error",
            message: e.to_string(),
            headers: Vec::new(),
        };
        match e {
            GateError::Request(r) => Refusal::invalid(r),
            GateError::Store(s) => Refusal::store_fault(s),
            GateError::UnknownReservation(_) | GateError::NoGrant { .. } => {
                not_found(e.code()).retry(false, None, None)
            }
            GateError::InvalidGrant(_) => Refusal::bad_request(e.code(), e.to_string()),
        }
    }

    /// An admin call without the right credential. The reason is logged,
    /// not told: a caller probing for tokens learns nothing from it.
    pub fn unauthenticated() -> Refusal {
        Refusal {
            http: 401,
            grpc: Code::Unauthenticated,
            code: "unauthenticated",
            kind: "authentication_error",
            message: "admin calls need `authorization: Bearer <admin token>`".to_string(),
            headers: Vec::new(),
        }
    }

    /// A path or resource this server does not have.
    pub fn not_found(message: &str) -> Refusal {
        Refusal {
            http: 404,
            grpc: Code::NotFound,
            code: "not_found",
            kind: "invalid_request_error",
            message: message.to_string(),
            headers: Vec::new(),
        }
    }

    /// An endpoint whose feature this server runs without.
    pub fn not_enabled(what: &str) -> Refusal {
        Refusal::not_found(&format!("{what} is not enabled on this server"))
    }

    pub fn is_store_fault(&self) -> bool {
        self.grpc == Code::Unavailable
    }

    /// The JSON error body every HTTP refusal carries.
    pub fn body(&self) -> String {
        serde_json::json!({
            "error": { "message": self.message, "type": self.kind, "code": self.code }
        })
        .to_string()
    }

    pub fn grpc_status(&self) -> Status {
        Status::new(self.grpc, format!("{}: {}", self.code, self.message))
    }

    /// The retry hints every official OpenAI and Anthropic SDK obeys:
    /// `x-should-retry` first, then `retry-after-ms` and `retry-after`.
    fn retry(mut self, retryable: bool, after_secs: Option<u64>, after_ms: Option<u64>) -> Refusal {
        let h = &mut self.headers;
        h.push(("x-tollgate-reason".to_string(), self.code.to_string()));
        h.push(("x-should-retry".to_string(), retryable.to_string()));
        h.push(("x-tollgate-retryable".to_string(), retryable.to_string()));
        if let Some(secs) = after_secs {
            h.push(("retry-after".to_string(), secs.to_string()));
        }
        if let Some(ms) = after_ms.filter(|ms| *ms < RETRY_AFTER_MS_BELOW) {
            h.push(("retry-after-ms".to_string(), ms.to_string()));
        }
        self
    }
}

impl From<&GateError> for Refusal {
    fn from(e: &GateError) -> Refusal {
        Refusal::from_gate_error(e)
    }
}

/// A gate error as a gRPC status, for the native and admin APIs.
pub fn grpc_status(err: &GateError) -> Status {
    Refusal::from_gate_error(err).grpc_status()
}

/// What an allowed request carries: headers for the upstream, headers for
/// the client's response (its remaining headroom), and headers to take
/// off the upstream request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Allowance {
    pub upstream: Vec<(String, String)>,
    pub downstream: Vec<(String, String)>,
    pub remove: Vec<String>,
}

/// Headers for an allowed or downgraded request.
pub fn allowance(d: &Decision, model_header: &str) -> Allowance {
    let mut a = Allowance::default();
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
    match (downgraded, &d.model) {
        (true, Some(model)) => a.upstream.push((model_header.to_string(), model.clone())),
        // Only tollgate says which model the upstream should call: a
        // client's own model header goes, or an upstream that honours it
        // would run a model other than the one charged.
        _ => a.remove.push(model_header.to_string()),
    }
    if let Some(c) = d.counters.iter().find(|c| c.enforced) {
        // Built by pushing, not `format!`: every allowed request has them.
        let unit = c.unit.name();
        let named = |prefix: &str| {
            let mut name = String::with_capacity(prefix.len() + unit.len());
            name.push_str(prefix);
            name.extend(unit.chars().map(|ch| if ch == '_' { '-' } else { ch }));
            name
        };
        a.downstream
            .push((named("x-ratelimit-limit-"), c.limit.to_string()));
        a.downstream
            .push((named("x-ratelimit-remaining-"), c.remaining.to_string()));
        if let Some(t) = c.resets_at {
            let mut reset = seconds_until(d.decided_at, t).to_string();
            reset.push('s');
            a.downstream.push((named("x-ratelimit-reset-"), reset));
        }
        a.downstream
            .push(("x-tollgate-rule".to_string(), c.rule.clone()));
    }
    a
}
