//! The core of tollgate, as a library: policies read and compiled
//! ([`policy`]), decisions made without I/O ([`engine`]), counters kept
//! behind one trait ([`store`]), and the [`gate`] that joins them for one
//! request. It knows nothing of wire protocols or metrics; the only files
//! it touches are the policy files it is handed and the embedded store's
//! data directory (`store::durable`). The `tollgate` server builds on it.
//! See `docs/ARCHITECTURE.md`.

#![forbid(unsafe_code)]

pub mod clock;
pub mod engine;
pub mod gate;
pub mod policy;
pub mod store;
