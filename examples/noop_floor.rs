//! The lowest floor tollgate is measured against: a gRPC server that
//! answers Envoy's `Authorization/Check` (and tollgate's own `Check`) with
//! an allow and does no work at all.
//!
//! It is built as tollgate's server is, so that the difference is the
//! decision alone: the same tonic and envoy-types, mimalloc, a tokio
//! runtime with a worker per core, Nagle's algorithm off on accepted
//! sockets, and the same bounds on the messages it decodes.
//!
//! cargo run --release --example noop_floor -- 127.0.0.1:50053

use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse, OkHttpResponse};
use envoy_types::pb::google::rpc;
use tollgate::proto::v1 as pb;
use tollgate::proto::v1::tollgate_server::{Tollgate, TollgateServer};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// tollgate's bounds on a decoded request (`server::MAX_ENVOY_REQUEST_BYTES`
/// and `MAX_REQUEST_BYTES` are not public; these are their values).
const MAX_ENVOY_REQUEST_BYTES: usize = 4 * 1024 * 1024;
const MAX_REQUEST_BYTES: usize = 64 * 1024;

struct Noop;

#[tonic::async_trait]
impl Authorization for Noop {
    async fn check(&self, _: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(CheckResponse {
            status: Some(rpc::Status {
                code: tonic::Code::Ok as i32,
                ..Default::default()
            }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
            ..Default::default()
        }))
    }
}

#[tonic::async_trait]
impl Tollgate for Noop {
    async fn check(
        &self,
        _: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        Ok(Response::new(pb::CheckResponse {
            verdict: pb::Verdict::Allow as i32,
            ..Default::default()
        }))
    }

    async fn settle(
        &self,
        _: Request<pb::SettleRequest>,
    ) -> Result<Response<pb::SettleResponse>, Status> {
        Err(Status::unimplemented("floor server"))
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Err(Status::unimplemented("floor server"))
    }

    async fn usage(
        &self,
        _: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        Err(Status::unimplemented("floor server"))
    }
}

#[tokio::main]
async fn main() {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50053".to_string());
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .expect("listen address");
    println!("no-op floor serving on {listen}");
    tonic::transport::Server::builder()
        .add_service(
            AuthorizationServer::new(Noop).max_decoding_message_size(MAX_ENVOY_REQUEST_BYTES),
        )
        .add_service(TollgateServer::new(Noop).max_decoding_message_size(MAX_REQUEST_BYTES))
        .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await
        .expect("serve");
}
