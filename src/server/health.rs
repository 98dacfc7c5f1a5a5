//! Readiness: policies loaded, counter store answering, not shutting down.
//!
//! One [`Readiness`] is shared by the HTTP `/readyz` endpoint and the gRPC
//! health service, so both always tell the same story. The store is probed
//! on a timer with a one-counter read, rather than judged by live traffic,
//! so that an idle replica still notices an outage and its recovery.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use tollgate_core::store::{CounterKind, CounterRef, CounterStore};

/// What readiness is made of; ready when every part is good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReadyState {
    pub policies_loaded: bool,
    pub store_reachable: bool,
    pub shutting_down: bool,
    /// The last probe's error while the store is unreachable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
}

impl ReadyState {
    pub fn is_ready(&self) -> bool {
        self.policies_loaded && self.store_reachable && !self.shutting_down
    }

    /// Why it is not ready, one phrase per failing part.
    pub fn reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if !self.policies_loaded {
            reasons.push("policies not loaded".to_string());
        }
        if !self.store_reachable {
            reasons.push(match &self.store_error {
                Some(e) => format!("counter store unreachable: {e}"),
                None => "counter store not probed yet".to_string(),
            });
        }
        if self.shutting_down {
            reasons.push("shutting down".to_string());
        }
        reasons
    }
}

#[derive(Debug, Clone)]
pub struct Readiness {
    state: Arc<watch::Sender<ReadyState>>,
}

impl Readiness {
    /// Not ready: nothing loaded, store not probed.
    pub fn new() -> Readiness {
        let (state, _) = watch::channel(ReadyState {
            policies_loaded: false,
            store_reachable: false,
            shutting_down: false,
            store_error: None,
        });
        Readiness {
            state: Arc::new(state),
        }
    }

    /// Ready from the start, for servers embedded without a probe.
    pub fn always_ready() -> Readiness {
        let r = Readiness::new();
        r.set_policies_loaded();
        r.set_store(Ok(()));
        r
    }

    pub fn state(&self) -> ReadyState {
        self.state.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<ReadyState> {
        self.state.subscribe()
    }

    pub fn set_policies_loaded(&self) {
        self.state.send_if_modified(|s| {
            let changed = !s.policies_loaded;
            s.policies_loaded = true;
            changed
        });
    }

    pub fn set_shutting_down(&self) {
        self.state.send_if_modified(|s| {
            let changed = !s.shutting_down;
            s.shutting_down = true;
            changed
        });
    }

    /// Records a probe's outcome; logs only the transitions.
    pub(crate) fn set_store(&self, result: Result<(), String>) {
        self.state.send_if_modified(|s| {
            let reachable = result.is_ok();
            let error = result.err();
            if reachable != s.store_reachable {
                match &error {
                    None => tracing::info!("counter store reachable"),
                    Some(e) => tracing::warn!(error = %e, "counter store unreachable; not ready"),
                }
            }
            let changed = reachable != s.store_reachable || error != s.store_error;
            s.store_reachable = reachable;
            s.store_error = error;
            changed
        });
    }
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness::new()
    }
}

/// The key the probe reads; it never exists, so reading it costs one
/// lookup and changes nothing.
const PROBE_KEY: &str = "health-probe";

/// A probe slower than this counts as a failure.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Probes `store` once.
pub async fn probe(store: &dyn CounterStore, now: i64) -> Result<(), String> {
    let counter = CounterRef {
        key: PROBE_KEY.to_string(),
        kind: CounterKind::Plain,
    };
    match tokio::time::timeout(PROBE_TIMEOUT, store.read(&[counter], now)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} ms", PROBE_TIMEOUT.as_millis())),
    }
}

/// Probes the store every `every` until `shutdown`, starting now.
pub fn spawn_probe(
    readiness: Readiness,
    store: Arc<dyn CounterStore>,
    clock: Arc<dyn tollgate_core::gate::Clock>,
    every: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => {}
            }
            readiness.set_store(probe(store.as_ref(), clock.now()).await);
        }
    })
}

/// Keeps the gRPC health service in step with `readiness`: the overall
/// status ("") and each of `services`. The first status is set before this
/// returns, so a server started afterwards never answers SERVING early.
pub async fn spawn_grpc_reporter(
    readiness: &Readiness,
    reporter: tonic_health::server::HealthReporter,
    services: Vec<&'static str>,
) -> tokio::task::JoinHandle<()> {
    let mut rx = readiness.subscribe();
    let ready = rx.borrow_and_update().is_ready();
    report(&reporter, &services, ready).await;
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let ready = rx.borrow_and_update().is_ready();
            report(&reporter, &services, ready).await;
        }
    })
}

async fn report(
    reporter: &tonic_health::server::HealthReporter,
    services: &[&'static str],
    ready: bool,
) {
    let status = if ready {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    for name in std::iter::once("").chain(services.iter().copied()) {
        reporter.set_service_status(name, status).await;
    }
}
