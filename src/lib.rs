//! tollgate, the server: the wire protocols ([`server`]), live reload,
//! telemetry and the decision log, alert delivery, and the pieces the
//! command line uses. It builds on `tollgate_core`, the library (policy,
//! engine, store, gate); this crate's own modules exist for its binary and
//! its tests (see `docs/ARCHITECTURE.md`).

#![forbid(unsafe_code)]

pub mod admin_client;
pub mod alerts;
pub mod config;
pub mod explain;
pub mod http_client;
pub mod proto;
pub mod reload;
pub mod server;
pub mod shutdown;
pub mod spend;
pub mod status;
pub mod telemetry;
pub mod usage;
