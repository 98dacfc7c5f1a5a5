//! Network front ends. Each one converts its wire format into a
//! [`CheckInput`](crate::gate::CheckInput), calls the [`Gate`], and converts
//! the answer back; errors become protocol responses in `status.rs` only.

pub mod body;
pub mod envoy;
pub mod health;
pub mod http;
pub mod http_request;
pub mod native;
pub mod status;
pub mod tls;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use envoy_types::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;

use crate::gate::Gate;
use crate::proto::v1::tollgate_server::TollgateServer;
use crate::reload::Reloader;
use health::Readiness;

/// Requests larger than this are refused before decoding: no attribute or
/// estimate needs more, and it bounds what a hostile client can make us hold.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Envoy's checks carry the request body (up to its `max_request_bytes`),
/// so they may be larger.
pub const MAX_ENVOY_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// How a listener is run beyond its address: what readiness it reports and
/// whether it speaks TLS.
#[derive(Clone, Default)]
pub struct ListenerOptions {
    /// Always ready when `None`.
    pub readiness: Option<Readiness>,
    /// Built with [`tls::server_config`]; plaintext when `None`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl ListenerOptions {
    pub(crate) fn readiness(&self) -> Readiness {
        self.readiness
            .clone()
            .unwrap_or_else(Readiness::always_ready)
    }
}

/// Serves the native API and gRPC health on `listener` until `shutdown`.
pub async fn serve_grpc(
    gate: Arc<Gate>,
    reloader: Arc<Reloader>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve_grpc_with(
        gate,
        reloader,
        listener,
        ListenerOptions::default(),
        shutdown,
    )
    .await
}

/// [`serve_grpc`] with health following `options.readiness` and optional
/// TLS. On `shutdown` it stops accepting and waits for the calls in flight.
pub async fn serve_grpc_with(
    gate: Arc<Gate>,
    reloader: Arc<Reloader>,
    listener: TcpListener,
    options: ListenerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let reporting = health::spawn_grpc_reporter(
        &options.readiness(),
        reporter,
        vec![
            <TollgateServer<native::NativeApi> as tonic::server::NamedService>::NAME,
            <AuthorizationServer<envoy::EnvoyAuthz> as tonic::server::NamedService>::NAME,
        ],
    )
    .await;
    let api = TollgateServer::new(native::NativeApi::new(gate.clone(), reloader))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(api)
        .add_service(
            AuthorizationServer::new(envoy::EnvoyAuthz::new(gate))
                .max_decoding_message_size(MAX_ENVOY_REQUEST_BYTES),
        );
    let result = match options.tls {
        None => {
            router
                .serve_with_incoming_shutdown(incoming(listener), shutdown)
                .await
        }
        Some(config) => {
            router
                .serve_with_incoming_shutdown(tls::accept(listener, config), shutdown)
                .await
        }
    };
    reporting.abort();
    result
}

/// Accepted connections with Nagle's algorithm off: a decision is a few
/// hundred bytes, and waiting to batch them costs tens of milliseconds.
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}
