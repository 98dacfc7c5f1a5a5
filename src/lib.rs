//! tollgate: a policy-engine sidecar that keeps AI API usage inside the
//! budgets their owners approved.
//!
//! The library is split so that each part has one job (see
//! `docs/ARCHITECTURE.md`): [`policy`] reads and compiles YAML, [`engine`]
//! decides without I/O, [`store`] holds counters, [`gate`] joins them, and
//! [`server`] speaks the wire protocols.

#![forbid(unsafe_code)]

pub mod admin_client;
pub mod alerts;
pub mod config;
pub mod engine;
pub mod explain;
pub mod gate;
pub mod http_client;
pub mod policy;
pub mod proto;
pub mod reload;
pub mod server;
pub mod shutdown;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod usage;
