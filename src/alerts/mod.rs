//! Alert delivery, off the request path.
//!
//! The engine finds each threshold crossing in the same atomic step that
//! reserves (see `decide::crossed`), so across every replica exactly one
//! decision sees each crossing. The gate hands those crossings to an
//! [`AlertSink`]; the [`Dispatcher`] queues them (bounded, never blocking a
//! decision) and a background task delivers each one to the rule's
//! notifiers: a log line, a signed webhook with retries, or an append to a
//! stream of the counter store.

pub mod webhook;

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Bytes;
use rust_decimal::Decimal;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Notify, Semaphore};

use crate::telemetry::names;
use tollgate_core::engine::decide::AlertCrossing;
use tollgate_core::engine::window::{format_utc, Millis};
use tollgate_core::gate::AlertSink;
use tollgate_core::policy::{hex, CompiledPolicy, NotifierKind};
use tollgate_core::store::CounterStore;

/// One alert as every notifier receives it. Scopes name keys by their
/// registry id or hash, never by the raw key.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct AlertEvent {
    /// The same for every delivery of one crossing, so a receiver can
    /// drop duplicates (a retried webhook that had in fact arrived).
    pub id: String,
    pub rule: String,
    pub owner: Option<String>,
    pub scope: String,
    pub window_start: Option<String>,
    pub window_end: Option<String>,
    pub unit: String,
    /// Exact decimals as strings: spend is never a float.
    pub used: String,
    pub limit: String,
    pub percent: String,
    pub threshold: u32,
    pub timestamp: String,
}

impl AlertEvent {
    pub fn new(policy: &CompiledPolicy, c: &AlertCrossing, now: Millis) -> AlertEvent {
        let owner = policy.rule(&c.rule).and_then(|r| r.owner.clone());
        let percent = if c.limit.is_zero() {
            Decimal::ZERO
        } else {
            (c.used * Decimal::ONE_HUNDRED / c.limit).round_dp(2)
        };
        let window = c
            .window_start
            .or(c.window_end)
            .map(|t| t.to_string())
            .unwrap_or_else(|| "lifetime".to_string());
        let id = Sha256::new()
            .chain_update(c.rule.as_bytes())
            .chain_update([0])
            .chain_update(c.scope.as_bytes())
            .chain_update([0])
            .chain_update(window.as_bytes())
            .chain_update([0])
            .chain_update(c.threshold.to_le_bytes())
            .finalize();
        AlertEvent {
            id: hex(&id[..16]),
            rule: c.rule.clone(),
            owner,
            scope: c.scope.clone(),
            window_start: c.window_start.map(format_utc),
            window_end: c.window_end.map(format_utc),
            unit: c.unit.name().to_string(),
            used: c.used.normalize().to_string(),
            limit: c.limit.normalize().to_string(),
            percent: percent.normalize().to_string(),
            threshold: c.threshold,
            timestamp: format_utc(now),
        }
    }
}

#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// Deliveries waiting at most; beyond it alerts are dropped, counted
    /// and logged.
    pub queue: usize,
    /// Webhook deliveries in flight at once.
    pub concurrency: usize,
    /// The first retry waits this long; each later one twice as long.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            queue: 10_000,
            concurrency: 16,
            first_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// How long one append to a store stream may take.
const STREAM_TIMEOUT: Duration = Duration::from_secs(5);

struct Delivery {
    notifier: String,
    kind: NotifierKind,
    event: Arc<AlertEvent>,
    body: Bytes,
}

/// Counts of what happened to deliveries, for status and tests.
#[derive(Debug, Default)]
pub struct DeliveryCounts {
    pub delivered: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    /// Queued or being delivered.
    pending: AtomicUsize,
    idle: Notify,
    counts: DeliveryCounts,
}

impl Shared {
    fn finish(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }
}

/// Queues alerts and delivers them in the background.
pub struct Dispatcher {
    queue: mpsc::Sender<Delivery>,
    shared: Arc<Shared>,
}

impl fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher")
            .field("pending", &self.shared.pending.load(Ordering::Relaxed))
            .finish()
    }
}

impl Dispatcher {
    /// Starts the delivery task; must be called inside a Tokio runtime.
    pub fn start(store: Arc<dyn CounterStore>, config: DispatcherConfig) -> Arc<Dispatcher> {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let shared = Arc::new(Shared {
            pending: AtomicUsize::new(0),
            idle: Notify::new(),
            counts: DeliveryCounts::default(),
        });
        tokio::spawn(deliver_all(rx, store, config, shared.clone()));
        Arc::new(Dispatcher { queue: tx, shared })
    }

