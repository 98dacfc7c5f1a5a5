//! Every part of a server, built from the `serve` options: the store, the
//! gate and what it reports to, the reloader, readiness, the listeners and
//! the admin API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tollgate::alerts::{Dispatcher, DispatcherConfig};
use tollgate::reload::{self, ReloadConfig, Reloader};
use tollgate::server::admin::{AdminApi, AdminToken};
use tollgate::server::health::Readiness;
use tollgate::server::tls::{self, TlsFiles};
use tollgate::server::AdminListener;
use tollgate::shutdown::{FlushHooks, Shutdown};
use tollgate::telemetry::audit::{AuditConfig, AuditLog};
use tollgate::telemetry::{Telemetry, TelemetryConfig};
use tollgate_core::gate::{Clock, Gate, GateConfig, SystemClock};
use tollgate_core::policy::CompiledPolicy;
use tollgate_core::store::durable::{DurableConfig, DurableStore};
use tollgate_core::store::{
    CounterStore, LeaseConfig, LeasedStore, MemoryStore, RedisConfig, RedisStore,
};

use super::args::{DashboardArg, Switch};
use super::{ListenerTls, ServeArgs};
use crate::cli::admin::admin_token;
use tollgate::server::dashboard::{AdminPlace, Dashboard, DashboardConfig, DashboardMode};
use tollgate::telemetry::dashboard::{AlertTee, DashboardFeed};
use tollgate_core::gate::AlertSink;

/// A server, bound and ready to run.
pub(crate) struct App {
    pub(super) gate: Arc<Gate>,
    pub(super) reloader: Arc<Reloader>,
    /// Rendered at `/metrics` and `/v1/usage`.
    pub(super) telemetry: Arc<Telemetry>,
    pub(super) readiness: Readiness,
    /// Probed for readiness.
    pub(super) store: Arc<dyn CounterStore>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) listeners: Listeners,
    pub(super) shutdown: Shutdown,
    /// Run after the listeners drain.
    pub(super) flush: FlushHooks,
    pub(super) store_probe_every: Duration,
    pub(super) drain_timeout: Duration,
    /// The embedded store's files, closed (a last snapshot) after the
    /// flush hooks.
    pub(super) durable: Option<Arc<DurableStore>>,
    /// What every TLS listener presents, watched for renewals.
    pub(super) cert: Option<Arc<tls::ServerCert>>,
    pub(super) rescan_every: Duration,
    /// The budget dashboard, unless `--dashboard off`.
    pub(super) dashboard: Option<Arc<Dashboard>>,
}

/// What the server listens on.
pub(crate) struct Listeners {
    /// gRPC: the native API, Envoy ext_authz and health.
    pub(super) grpc: Listener,
    /// HTTP: forward auth, settle, status, health and metrics.
    pub(super) http: Listener,
    pub(super) admin: Admin,
}

/// A bound TCP listener, and its TLS when it has any.
pub(crate) struct Listener {
    pub(super) socket: TcpListener,
    pub(super) address: SocketAddr,
    pub(super) tls: Option<Arc<rustls::ServerConfig>>,
}

/// Where the admin API is served.
pub(crate) enum Admin {
    /// No admin token: not at all.
    Off,
    /// On the gRPC and HTTP listeners.
    Shared(AdminApi),
    /// On a listener of its own (`--admin-listen`).
    Own {
        api: AdminApi,
        listener: AdminListener,
        tls: Option<Arc<rustls::ServerConfig>>,
    },
}

