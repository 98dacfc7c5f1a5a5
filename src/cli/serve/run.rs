//! Running a built [`App`] until a signal, then draining it.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tollgate::reload::Reloader;
use tollgate::server::dashboard::Dashboard;
use tollgate::server::health::{self, Readiness};
use tollgate::server::tls;
use tollgate::server::ListenerOptions;
use tollgate::shutdown::{self, Shutdown};
use tollgate::telemetry::Telemetry;
use tollgate_core::gate::Gate;

use super::app::{Admin, App, Listeners};

/// The server tasks, each ending when its listener has drained.
struct Servers {
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    http: JoinHandle<std::io::Result<()>>,
    admin: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl App {
    /// Serves until SIGTERM or SIGINT, then drains the listeners (up to
    /// `--drain-timeout`) and runs the flush hooks.
    pub(crate) async fn run(self) -> ExitCode {
        if let Err(e) = self.reloader.spawn(self.shutdown.wait()) {
            tracing::warn!(error = %e, "cannot watch the policy directories; relying on the periodic rescan");
        }
        if let Some(cert) = &self.cert {
            cert.spawn_watch(
                tls::CERT_RELOAD_DEBOUNCE,
                self.rescan_every,
                self.shutdown.wait(),
            );
        }
        health::spawn_probe(
            self.readiness.clone(),
            self.store.clone(),
            self.clock.clone(),
            self.store_probe_every,
            self.shutdown.wait(),
        );
        let (shutdown, drain, flush) = (self.shutdown.clone(), self.drain_timeout, self.flush);
        let durable = self.durable;
        let listeners = self.listeners;
        let (grpc, http) = (listeners.grpc.address, listeners.http.address);
        let tls = listeners.grpc.tls.is_some();
        let servers = spawn_servers(
            self.gate,
            self.reloader,
            self.telemetry,
            self.readiness.clone(),
            listeners,
            self.dashboard,
            &shutdown,
        );
        spawn_signal_handler(self.readiness, shutdown.clone());
        tracing::info!(grpc = %grpc, http = %http, tls = tls, "serving gRPC");
        let code = wait(servers, &shutdown, drain).await;
        if !flush.is_empty() {
            flush.run(drain).await;
        }
        // Last: the alert flush above may still append to the store.
        if let Some(durable) = durable {
            match durable.close().await {
                Ok(()) => tracing::info!("embedded store saved: a snapshot of every counter"),
                Err(e) => tracing::error!(error = %e, "cannot save the embedded store at shutdown"),
            }
        }
        tracing::info!("stopped");
        code
    }
}

/// Starts serving on every listener; the admin API on its own listener
/// first, when it has one.
fn spawn_servers(
    gate: Arc<Gate>,
    reloader: Arc<Reloader>,
    telemetry: Arc<Telemetry>,
    readiness: Readiness,
    listeners: Listeners,
    dashboard: Option<Arc<Dashboard>>,
    shutdown: &Shutdown,
) -> Servers {
    let Listeners { grpc, http, admin } = listeners;
    let (shared_admin, admin_task) = match admin {
        Admin::Off => (None, None),
        Admin::Shared(api) => (Some(api), None),
        Admin::Own { api, listener, tls } => (
            None,
            Some(tokio::spawn(tollgate::server::serve_admin(
                api,
                listener,
                tls,
                shutdown.wait(),
            ))),
        ),
    };
    let http = tokio::spawn(tollgate::server::http::serve_http_with(
        gate.clone(),
        reloader.clone(),
        http.socket,
        ListenerOptions {
            readiness: Some(readiness.clone()),
            tls: http.tls,
            admin: shared_admin.clone(),
            telemetry: Some(telemetry.clone()),
            dashboard,
        },
        shutdown.wait(),
    ));
    let grpc = tokio::spawn(tollgate::server::serve_grpc_with(
        gate,
        reloader,
        grpc.socket,
        ListenerOptions {
            readiness: Some(readiness),
            tls: grpc.tls,
            admin: shared_admin,
            telemetry: Some(telemetry),
            dashboard: None,
        },
        shutdown.wait(),
    ));
    Servers {
        grpc,
        http,
        admin: admin_task,
    }
}

/// On SIGTERM or SIGINT: not ready any more, and every listener drains.
fn spawn_signal_handler(readiness: Readiness, shutdown: Shutdown) {
    tokio::spawn(async move {
        shutdown::signal().await;
        readiness.set_shutting_down();
        shutdown.trigger();
    });
}

/// Waits for the servers to finish, or for the drain timeout after a
/// shutdown began; failure if a server failed.
async fn wait(servers: Servers, shutdown: &Shutdown, drain: Duration) -> ExitCode {
    let finished = async {
        let done = (servers.grpc.await, servers.http.await);
        if let Some(task) = servers.admin {
            if let Ok(Err(e)) = task.await {
                eprintln!("admin server error: {e}");
            }
        }
        done
    };
    let drain_deadline = {
        let wait = shutdown.wait();
        async move {
            wait.await;
            tokio::time::sleep(drain).await;
        }
    };
    tokio::select! {
        (grpc, http) = finished => match (grpc, http) {
            (Ok(Ok(())), Ok(Ok(()))) => ExitCode::SUCCESS,
            (grpc, http) => {
                if let Ok(Err(e)) = grpc { eprintln!("gRPC server error: {e}"); }
                if let Ok(Err(e)) = http { eprintln!("HTTP server error: {e}"); }
                ExitCode::FAILURE
            }
        },
        () = drain_deadline => {
            tracing::warn!(drain_timeout = ?drain, "calls still in flight at the drain timeout; closing them");
            ExitCode::SUCCESS
        }
    }
}
