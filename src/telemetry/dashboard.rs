//! What the budget dashboard shows about activity, kept in the counter
//! store so that every replica shows the same: the recent denials, the
//! denial counts by minute, the alerts fired and the scopes seen.
//!
//! Nothing here runs on the decision path but a `try_send`: the observer
//! queues a small record into a bounded channel, and a background task
//! writes the queue in batches (at most every [`FLUSH_EVERY`]). A full
//! queue drops the record and counts it
//! (`tollgate_dashboard_records_dropped_total`).
//!
//! Bounds: the queue holds at most [`QUEUE`] records (each a few hundred
//! bytes: under 2 MiB); the writer keeps one minute of counts, at most
//! [`MAX_COUNT_SERIES`] (rule, reason) pairs. In the store each log is
//! capped as every log is (`--redis-log-max-entries` on Redis, 10,000
//! entries in the embedded store), and a batch appends at most
//! [`MAX_DENIALS_PER_BATCH`] individual denials: past it, denials are only
//! counted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::names;
use tollgate_core::engine::decide::AlertCrossing;
use tollgate_core::engine::window::Millis;
use tollgate_core::engine::{Decision, Verdict};
use tollgate_core::gate::{AlertSink, Clock, DecisionReport, SystemClock};
use tollgate_core::policy::CompiledPolicy;
use tollgate_core::store::CounterStore;

/// Every denial, newest last (capped per batch).
pub const DENIALS_LOG: &str = "dashboard:denials";
/// One entry per replica and minute with denials: the counts by rule and
/// reason.
pub const DENIAL_COUNTS_LOG: &str = "dashboard:denial-counts";
/// Every alert fired (once per threshold and window, across replicas).
pub const ALERTS_LOG: &str = "dashboard:alerts";
/// Each (rule, scope) the first time a replica tracks it.
pub const SCOPES_LOG: &str = "dashboard:scopes";

/// Records waiting to be written, at most.
pub const QUEUE: usize = 8_192;
/// How often the writer writes what is queued.
pub const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// Individual denials appended per batch, at most.
pub const MAX_DENIALS_PER_BATCH: usize = 25;
/// Distinct (rule, reason) pairs counted per minute, at most; the rest are
/// counted as rule `other`.
pub const MAX_COUNT_SERIES: usize = 200;
/// The width of one bucket of the denial counts.
pub const COUNT_BUCKET_MS: Millis = 60_000;
/// How long one store write may take before it is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// One denial as the dashboard lists it. The key is its registry id or
/// hash prefix, never a raw key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DenialRecord {
    /// Milliseconds since the epoch.
    pub at: Millis,
    pub rule: String,
    pub scope: String,
    pub reason: String,
    #[serde(default)]
    pub retry_after: Option<u64>,
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub team: Option<String>,
}

/// One alert as the dashboard lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AlertRecord {
    pub at: Millis,
    pub rule: String,
    pub scope: String,
    pub threshold: u32,
    pub unit: String,
    pub used: String,
    pub limit: String,
    #[serde(default)]
    pub owner: Option<String>,
}

/// One minute's denial counts of one replica.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CountsRecord {
    /// The start of the minute.
    pub at: Millis,
    /// `[rule, reason, count]`.
    pub counts: Vec<(String, String, u64)>,
}

/// A (rule, scope) pair seen.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ScopeRecord {
    pub rule: String,
    pub scope: String,
}

#[derive(Debug)]
enum Record {
    Denial(DenialRecord),
    Alert(AlertRecord),
    Scope(ScopeRecord),
}

/// The queue into the writer. Cloning shares it.
#[derive(Debug, Clone)]
pub struct DashboardFeed {
    tx: mpsc::Sender<Record>,
    dropped: Arc<AtomicU64>,
}

impl DashboardFeed {
    /// The feed and its writer task, which writes into `store` until every
    /// feed is dropped.
    pub fn start(store: Arc<dyn CounterStore>) -> DashboardFeed {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write(store, rx));
        DashboardFeed {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Records dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn push(&self, record: Record) {
        if self.tx.try_send(record).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(names::DASHBOARD_DROPPED).increment(1);
        }
    }

    /// A decision finished: a denial is queued.
    pub fn decided(&self, report: &DecisionReport<'_>) {
        let Ok(d) = report.result else { return };
        if d.verdict != Verdict::Deny {
            return;
        }
        self.push(Record::Denial(denial(report, d)));
    }