    pub fn counts(&self) -> &DeliveryCounts {
        &self.shared.counts
    }

    /// Waits until every queued alert has been delivered or has given up,
    /// or until `limit` passes; true when nothing is left.
    pub async fn flush(&self, limit: Duration) -> bool {
        let drained = async {
            loop {
                let idle = self.shared.idle.notified();
                if self.shared.pending.load(Ordering::Acquire) == 0 {
                    return;
                }
                idle.await;
            }
        };
        tokio::time::timeout(limit, drained).await.is_ok()
    }
}

impl AlertSink for Dispatcher {
    fn send(&self, policy: &CompiledPolicy, crossings: &[AlertCrossing], now: Millis) {
        for crossing in crossings {
            let event = Arc::new(AlertEvent::new(policy, crossing, now));
            let body = match serde_json::to_vec(&*event) {
                Ok(b) => Bytes::from(b),
                Err(e) => {
                    tracing::error!(error = %e, rule = %event.rule, "cannot encode an alert");
                    continue;
                }
            };
            let Some(rule) = policy.rule(&crossing.rule) else {
                continue;
            };
            for id in policy.set.notifiers_for(rule) {
                let Some(kind) = policy.set.notifier(id) else {
                    continue;
                };
                self.shared.pending.fetch_add(1, Ordering::AcqRel);
                let delivery = Delivery {
                    notifier: id.to_string(),
                    kind,
                    event: event.clone(),
                    body: body.clone(),
                };
                if self.queue.try_send(delivery).is_err() {
                    self.shared.finish();
                    self.shared.counts.dropped.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(names::ALERT_QUEUE_DROPPED).increment(1);
                    tracing::error!(
                        notifier = id,
                        rule = %event.rule,
                        scope = %event.scope,
                        threshold = event.threshold,
                        "alert queue full; this alert is dropped"
                    );
                }
            }
        }
    }
}

async fn deliver_all(
    mut rx: mpsc::Receiver<Delivery>,
    store: Arc<dyn CounterStore>,
    config: DispatcherConfig,
    shared: Arc<Shared>,
) {
    let slots = Arc::new(Semaphore::new(config.concurrency.max(1)));
    while let Some(delivery) = rx.recv().await {
        metrics::counter!(
            names::ALERTS_FIRED,
            "rule" => delivery.event.rule.clone(),
            "threshold" => delivery.event.threshold.to_string()
        )
        .increment(1);
        if let NotifierKind::Log = delivery.kind {
            log_alert(&delivery);
            shared.counts.delivered.fetch_add(1, Ordering::Relaxed);
            shared.finish();
            continue;
        }
        // Waiting for a slot holds the queue back rather than piling up
        // tasks; the queue itself is what bounds memory.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            shared.finish();
            continue;
        };
        let (store, config, shared) = (store.clone(), config.clone(), shared.clone());
        tokio::spawn(async move {
            let ok = deliver_with_retries(&delivery, store.as_ref(), &config).await;
            let counter = if ok {
                &shared.counts.delivered
            } else {
                metrics::counter!(names::WEBHOOK_FAILURES, "notifier" => delivery.notifier.clone())
                    .increment(1);
                &shared.counts.failed
            };
            counter.fetch_add(1, Ordering::Relaxed);
            drop(permit);
            shared.finish();
        });
    }
}

fn log_alert(d: &Delivery) {
    let e = &d.event;
    tracing::warn!(
        target: "tollgate::alert",
        id = %e.id,
        rule = %e.rule,
        owner = e.owner.as_deref().unwrap_or(""),
        scope = %e.scope,
        unit = %e.unit,
        used = %e.used,
        limit = %e.limit,
        percent = %e.percent,
        threshold = e.threshold,
        window_start = e.window_start.as_deref().unwrap_or(""),
        window_end = e.window_end.as_deref().unwrap_or(""),
        "budget alert: rule {} at {}% for scope {}",
        e.rule,
        e.threshold,
        e.scope
    );
}

