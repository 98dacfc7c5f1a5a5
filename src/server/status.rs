//! The one place where errors become protocol responses.

use tonic::{Code, Status};

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
        GateError::UnknownReservation(_) => Status::new(Code::NotFound, err.to_string()),
    }
}

/// A malformed field of a request, named.
pub fn bad_field(field: &str, problem: impl std::fmt::Display) -> Status {
    Status::new(
        Code::InvalidArgument,
        format!("invalid_request: `{field}` {problem}"),
    )
}