impl App {
    /// Builds every part from `args`; the message says what failed.
    pub(crate) async fn build(
        args: ServeArgs,
        policy: CompiledPolicy,
        tls: Option<ListenerTls>,
    ) -> Result<App, String> {
        // The exact tokenizers' vocabularies load (about 0.2 s) while the
        // store opens, and before the server is ready, so that no request
        // waits for them (Envoy's ext_proc gives a reply 200 ms).
        let warming = tokio::task::spawn_blocking(tollgate_core::engine::tokens::warm);
        let (store, durable) = open_store(&args).await?;
        let admin_token = admin_token(args.admin_token_file.as_ref())
            .and_then(|t| t.map(|t| AdminToken::new(&t)).transpose())?;
        if admin_token.is_none() && args.admin_listen.is_some() {
            return Err(
                "--admin-listen needs an admin token (--admin-token-file or TOLLGATE_ADMIN_TOKEN)"
                    .to_string(),
            );
        }
        let alerts = Dispatcher::start(
            store.clone(),
            DispatcherConfig {
                queue: args.alert_queue,
                ..DispatcherConfig::default()
            },
        );
        let telemetry = telemetry(&args)?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let mut sink: Arc<dyn AlertSink> = alerts.clone();
        if args.dashboard != DashboardArg::Off {
            // Denials, alerts and the scopes seen, written to the store for
            // the dashboard of every replica.
            let feed = DashboardFeed::start(store.clone());
            telemetry.set_dashboard_feed(feed.clone());
            sink = Arc::new(AlertTee { inner: sink, feed });
        }
        let gate = Arc::new(
            Gate::new(policy, store.clone(), clock.clone(), gate_config(&args))
                .with_alerts(sink)
                .with_observer(telemetry.clone()),
        );
        let _ = warming.await;
        let readiness = Readiness::new();
        readiness.set_policies_loaded();
        let reloader = Reloader::new(
            gate.clone(),
            ReloadConfig {
                dirs: args.policies.clone(),
                debounce: reload::DEFAULT_DEBOUNCE,
                rescan_every: args.rescan_every,
                allow_empty: args.allow_empty,
            },
        );
        let (grpc_tls, http_tls) = match &tls {
            Some(t) => (Some(t.grpc.clone()), Some(t.http.clone())),
            None => (None, None),
        };
        let grpc = Listener::bind(args.listen, grpc_tls).await?;
        let http = Listener::bind(args.http_listen, http_tls).await?;
        let dashboard = dashboard(
            &args,
            &gate,
            &store,
            &reloader,
            &telemetry,
            admin_token.clone(),
        )?;
        let admin = match admin_token {
            None => Admin::Off,
            Some(token) => admin(&args, tls.as_ref(), AdminApi::new(gate.clone(), token)).await?,
        };
        let mut flush = flush_hooks(&alerts, &telemetry, args.drain_timeout);
        let shutdown = Shutdown::new();
        tollgate::server::spend::spawn_flusher(gate.clone(), shutdown.wait());
        if let Some(d) = &dashboard {
            d.spawn_sampler(Duration::from_secs(30), shutdown.wait());
        }
        let leased_store = store.clone();
        flush.add("leases", async move {
            // Unused leases go back, so other replicas can spend them now.
            if let Err(e) = leased_store.close(SystemClock.now()).await {
                tracing::error!(error = %e, "cannot hand the unused leases back at shutdown; they stay counted until their window ends");
            }
        });
        let spend_gate = gate.clone();
        flush.add("spend account", async move {
            if let Err(e) = spend_gate.flush_spend().await {
                tracing::error!(error = %e, "cannot write the spend account at shutdown; the last second of it is lost");
            }
        });
        Ok(App {
            gate,
            telemetry,
            reloader,
            readiness,
            store,
            clock,
            listeners: Listeners { grpc, http, admin },
            shutdown,
            flush,
            store_probe_every: args.store_probe_every,
            drain_timeout: args.drain_timeout,
            durable,
            cert: tls.map(|t| t.cert),
            rescan_every: args.rescan_every,
            dashboard,
        })
    }
}