/// Tries a delivery until it succeeds or runs out of attempts, waiting
/// longer after each failure.
async fn deliver_with_retries(
    d: &Delivery,
    store: &dyn CounterStore,
    config: &DispatcherConfig,
) -> bool {
    let attempts = match &d.kind {
        NotifierKind::Webhook { max_attempts, .. } => *max_attempts,
        _ => 5,
    };
    let mut backoff = config.first_backoff;
    // A store append has no bound of its own; a webhook has its timeout.
    let limit = match &d.kind {
        NotifierKind::Webhook { timeout_ms, .. } => Duration::from_millis(*timeout_ms + 1_000),
        _ => STREAM_TIMEOUT,
    };
    for attempt in 1..=attempts {
        let once = tokio::time::timeout(limit, deliver_once(d, store))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} ms", limit.as_millis())));
        match once {
            Ok(()) => return true,
            Err(e) if attempt == attempts => {
                tracing::error!(
                    notifier = %d.notifier,
                    id = %d.event.id,
                    rule = %d.event.rule,
                    threshold = d.event.threshold,
                    attempts,
                    error = %e,
                    "alert delivery failed for good"
                );
            }
            Err(e) => {
                tracing::warn!(notifier = %d.notifier, attempt, error = %e, "alert delivery failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(config.max_backoff);
            }
        }
    }
    false
}

async fn deliver_once(d: &Delivery, store: &dyn CounterStore) -> Result<(), String> {
    match &d.kind {
        NotifierKind::Log => {
            log_alert(d);
            Ok(())
        }
        NotifierKind::Stream { name } => {
            let entry = String::from_utf8_lossy(&d.body);
            store.append(name, &entry).await.map_err(|e| e.to_string())
        }
        NotifierKind::Webhook {
            url,
            secret_env,
            timeout_ms,
            ..
        } => {
            // Read per delivery, so a rotated secret applies without a
            // restart; never sent unsigned.
            let secret = std::env::var(secret_env)
                .ok()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    format!(
                        "the signing secret variable {secret_env} is not set; not sending unsigned"
                    )
                })?;
            let headers = [
                (
                    webhook::SIGNATURE_HEADER,
                    webhook::signature(secret.as_bytes(), &d.body),
                ),
                ("x-tollgate-alert-id", d.event.id.clone()),
            ];
            let status = webhook::post(
                url,
                d.body.clone(),
                &headers,
                Duration::from_millis(*timeout_ms),
            )
            .await?;
            if (200..300).contains(&status) {
                Ok(())
            } else {
                Err(format!("the receiver answered {status}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::policy::{compile_sources, SourceFile, Unit};
    use tollgate_core::store::MemoryStore;

    fn crossing(threshold: u32) -> AlertCrossing {
        AlertCrossing {
            counter: "r|spend|h|d".to_string(),
            rule: "r".to_string(),
            scope: "team=a".to_string(),
            threshold,
            unit: Unit::Spend,
            used: Decimal::new(5025, 2),
            limit: Decimal::from(100),
            window_start: Some(0),
            window_end: Some(86_400_000),
        }
    }

    fn policy() -> CompiledPolicy {
        let yaml = "rules: [{ id: r, owner: o@example.com, per: [team], limit: { requests: 1, window: daily }, alerts: [50] }]";
        compile_sources(&[SourceFile {
            name: "p.yaml".to_string(),
            text: yaml.to_string(),
        }])
        .unwrap()
    }

    #[test]
    fn events_carry_exact_amounts_and_a_stable_id() {
        let p = policy();
        let a = AlertEvent::new(&p, &crossing(50), 1_000);
        assert_eq!(a.used, "50.25");
        assert_eq!(a.limit, "100");
        assert_eq!(a.percent, "50.25");
        assert_eq!(a.owner.as_deref(), Some("o@example.com"));
        assert_eq!(a.window_end.as_deref(), Some("1970-01-02T00:00:00Z"));
        // The same crossing delivered later keeps its id; another
        // threshold gets another.
        assert_eq!(a.id, AlertEvent::new(&p, &crossing(50), 9_999).id);
        assert_ne!(a.id, AlertEvent::new(&p, &crossing(75), 1_000).id);
    }

    #[test]
    fn an_overflowing_queue_counts_what_it_drops_and_delivers_the_rest() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let dispatcher = Dispatcher::start(
                Arc::new(MemoryStore::default()),
                DispatcherConfig {
                    queue: 2,
                    ..DispatcherConfig::default()
                },
            );
            // The delivery task has not run yet: the queue takes two.
            let p = policy();
            let crossings: Vec<AlertCrossing> = (1..=5).map(crossing).collect();
            dispatcher.send(&p, &crossings, 0);
            assert_eq!(dispatcher.counts().dropped.load(Ordering::Relaxed), 3);
            assert!(dispatcher.flush(Duration::from_secs(5)).await);
            assert_eq!(dispatcher.counts().delivered.load(Ordering::Relaxed), 2);
        });
    }
}
