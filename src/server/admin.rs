//! The admin API: approvals, over gRPC (`tollgate.v1.Admin`) and HTTP
//! (`/v1/admin/approvals`). Every call must carry the admin token as a
//! bearer credential; without a token configured, neither is served.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::{Request, Status};

use super::status::{grpc_status, Refusal};
use crate::proto::v1 as pb;
use tollgate_core::engine::request::parse_amount;
use tollgate_core::engine::window::format_utc;
use tollgate_core::gate::{grant_extra_text, grant_view, Gate, GateError, GrantRequest};
use tollgate_core::policy::parse_duration;
use tollgate_core::store::Grant;

/// Audit entries returned when a listing asks for none in particular.
const DEFAULT_AUDIT_ENTRIES: usize = 50;
const MAX_AUDIT_ENTRIES: usize = 1_000;

/// The admin credential. Only its SHA-256 is kept, and a presented token
/// is compared by digest in constant time.
#[derive(Clone)]
pub struct AdminToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

impl AdminToken {
    /// A token of at least 16 characters (surrounding whitespace ignored).
    pub fn new(token: &str) -> Result<AdminToken, String> {
        let token = token.trim();
        if token.len() < 16 {
            return Err("the admin token must be at least 16 characters long".to_string());
        }
        Ok(AdminToken {
            digest: Sha256::digest(token.as_bytes()).into(),
        })
    }

