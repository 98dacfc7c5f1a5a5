//! The decision engine: pure functions from a compiled policy, a request
//! and the current time to counter operations, and from the store's answer
//! to a decision. It does no I/O and reads no clock.

pub mod charge;
pub mod decide;
pub mod request;
pub mod tokens;
pub mod window;

use crate::policy::Unit;

pub use charge::{Basis, Usage};
pub use decide::{decide, plan, scope_counters, CounterReport, Decision, Plan, Reason, Verdict};
pub use request::{Attributes, Estimate};

/// Why a request cannot be decided: the caller's fault, never the store's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("{message}")]
    Invalid { message: String },
    #[error("{message}")]
    Unpriced { message: String },
    #[error("rule `{rule}` counts per {attr}, but the request has no {attr}")]
    MissingAttribute { rule: String, attr: String },
}

impl RequestError {
    pub fn invalid(message: impl Into<String>) -> RequestError {
        RequestError::Invalid {
            message: message.into(),
        }
    }

    pub fn too_large(unit: Unit) -> RequestError {
        RequestError::invalid(format!(
            "the {unit} amount of this request is too large to count"
        ))
    }

    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::Invalid { .. } => "invalid_request",
            RequestError::Unpriced { .. } => "unpriced_model",
            RequestError::MissingAttribute { .. } => "missing_attribute",
        }
    }
}
