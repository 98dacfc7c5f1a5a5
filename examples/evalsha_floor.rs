//! The floor tollgate is measured against: a gRPC server with the same APIs
//! (tollgate's own `Check` and Envoy's `Authorization/Check`) that does one
//! Redis EVALSHA per Check and nothing else. Built as tollgate's server is
//! (mimalloc, a worker per core, Nagle's algorithm off), as the no-op floor
//! (`noop_floor.rs`) is.
//!
//! cargo run --release --example evalsha_floor -- 127.0.0.1:50052 redis://127.0.0.1:6379

use std::sync::Arc;

use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse, OkHttpResponse};
use envoy_types::pb::google::rpc;
use redis::aio::ConnectionManager;
use tollgate::proto::v1 as pb;
use tollgate::proto::v1::tollgate_server::{Tollgate, TollgateServer};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone)]
struct Floor {
    conn: ConnectionManager,
    script: Arc<redis::Script>,
}

impl Floor {
    /// The one EVALSHA: an `INCR` of the key's counter.
    async fn incr(&self, key: &str) -> Result<i64, Status> {
        let mut conn = self.conn.clone();
        self.script
            .key(format!("floor:{key}"))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))
    }
}

#[tonic::async_trait]
impl Authorization for Floor {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let request = request.into_inner();
        let key = request
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .and_then(|h| h.headers.get("authorization"))
            .map(String::as_str)
            .unwrap_or_default();
        self.incr(key).await?;
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
impl Tollgate for Floor {
    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let key = request.into_inner().attributes.unwrap_or_default().api_key;
        self.incr(&key).await?;
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
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:50052".to_string());
    let url = args
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_string());
    let client = redis::Client::open(url).expect("Redis URL");
    let conn = ConnectionManager::new(client)
        .await
        .expect("connect to Redis");
    let floor = Floor {
        conn,
        script: Arc::new(redis::Script::new("return redis.call('INCR', KEYS[1])")),
    };
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .expect("listen address");
    println!("floor serving on {listen}");
    tonic::transport::Server::builder()
        .add_service(AuthorizationServer::new(floor.clone()).max_decoding_message_size(4 << 20))
        .add_service(TollgateServer::new(floor).max_decoding_message_size(64 << 10))
        .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await
        .expect("serve");
}