    pub fn from_file(path: &Path) -> Result<AdminToken, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the admin token file {}: {e}", path.display()))?;
        AdminToken::new(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Whether an `authorization` header value carries this token.
    pub fn accepts(&self, authorization: Option<&str>) -> bool {
        let Some(presented) = authorization.and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        }) else {
            return false;
        };
        let digest: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
        digest
            .iter()
            .zip(self.digest.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

fn refused(via: &str, peer: Option<String>) {
    tracing::warn!(
        target: "tollgate::audit",
        via,
        peer = peer.as_deref().unwrap_or("unknown"),
        "admin call refused: missing or wrong admin token"
    );
}

#[derive(Debug, Clone)]
pub struct AdminApi {
    gate: Arc<Gate>,
    token: AdminToken,
}

impl AdminApi {
    pub fn new(gate: Arc<Gate>, token: AdminToken) -> AdminApi {
        AdminApi { gate, token }
    }

    /// The HTTP form of this API, behind the same token:
    /// `GET /v1/admin/approvals[?audit=N]`, `POST /v1/admin/approvals` and
    /// `POST /v1/admin/approvals/revoke`.
    pub fn http_routes(&self) -> Router {
        Router::new()
            .route("/v1/admin/approvals", get(http_list).post(http_approve))
            .route("/v1/admin/approvals/revoke", post(http_revoke))
            .with_state(HttpAdmin {
                gate: self.gate.clone(),
                token: self.token.clone(),
            })
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if self.token.accepts(header) {
            return Ok(());
        }
        refused("grpc", request.remote_addr().map(|a| a.to_string()));
        Err(Refusal::unauthenticated().grpc_status())
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminApi {
    async fn approve(
        &self,
        request: Request<pb::ApproveRequest>,
    ) -> Result<tonic::Response<pb::Grant>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let extra = match r.extra.trim() {
            "" => None,
            text => {
                Some(parse_amount("extra", text).map_err(|e| Refusal::invalid(&e).grpc_status())?)
            }
        };
        let grant = self
            .gate
            .approve(GrantRequest {
                rule: r.rule,
                scope: r.scope,
                extra,
                duration: Duration::from_secs(r.duration_seconds),
                approver: r.approver,
                reason: r.reason,
            })
            .await
            .map_err(|e| grpc_status(&e))?;
        Ok(tonic::Response::new(grant_message(&grant)))
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<tonic::Response<pb::Grant>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let grant = self
            .gate
            .revoke(&r.rule, &r.scope, &r.revoked_by, &r.reason)
            .await
            .map_err(|e| grpc_status(&e))?;
        Ok(tonic::Response::new(grant_message(&grant)))
    }

    async fn list_approvals(
        &self,
        request: Request<pb::ListApprovalsRequest>,
    ) -> Result<tonic::Response<pb::ListApprovalsResponse>, Status> {
        self.authorize(&request)?;
        let entries = (request.into_inner().audit_entries as usize).min(MAX_AUDIT_ENTRIES);
        let (grants, audit) = listing(&self.gate, entries)
            .await
            .map_err(|e| grpc_status(&e))?;
        Ok(tonic::Response::new(pb::ListApprovalsResponse {
            grants: grants.iter().map(grant_message).collect(),
            audit,
        }))
    }
}

async fn listing(gate: &Gate, entries: usize) -> Result<(Vec<Grant>, Vec<String>), GateError> {
    let grants = gate.approvals().await?;
    let audit = if entries > 0 {
        gate.approvals_log(entries).await?
    } else {
        Vec::new()
    };
    Ok((grants, audit))
}

pub(crate) fn grant_message(g: &Grant) -> pb::Grant {
    pb::Grant {
        rule: g.rule.clone(),
        scope: g.scope.clone(),
        extra: grant_extra_text(g),
        unit: g.unit.name().to_string(),
        expires_at: format_utc(g.expires_at),
        approver: g.approver.clone(),
        reason: g.reason.clone(),
        created_at: format_utc(g.created_at),
    }
}

#[derive(Clone)]
struct HttpAdmin {
    gate: Arc<Gate>,
    token: AdminToken,
}

/// The refusal to send, unless `headers` carry the admin token.
fn refusal(state: &HttpAdmin, headers: &HeaderMap) -> Option<Response> {
    let header = headers.get("authorization").and_then(|v| v.to_str().ok());
    if state.token.accepts(header) {
        return None;
    }
    let peer = headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    refused("http", peer);
    Some(json_error(&Refusal::unauthenticated()))
}

fn json_error(r: &Refusal) -> Response {
    let status = StatusCode::from_u16(r.http).unwrap_or(StatusCode::BAD_REQUEST);
    (status, [("content-type", "application/json")], r.body()).into_response()
}

fn bad_request(message: String) -> Response {
    json_error(&Refusal::from_gate_error(&GateError::InvalidGrant(message)))
}

fn json_ok(value: serde_json::Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        value.to_string(),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApproveBody {
    rule: String,
    #[serde(default)]
    scope: String,
    extra: Option<serde_json::Value>,
    /// A duration such as `7d`, `12h` or `90m`.
    #[serde(rename = "for")]
    duration: String,
    approver: String,
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    rule: String,
    #[serde(default)]
    scope: String,
    revoked_by: String,
    #[serde(default)]
    reason: String,
}

async fn http_approve(State(state): State<HttpAdmin>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = refusal(&state, &headers) {
        return refused;
    }
    let body: ApproveBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return bad_request(format!("approval body: {e}")),
    };
    let text = match &body.extra {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(other) => return bad_request(format!("`extra` must be a number, got {other}")),
    };
    let extra = match text
        .as_deref()
        .map(|t| parse_amount("extra", t))
        .transpose()
    {
        Ok(extra) => extra,
        Err(e) => return json_error(&Refusal::invalid(&e)),
    };
    let Some(secs) = parse_duration(&body.duration) else {
        return bad_request(format!(
            "`for` {:?} is not a duration such as 12h or 7d (at most 366d)",
            body.duration
        ));
    };
    let result = state
        .gate
        .approve(GrantRequest {
            rule: body.rule,
            scope: body.scope,
            extra,
            duration: Duration::from_secs(secs),
            approver: body.approver,
            reason: body.reason,
        })
        .await;
    match result {
        Ok(g) => json_ok(grant_view(&g)),
        Err(e) => json_error(&Refusal::from_gate_error(&e)),
    }
}

async fn http_revoke(State(state): State<HttpAdmin>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = refusal(&state, &headers) {
        return refused;
    }
    let body: RevokeBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return bad_request(format!("revoke body: {e}")),
    };
    match state
        .gate
        .revoke(&body.rule, &body.scope, &body.revoked_by, &body.reason)
        .await
    {
        Ok(g) => json_ok(grant_view(&g)),
        Err(e) => json_error(&Refusal::from_gate_error(&e)),
    }
}

async fn http_list(State(state): State<HttpAdmin>, headers: HeaderMap, uri: Uri) -> Response {
    if let Some(refused) = refusal(&state, &headers) {
        return refused;
    }
    let asked = uri
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("audit="))
        .map(|n| n.parse::<usize>());
    let entries = match asked {
        None => DEFAULT_AUDIT_ENTRIES,
        Some(Ok(n)) => n.min(MAX_AUDIT_ENTRIES),
        Some(Err(_)) => return bad_request("`audit` must be a whole number".to_string()),
    };
    match listing(&state.gate, entries).await {
        Ok((grants, audit)) => {
            let audit: Vec<serde_json::Value> = audit
                .iter()
                .filter_map(|e| serde_json::from_str(e).ok())
                .collect();
            json_ok(serde_json::json!({
                "grants": grants.iter().map(grant_view).collect::<Vec<_>>(),
                "audit": audit,
            }))
        }
        Err(e) => json_error(&Refusal::from_gate_error(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_accepted_only_as_an_exact_bearer_credential() {
        let token = AdminToken::new("correct horse battery staple").unwrap();
        assert!(token.accepts(Some("Bearer correct horse battery staple")));
        assert!(!token.accepts(Some("Bearer correct horse battery stapl")));
        assert!(!token.accepts(Some("correct horse battery staple")));
        assert!(!token.accepts(Some("Basic correct horse battery staple")));
        assert!(!token.accepts(None));
        assert!(AdminToken::new("short").is_err());
    }
}
