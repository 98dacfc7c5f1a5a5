//! Network front ends. Each one converts its wire format into a
//! [`CheckInput`](tollgate_core::gate::CheckInput), calls the [`Gate`], and converts
//! the answer back; errors become protocol responses in `status.rs` only.

pub mod admin;
pub mod authorize;
pub mod body;
pub mod dashboard;
pub mod envoy;
pub mod ext_proc;
pub mod health;
pub mod http;
pub mod http_request;
pub mod meter;
pub mod native;
pub mod pricing;
pub mod settle;
pub mod spend;
pub mod status;
pub mod tls;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use envoy_types::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;

use crate::proto::v1::admin_server::AdminServer;
use crate::proto::v1::tollgate_server::TollgateServer;
use crate::reload::Reloader;
use crate::telemetry::Telemetry;
use health::Readiness;
use tollgate_core::gate::Gate;

/// Requests larger than this are refused before decoding: no attribute or
/// estimate needs more, and it bounds what a hostile client can make us hold.
pub(crate) const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Envoy's checks carry the request body (up to its `max_request_bytes`),
/// so they may be larger.
pub(crate) const MAX_ENVOY_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// How a listener is run beyond its address: what readiness it reports and
/// whether it speaks TLS.
#[derive(Clone, Default)]
pub struct ListenerOptions {
    /// Always ready when `None`.
    pub readiness: Option<Readiness>,
    /// Built with [`tls::server_config`]; plaintext when `None`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The admin API, when it shares this listener rather than having one
    /// of its own.
    pub admin: Option<admin::AdminApi>,
    /// What `/metrics` and `/v1/usage` show; both answer 404 without it.
    pub telemetry: Option<Arc<Telemetry>>,
    /// The budget dashboard (`/ui/`, `/v1/dashboard`), on the HTTP port.
    pub dashboard: Option<Arc<dashboard::Dashboard>>,
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
            <ExternalProcessorServer<ext_proc::ExtProc> as tonic::server::NamedService>::NAME,
        ],
    )
    .await;
    let api = TollgateServer::new(native::NativeApi::new(gate.clone(), reloader))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(api)
        .add_service(
            AuthorizationServer::new(envoy::EnvoyAuthz::new(gate.clone()))
                .max_decoding_message_size(MAX_ENVOY_REQUEST_BYTES),
        )
        .add_service(
            ExternalProcessorServer::new(ext_proc::ExtProc::new(gate))
                .max_decoding_message_size(MAX_ENVOY_REQUEST_BYTES),
        )
        .add_optional_service(
            options
                .admin
                .map(|a| AdminServer::new(a).max_decoding_message_size(MAX_REQUEST_BYTES)),
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

/// Where the admin API listens when it has an address of its own.
pub enum AdminListener {
    Tcp(TcpListener),
    #[cfg(unix)]
    Unix(tokio::net::UnixListener),
}

impl AdminListener {
    /// `HOST:PORT`, or `unix:/path/to.sock` (created with mode 0600, so
    /// only the server's own user can connect; a stale socket file is
    /// replaced).
    pub async fn bind(address: &str) -> std::io::Result<AdminListener> {
        if let Some(path) = address.strip_prefix("unix:") {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                if std::fs::symlink_metadata(path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    // A socket someone still answers on belongs to a running
                    // server; only a stale one is replaced.
                    if std::os::unix::net::UnixStream::connect(path).is_ok() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::AddrInUse,
                            format!("{path} is in use by a running server"),
                        ));
                    }
                    std::fs::remove_file(path)?;
                }
                // Bound first in a directory only this user can enter, then
                // moved into place already at 0600: never reachable with the
                // mode the process's umask would have given it.
                let target = std::path::Path::new(path);
                let parent = target
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(std::path::Path::new("."));
                let private = parent.join(format!(
                    ".tollgate-admin-{}-{}",
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.subsec_nanos())
                        .unwrap_or_default()
                ));
                std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
                    .create(&private)?;
                let staged = private.join("admin.sock");
                let bound = tokio::net::UnixListener::bind(&staged).and_then(|listener| {
                    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
                    std::fs::rename(&staged, target)?;
                    Ok(listener)
                });
                let _ = std::fs::remove_file(&staged);
                let _ = std::fs::remove_dir(&private);
                return Ok(AdminListener::Unix(bound?));
            }
            #[cfg(not(unix))]
            {
                let _ = path;
                return Err(std::io::Error::other("unix sockets are not available here"));
            }
        }
        Ok(AdminListener::Tcp(TcpListener::bind(address).await?))
    }
}

/// Serves the admin API alone, gRPC and its HTTP form on one listener
/// (HTTP/1.1 requests go to the HTTP routes), with TLS (and, when its
/// configuration asks for one, a client certificate) on TCP, until
/// `shutdown`.
pub async fn serve_admin(
    api: admin::AdminApi,
    listener: AdminListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let routes = tonic::service::Routes::from(api.http_routes())
        .add_service(AdminServer::new(api).max_decoding_message_size(MAX_REQUEST_BYTES));
    let mut server = tonic::transport::Server::builder().accept_http1(true);
    match (listener, tls) {
        (AdminListener::Tcp(l), None) => {
            server
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming(l), shutdown)
                .await
        }
        (AdminListener::Tcp(l), Some(config)) => {
            server
                .add_routes(routes)
                .serve_with_incoming_shutdown(tls::accept(l, config), shutdown)
                .await
        }
        // A unix socket is guarded by its file mode, not TLS.
        #[cfg(unix)]
        (AdminListener::Unix(l), _) => {
            server
                .add_routes(routes)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(l),
                    shutdown,
                )
                .await
        }
    }
}

/// Accepted connections with Nagle's algorithm off: a decision is a few
/// hundred bytes, and waiting to batch them costs tens of milliseconds.
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

#[cfg(all(test, unix))]
mod tests {
    use super::AdminListener;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn an_admin_socket_is_private_refuses_a_live_one_and_replaces_a_stale_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let address = format!("unix:{}", path.display());

        let live = AdminListener::bind(&address).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");

        let Err(e) = AdminListener::bind(&address).await else {
            panic!("a socket a server still answers on must not be replaced");
        };
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
        assert!(e.to_string().contains("in use by a running server"), "{e}");

        // Closed, the listener leaves its file behind: a stale socket.
        drop(live);
        assert!(path.exists());
        let _again = AdminListener::bind(&address).await.unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("admin.sock")]);
    }
}
