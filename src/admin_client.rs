//! The client side of the admin API, for `tollgate approve`, `revoke` and
//! `approvals`: JSON over HTTP to a running server's HTTP port or admin
//! listener (TCP or unix socket).

use std::time::Duration;

use axum::http::Method;
use hyper::body::Bytes;
use serde_json::Value;

use crate::http_client::{self, Target};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Why an admin command failed, worded for the person who ran it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminCallError {
    #[error("cannot reach the server: {0}")]
    Unreachable(String),
    #[error("refused: the admin token is missing or wrong")]
    Refused,
    #[error("{code}: {message}")]
    Rejected { code: String, message: String },
    #[error("the server answered {status} with an unreadable body")]
    Garbled { status: u16 },
}

#[derive(Clone)]
pub struct AdminClient {
    target: Target,
    token: String,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    pub fn new(server: &str, token: &str) -> Result<AdminClient, String> {
        Ok(AdminClient {
            target: Target::parse(server)?,
            token: token.trim().to_string(),
            tls: None,
        })
    }

    /// Uses this TLS setup (see [`http_client::client_tls`]) for https://.
    pub fn with_tls(mut self, tls: std::sync::Arc<rustls::ClientConfig>) -> AdminClient {
        self.tls = Some(tls);
        self
    }

    /// `POST /v1/admin/approvals`; returns the grant as the server recorded it.
    pub async fn approve(&self, body: &Value) -> Result<Value, AdminCallError> {
        self.call(Method::POST, "/v1/admin/approvals", Some(body))
            .await
    }

    pub async fn revoke(&self, body: &Value) -> Result<Value, AdminCallError> {
        self.call(Method::POST, "/v1/admin/approvals/revoke", Some(body))
            .await
    }

    /// Active grants and the newest `audit` entries of the audit trail.
    pub async fn list(&self, audit: usize) -> Result<Value, AdminCallError> {
        self.call(
            Method::GET,
            &format!("/v1/admin/approvals?audit={audit}"),
            None,
        )
        .await
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, AdminCallError> {
        let mut headers = vec![("authorization", format!("Bearer {}", self.token))];
        let bytes = match body {
            Some(b) => {
                headers.push(("content-type", "application/json".to_string()));
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        let answer = http_client::send_with(
            &self.target,
            self.tls.clone(),
            method,
            path,
            &headers,
            bytes,
            TIMEOUT,
        )
        .await
        .map_err(AdminCallError::Unreachable)?;
        if answer.status == 401 {
            return Err(AdminCallError::Refused);
        }
        let value: Value =
            serde_json::from_slice(&answer.body).map_err(|_| AdminCallError::Garbled {
                status: answer.status,
            })?;
        if (200..300).contains(&answer.status) {
            return Ok(value);
        }
        let field = |name: &str| {
            value["error"][name]
                .as_str()
                .unwrap_or("unknown")
                .to_string()
        };
        Err(AdminCallError::Rejected {
            code: field("code"),
            message: field("message"),
        })
    }
}

/// One grant on one line, for people.
pub fn describe_grant(g: &Value) -> String {
    let text = |name: &str| g[name].as_str().unwrap_or("").to_string();
    let extra = text("extra");
    let extra = if extra.is_empty() || extra == "0" {
        "no extra".to_string()
    } else {
        format!("+{extra} {}", text("unit"))
    };
    format!(
        "{}  {}  {}  until {}  by {}: {}",
        text("rule"),
        text("scope"),
        extra,
        text("expires_at"),
        text("approver"),
        text("reason")
    )
}