impl Listener {
    async fn bind(
        address: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Listener, String> {
        let socket = TcpListener::bind(address)
            .await
            .map_err(|e| format!("cannot listen on {address}: {e}"))?;
        Ok(Listener {
            socket,
            address,
            tls,
        })
    }
}

/// The dashboard, told where the admin API is.
fn dashboard(
    args: &ServeArgs,
    gate: &Arc<Gate>,
    store: &Arc<dyn CounterStore>,
    reloader: &Arc<Reloader>,
    telemetry: &Arc<Telemetry>,
    token: Option<AdminToken>,
) -> Result<Option<Arc<Dashboard>>, String> {
    let mode = match args.dashboard {
        DashboardArg::Off => return Ok(None),
        DashboardArg::On => DashboardMode::On,
        DashboardArg::Admin => DashboardMode::Admin,
    };
    let admin = match (&token, &args.admin_listen) {
        (None, _) => AdminPlace::Off,
        (Some(_), None) => AdminPlace::Shared,
        (Some(_), Some(address)) => AdminPlace::Own(address.clone()),
    };
    let d = Dashboard::new(
        gate.clone(),
        store.clone(),
        reloader.clone(),
        telemetry.clone(),
        DashboardConfig { mode, token, admin },
    )?;
    Ok(Some(Arc::new(d)))
}

fn gate_config(args: &ServeArgs) -> GateConfig {
    GateConfig {
        reservation_ttl: args.reservation_ttl,
        store_timeout: Duration::from_millis(args.store_timeout_ms),
        retry_within: args.retry_within,
        spend: tollgate_core::store::SpendBounds {
            max_rows_per_day: args.spend_max_rows as usize,
            retention: i64::from(args.spend_retention_days) * 86_400_000,
        },
        spend_account: true,
        spend_days: args.spend_timezone.clone(),
    }
}

/// The admin API shares the gRPC and HTTP listeners, or has one of its own
/// (bound here), with TLS on TCP when the other listeners have it.
async fn admin(
    args: &ServeArgs,
    tls: Option<&ListenerTls>,
    api: AdminApi,
) -> Result<Admin, String> {
    let Some(address) = &args.admin_listen else {
        return Ok(Admin::Shared(api));
    };
    let unix = address.starts_with("unix:");
    let tls = match (tls, unix) {
        (Some(tls), false) => {
            let files = TlsFiles {
                client_ca: args
                    .admin_tls_client_ca
                    .clone()
                    .or_else(|| tls.files.client_ca.clone()),
                ..tls.files.clone()
            };
            let config = tls::server_config(&files, &tls.cert, tls::ALPN_H2_AND_HTTP1)
                .map_err(|e| format!("error: admin listener: {e}"))?;
            Some(config)
        }
        (None, _) | (_, true) if args.admin_tls_client_ca.is_some() => {
            return Err(
                "--admin-tls-client-ca needs --tls-cert and a TCP --admin-listen".to_string(),
            );
        }
        _ => None,
    };
    let listener = AdminListener::bind(address)
        .await
        .map_err(|e| format!("cannot listen on {address}: {e}"))?;
    if tls.is_none() && !unix {
        tracing::warn!(admin = %address, "the admin API listens on TCP without TLS: its bearer token crosses the network in the clear");
    }
    tracing::info!(admin = %address, tls = tls.is_some(), "serving the admin API on its own listener");
    Ok(Admin::Own { api, listener, tls })
}

/// Where components that buffer work (the alert queue, the audit log)
/// register their flush; it runs after the listeners drain.
fn flush_hooks(
    alerts: &Arc<Dispatcher>,
    telemetry: &Arc<Telemetry>,
    limit: Duration,
) -> FlushHooks {
    let mut flush = FlushHooks::default();
    let alerts = alerts.clone();
    flush.add("alerts", async move {
        if !alerts.flush(limit).await {
            tracing::warn!("some alerts were still being delivered at shutdown");
        }
    });
    if telemetry.audit().is_some() {
        let telemetry = telemetry.clone();
        flush.add("audit log", async move {
            if let Some(audit) = telemetry.audit() {
                audit.flush().await;
            }
        });
    }
    flush
}

/// Metrics (the process-wide Prometheus recorder, with its histograms
/// drained every few seconds) and the audit log, if asked for.
fn telemetry(args: &ServeArgs) -> Result<Arc<Telemetry>, String> {
    let audit = match &args.audit_log {
        Some(path) => Some(
            AuditLog::open(&AuditConfig {
                path: path.clone(),
                sample: args.audit_sample,
                denials_only: args.audit_denials_only,
                queue: tollgate::telemetry::audit::DEFAULT_QUEUE,
            })
            .map_err(|e| format!("cannot open the audit log {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let telemetry = Arc::new(Telemetry::new(TelemetryConfig {
        max_scopes: args.metrics_max_scopes,
        reservation_ttl: args.reservation_ttl,
        audit,
    }));
    let handle = tollgate::telemetry::install_prometheus()?;
    telemetry.set_prometheus(handle);
    let upkeep = telemetry.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.upkeep();
        }
    });
    Ok(telemetry)
}