    /// A (rule, scope) pair this process tracks from now on.
    pub fn scope_seen(&self, rule: &str, scope: &str) {
        self.push(Record::Scope(ScopeRecord {
            rule: rule.to_string(),
            scope: scope.to_string(),
        }));
    }
}

fn denial(report: &DecisionReport<'_>, d: &Decision) -> DenialRecord {
    let attrs = report.attributes;
    DenialRecord {
        at: report.now,
        rule: d.rule.clone().unwrap_or_default(),
        scope: d.scope.clone().unwrap_or_default(),
        reason: d.reason.code().to_string(),
        retry_after: d.retry_after,
        key: attrs.and_then(|a| a.key.clone()),
        model: attrs.and_then(|a| a.model.clone()),
        team: attrs.and_then(|a| a.team.clone()),
    }
}

/// An [`AlertSink`] that hands every alert to `inner` (the dispatcher) and
/// queues it for the dashboard.
#[derive(Debug)]
pub struct AlertTee {
    pub inner: Arc<dyn AlertSink>,
    pub feed: DashboardFeed,
}

impl AlertSink for AlertTee {
    fn send(&self, policy: &CompiledPolicy, crossings: &[AlertCrossing], now: Millis) {
        self.inner.send(policy, crossings, now);
        for c in crossings {
            let owner = policy
                .rule_index(&c.rule)
                .and_then(|i| policy.rules()[i].owner.clone());
            self.feed.push(Record::Alert(AlertRecord {
                at: now,
                rule: c.rule.clone(),
                scope: c.scope.clone(),
                threshold: c.threshold,
                unit: c.unit.name().to_string(),
                used: c.used.normalize().to_string(),
                limit: c.limit.normalize().to_string(),
                owner,
            }));
        }
    }
}

/// The writer: batches every [`FLUSH_EVERY`], counts by minute.
async fn write(store: Arc<dyn CounterStore>, mut rx: mpsc::Receiver<Record>) {
    let mut counts: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut bucket: Option<Millis> = None;
    let mut batch = Vec::new();
    loop {
        let open = tokio::select! {
            n = rx.recv_many(&mut batch, QUEUE) => n > 0,
            () = tokio::time::sleep(Duration::from_secs(5)) => true,
        };
        let now = SystemClock.now();
        let minute = now - now.rem_euclid(COUNT_BUCKET_MS);
        if bucket.is_some_and(|b| b != minute) || !open {
            if let Some(b) = bucket.take() {
                flush_counts(&*store, b, std::mem::take(&mut counts)).await;
            }
        }
        let mut denials = 0;
        for record in batch.drain(..).rev() {
            match record {
                Record::Denial(d) => {
                    bucket.get_or_insert(minute);
                    let series = if counts.len() < MAX_COUNT_SERIES
                        || counts.contains_key(&(d.rule.clone(), d.reason.clone()))
                    {
                        (d.rule.clone(), d.reason.clone())
                    } else {
                        ("other".to_string(), d.reason.clone())
                    };
                    *counts.entry(series).or_default() += 1;
                    // Newest first: the ones past the cap are the oldest.
                    denials += 1;
                    if denials <= MAX_DENIALS_PER_BATCH {
                        append(&*store, DENIALS_LOG, &d).await;
                    }
                }
                Record::Alert(a) => append(&*store, ALERTS_LOG, &a).await,
                Record::Scope(s) => append(&*store, SCOPES_LOG, &s).await,
            }
        }
        if !open {
            return;
        }
        tokio::time::sleep(FLUSH_EVERY).await;
    }
}

async fn flush_counts(
    store: &dyn CounterStore,
    at: Millis,
    counts: BTreeMap<(String, String), u64>,
) {
    if counts.is_empty() {
        return;
    }
    let record = CountsRecord {
        at,
        counts: counts.into_iter().map(|((r, s), n)| (r, s, n)).collect(),
    };
    append(store, DENIAL_COUNTS_LOG, &record).await;
}

async fn append(store: &dyn CounterStore, log: &str, record: &impl Serialize) {
    let Ok(entry) = serde_json::to_string(record) else {
        return;
    };
    match tokio::time::timeout(WRITE_TIMEOUT, store.append(log, &entry)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            metrics::counter!(names::DASHBOARD_WRITE_ERRORS).increment(1);
            tracing::debug!(log, error = %e, "cannot write a dashboard record");
        }
        Err(_) => {
            metrics::counter!(names::DASHBOARD_WRITE_ERRORS).increment(1);
            tracing::debug!(log, "a dashboard record write timed out");
        }
    }
}
