//! The core of tollgate, as a library: policies read and compiled
//! ([`policy`]), decisions made without I/O ([`engine`]), counters kept
//! behind one trait ([`store`]), and the [`gate`] that joins them for one
//! request. It knows nothing of wire protocols, metrics or files on disk
//! beyond the policy files it is handed; the `tollgate` server builds on
//! it. See `docs/ARCHITECTURE.md`.

#![forbid(unsafe_code)]

pub mod clock;
pub mod engine;
pub mod gate;
pub mod policy;
pub mod store;