/// The embedded store (in `--data-dir`, or only in memory with
/// `--ephemeral`), or Redis with its connections opened (an unreachable
/// Redis is reported, not fatal: rules' failure policies apply until it
/// answers). A data directory that cannot be read whole is fatal.
async fn open_store(
    args: &ServeArgs,
) -> Result<(Arc<dyn CounterStore>, Option<Arc<DurableStore>>), String> {
    let Some(url) = &args.redis else {
        if args.ephemeral {
            tracing::info!(
                "counters in memory only (--ephemeral): a restart starts them from zero"
            );
            return Ok((Arc::new(MemoryStore::new(args.max_counters)), None));
        }
        let store = Arc::new(open_durable(args).await?);
        return Ok((store.clone(), Some(store)));
    };
    let config = RedisConfig {
        prefix: args.redis_prefix.clone(),
        cluster: args.redis_cluster,
        ca_file: args.redis_ca_file.clone(),
        connections: usize::from(args.redis_connections),
        logs: tollgate_core::store::LogBounds {
            max_entries: args.redis_log_max_entries.max(1),
            retention: args.redis_log_retention,
        },
        ..RedisConfig::new(url.clone())
    };
    let store = RedisStore::connect(&config)
        .await
        .map_err(|e| e.to_string())?;
    // A handshake takes longer than one decision may: do it now rather than
    // on the first request.
    match tokio::time::timeout(Duration::from_secs(3), store.warm_up()).await {
        Ok(Ok(())) => tracing::info!(prefix = %args.redis_prefix, "counters in Redis"),
        Ok(Err(e)) => tracing::warn!(error = %e, "Redis is not answering yet"),
        Err(_) => tracing::warn!("Redis did not answer within 3 s; continuing"),
    }
    if args.redis_leases == Switch::Off {
        tracing::info!("Redis leases off: every decision is one Redis call");
        return Ok((Arc::new(store), None));
    }
    let defaults = LeaseConfig::default();
    // An early denial is decided again once other replicas' idle leases
    // can have come back, when the store timeout leaves room for the wait.
    let retry = defaults.idle + 3 * tollgate_core::store::redis::FLUSH_EVERY;
    let leases = LeaseConfig {
        lifetime: args.redis_lease_ms as i64,
        retry_early_denial_after: if args.store_timeout_ms as i64 >= 2 * retry {
            retry
        } else {
            0
        },
        ..defaults
    };
    let leased = LeasedStore::start(store, leases);
    tollgate::telemetry::watch_leases(Arc::downgrade(&leased.stats()));
    Ok((leased, None))
}

/// The embedded store in `--data-dir`: its snapshot read and its log
/// replayed before anything is served.
async fn open_durable(args: &ServeArgs) -> Result<DurableStore, String> {
    let config = DurableConfig {
        max_counters: args.max_counters,
        sync_every: Duration::from_millis(args.data_sync_ms),
        on_disk_error: Some(Arc::new(|what| {
            tollgate::telemetry::record_store_disk_error(what.as_str())
        })),
        ..DurableConfig::new(args.data_dir.clone())
    };
    let dir = args.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || DurableStore::open(config))
        .await
        .map_err(|e| format!("cannot open the data directory: {e}"))?
        .map_err(|e| format!("error: the embedded store: {e}\nrefusing to start"))?;
    let found = store.recovered();
    tracing::info!(
        data_dir = %dir.display(),
        snapshot = found.snapshot,
        replayed = found.replayed,
        counters = store.counter_count(),
        sync_ms = args.data_sync_ms,
        "counters in the embedded store, kept in the data directory"
    );
    Ok(store)
}
