//! Generated types of the native API (`proto/tollgate/v1`).

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("tollgate.v1");
}
