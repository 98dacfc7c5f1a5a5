//! What the running server reports about itself, shared by the parts that
//! produce it (reload) and the parts that show it (`/status`, `/metrics`).
//! A leaf: it imports nothing of the crate.

use serde::Serialize;

/// What is in force and how the last attempt went; served at `/status`
/// and by the `Status` RPC.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PolicyStatus {
    pub version: String,
    pub loaded_at: String,
    pub rules: usize,
    pub reloads: u64,
    pub failed_reloads: u64,
    /// The newest rejected edit, while it is still what is on disk.
    pub last_error: Option<String>,
    pub error_since: Option<String>,
}
