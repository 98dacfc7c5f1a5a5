//! The floor tollgate is measured against: a gRPC server with the same API
//! that does one Redis EVALSHA per Check and nothing else.
//!
//! cargo run --release --example evalsha_floor -- 127.0.0.1:50052 redis://127.0.0.1:6379

use std::sync::Arc;

use redis::aio::ConnectionManager;
use tollgate::proto::v1 as pb;
use tollgate::proto::v1::tollgate_server::{Tollgate, TollgateServer};
use tonic::{Request, Response, Status};

struct Floor {
    conn: ConnectionManager,
    script: Arc<redis::Script>,
}

#[tonic::async_trait]
impl Tollgate for Floor {
    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let key = request.into_inner().attributes.unwrap_or_default().api_key;
        let mut conn = self.conn.clone();
        let _: i64 = self
            .script
            .key(format!("floor:{key}"))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
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
    println!("floor serving on {listen}");
    tonic::transport::Server::builder()
        .add_service(TollgateServer::new(floor))
        .serve(listen.parse().expect("listen address"))
        .await
        .expect("serve");
}
