//! Prometheus metrics, the tracked set of scopes, and the hooks the gate
//! calls around each decision, store call and settle.
//!
//! Any module may record with the `metrics` macros; without a recorder
//! (the library, tests) they do nothing. `serve` installs the Prometheus
//! recorder once, and `/metrics` renders it.

mod handles;
mod in_flight;
mod scopes;

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::status::PolicyStatus;
use audit::AuditLog;
use tollgate_core::engine::window::Millis;
use tollgate_core::engine::Verdict;
use tollgate_core::gate::{DecisionReport, Observer, TopUpReport};
use tollgate_core::store::StoreError;

pub mod audit;
pub mod dashboard;

pub use in_flight::InFlight;
pub use scopes::ScopeTracker;

/// Metric names. Keep every name here, including those other modules
/// record, so that none is used twice with different meanings.
pub mod names {
    pub const DECISIONS: &str = "tollgate_decisions_total";
    pub const DECISION_DURATION: &str = "tollgate_decision_duration_seconds";
    pub const STORE_DURATION: &str = "tollgate_store_duration_seconds";
    pub const STORE_ERRORS: &str = "tollgate_store_errors_total";
    pub const STORE_DISK_ERRORS: &str = "tollgate_store_disk_errors_total";
    pub const RESERVATIONS_IN_FLIGHT: &str = "tollgate_reservations_in_flight";
    pub const USAGE_USED: &str = "tollgate_usage_used";
    pub const USAGE_LIMIT: &str = "tollgate_usage_limit";
    pub const USAGE_DECISIONS: &str = "tollgate_usage_decisions_total";
    pub const USAGE_SCOPES_TRACKED: &str = "tollgate_usage_scopes_tracked";
    pub const USAGE_SCOPES_OVERFLOW: &str = "tollgate_usage_scopes_overflow_total";
    pub const AUDIT_WRITTEN: &str = "tollgate_audit_records_total";
    pub const AUDIT_DROPPED: &str = "tollgate_audit_dropped_total";
    /// Rendered from the reloader's status at scrape time, not recorded.
    pub const POLICY_RELOADS: &str = "tollgate_policy_reloads_total";
    pub const POLICY_INFO: &str = "tollgate_policy_info";
    pub const POLICY_RULES: &str = "tollgate_policy_rules";
    // Recorded by the alert dispatcher and the approvals in the gate.
    pub const ALERTS_FIRED: &str = "tollgate_alerts_fired_total";
    pub const WEBHOOK_FAILURES: &str = "tollgate_webhook_failures_total";
    pub const ALERT_QUEUE_DROPPED: &str = "tollgate_alert_queue_dropped_total";
    pub const APPROVALS: &str = "tollgate_approvals_total";
    // Recorded by the HTTP front ends.
    pub const CLIENT_ATTRIBUTES_IGNORED: &str = "tollgate_client_attributes_ignored_total";
    // Recorded by the ext_proc service and the settle it runs.
    pub const MODEL_MISMATCHES: &str = "tollgate_served_model_mismatches_total";
    pub const WITHDRAWN: &str = "tollgate_reservations_withdrawn_total";
    pub const SPEND_USD: &str = "tollgate_spend_usd_total";
    pub const SPEND_TOKENS: &str = "tollgate_spend_tokens_total";
    pub const SETTLE_RETRIES: &str = "tollgate_settle_retries_total";
    pub const SETTLES_ABANDONED: &str = "tollgate_settles_abandoned_total";
    pub const EXT_PROC_TOP_UPS: &str = "tollgate_ext_proc_top_ups_total";
    // Copied from the leasing Redis store's own counts.
    pub const LEASE_HITS: &str = "tollgate_lease_hits_total";
    pub const LEASE_MISSES: &str = "tollgate_lease_misses_total";
    pub const LEASE_REFILLS: &str = "tollgate_lease_refills_total";
    pub const LEASE_RENEWALS: &str = "tollgate_lease_renewals_total";
    pub const LEASE_RETURNS: &str = "tollgate_lease_returns_total";
    pub const LEASE_EARLY_DENIALS: &str = "tollgate_lease_early_denials_total";
    pub const LEASE_REDIS_CALLS: &str = "tollgate_lease_redis_calls_total";
    // Recorded by the TLS listeners' certificate reload.
    pub const TLS_RELOADS: &str = "tollgate_tls_certificate_reloads_total";
    // Recorded by the dashboard's activity feed.
    pub const DASHBOARD_DROPPED: &str = "tollgate_dashboard_records_dropped_total";
    pub const DASHBOARD_WRITE_ERRORS: &str = "tollgate_dashboard_write_errors_total";
}

/// Default cap on tracked (rule, scope) pairs.
pub const DEFAULT_MAX_SCOPES: usize = 1000;

const DECISION_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];

/// Installs the Prometheus recorder for the whole process. Call once, from
/// `serve`; a second call fails.
pub fn install_prometheus() -> Result<PrometheusHandle, String> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(names::DECISION_DURATION.into()),
            DECISION_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(names::STORE_DURATION.into()),
                DECISION_BUCKETS,
            )
        })
        .map_err(|e| e.to_string())?;
    let handle = builder.install_recorder().map_err(|e| e.to_string())?;
    describe();
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        names::DECISIONS,
        "Decisions by result (allow, deny, downgrade, error), reason code and denying rule"
    );
    describe_histogram!(
        names::DECISION_DURATION,
        Unit::Seconds,
        "Time to decide a request, store call included"
    );
    describe_histogram!(
        names::STORE_DURATION,
        Unit::Seconds,
        "Round-trip time of counter-store calls"
    );
    describe_counter!(names::STORE_ERRORS, "Counter-store failures by kind");
    describe_counter!(
        names::STORE_DISK_ERRORS,
        "Failed writes of the embedded store's data directory, by file (log, snapshot)"
    );
    describe_counter!(
        names::MODEL_MISMATCHES,
        "Settles that charged the model the upstream served, not the one decided on"
    );
    describe_counter!(
        names::SETTLE_RETRIES,
        "ext_proc settles retried after a counter-store fault"
    );
    describe_counter!(
        names::SETTLES_ABANDONED,
        "ext_proc settles given up on a store fault because too many already waited to retry; their reservations keep the estimate"
    );
    describe_counter!(
        names::EXT_PROC_TOP_UPS,
        "ext_proc top-ups of a stream past its reservation, by outcome (reserved, no_room, store_error, error)"
    );
    describe_counter!(
        names::TLS_RELOADS,
        "TLS certificate changes seen on disk, by outcome (applied, rejected: the certificate in force kept serving)"
    );
    describe_counter!(
        names::DASHBOARD_DROPPED,
        "Dashboard activity records (denials, alerts, scopes) dropped because the writer's queue was full"
    );
    describe_counter!(
        names::DASHBOARD_WRITE_ERRORS,
        "Dashboard activity records the counter store did not take"
    );
    describe_counter!(
        names::CLIENT_ATTRIBUTES_IGNORED,
        "Attribute headers a client sent that the policy does not let clients set, by attribute"
    );
    describe_gauge!(
        names::RESERVATIONS_IN_FLIGHT,
        "Reservations this process made that are neither settled nor expired"
    );
    describe_gauge!(
        names::USAGE_USED,
        "A counter's value as of the last decision that touched it (USD for spend)"
    );
    describe_gauge!(names::USAGE_LIMIT, "A counter's limit (USD for spend)");
    describe_counter!(
        names::USAGE_DECISIONS,
        "Decisions that touched a rule's counter; untracked scopes are summed as scope=\"other\""
    );
    describe_gauge!(
        names::USAGE_SCOPES_TRACKED,
        "Distinct (rule, scope) pairs tracked, at most --metrics-max-scopes"
    );
    describe_counter!(
        names::USAGE_SCOPES_OVERFLOW,
        "Counter reports about scopes past --metrics-max-scopes"
    );
    describe_counter!(names::AUDIT_WRITTEN, "Audit records written");
    describe_counter!(
        names::AUDIT_DROPPED,
        "Audit records dropped because the writer's queue was full"
    );
    describe_counter!(
        names::ALERTS_FIRED,
        "Alert deliveries started, by rule and threshold (one per notifier)"
    );
    describe_counter!(
        names::WEBHOOK_FAILURES,
        "Alert deliveries that failed for good after every attempt, by notifier"
    );
    describe_counter!(
        names::ALERT_QUEUE_DROPPED,
        "Alerts dropped because the delivery queue was full"
    );
    describe_counter!(
        names::APPROVALS,
        "Approvals and revocations recorded, by action"
    );
    describe_gauge!(
        names::SPEND_USD,
        "Settled spend in USD, by model and team (a float: the spend account, tollgate spend, is exact); at most 1,000 model and team pairs, the rest as other/other"
    );
    describe_counter!(
        names::SPEND_TOKENS,
        "Settled tokens by model, team and kind (input, cached_input, output, reasoning); the same label bound as tollgate_spend_usd_total"
    );
    describe_counter!(
        names::LEASE_HITS,
        "Decisions made from this replica's leases, with no Redis round trip"
    );
    describe_counter!(
        names::LEASE_MISSES,
        "Decisions that went to Redis (refilling leases where they could)"
    );
    describe_counter!(names::LEASE_REFILLS, "Leases granted to this replica");
    describe_counter!(
        names::LEASE_RENEWALS,
        "Of the leases granted, those renewed in the background before a busy lease ran out"
    );
    describe_counter!(
        names::LEASE_RETURNS,
        "Unused leases handed back to Redis (refills, expiries, shutdown)"
    );
    describe_counter!(
        names::LEASE_EARLY_DENIALS,
        "Denials made only because other replicas held unused leases on the counter"
    );
    describe_counter!(
        names::LEASE_REDIS_CALLS,
        "Calls the leasing store made to Redis; divided by hits plus misses, the Redis calls per decision"
    );
    describe_counter!(
        names::WITHDRAWN,
        "Reservations made by a store call that outlived its timeout or its caller, taken back: refunded (a refused call) or kept at their estimate with their slots freed (a call that failed open); failed: left to lapse charged"
    );
}

#[derive(Debug)]
pub struct TelemetryConfig {
    pub max_scopes: usize,
    /// The gate's reservation TTL, for counting reservations in flight.
    pub reservation_ttl: Duration,
    pub audit: Option<AuditLog>,
}

/// What the gate keeps between decisions: the tracked scopes, the
/// reservations in flight and the audit log.
#[derive(Debug)]
pub struct Telemetry {
    scopes: ScopeTracker,
    in_flight: InFlight,
    ttl: Millis,
    audit: Option<AuditLog>,
    prometheus: OnceLock<PrometheusHandle>,
    spend_labels: SpendLabels,
    /// The dashboard's activity feed, once the server starts one.
    dashboard: OnceLock<dashboard::DashboardFeed>,
    decisions: handles::DecisionCounters,
    /// Taken from the recorder at first use, after `serve` installed it.
    decision_duration: OnceLock<metrics::Histogram>,
    store_duration: OnceLock<metrics::Histogram>,
}

/// The (model, team) label pairs of the spend metrics, bounded: past
/// [`SpendLabels::MAX`] pairs, new ones are reported as `other`.
#[derive(Debug, Default)]
struct SpendLabels {
    known: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
}

impl SpendLabels {
    const MAX: usize = 1_000;

    fn labels(&self, model: &str, team: &str) -> (String, String) {
        let pair = (model.to_string(), team.to_string());
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.contains(&pair) {
            return pair;
        }
        if known.len() < Self::MAX {
            known.insert(pair.clone());
            return pair;
        }
        ("other".to_string(), "other".to_string())
    }
}

impl Telemetry {
    pub fn new(config: TelemetryConfig) -> Telemetry {
        Telemetry {
            scopes: ScopeTracker::new(config.max_scopes),
            in_flight: InFlight::new(config.reservation_ttl),
            ttl: config.reservation_ttl.as_millis() as Millis,
            audit: config.audit,
            prometheus: OnceLock::new(),
            spend_labels: SpendLabels::default(),
            dashboard: OnceLock::new(),
            decisions: handles::DecisionCounters::default(),
            decision_duration: OnceLock::new(),
            store_duration: OnceLock::new(),
        }
    }

    /// Serves `/metrics` from this recorder.
    pub fn set_prometheus(&self, handle: PrometheusHandle) {
        let _ = self.prometheus.set(handle);
    }

    /// Queues denials and newly tracked scopes for the dashboard.
    pub fn set_dashboard_feed(&self, feed: dashboard::DashboardFeed) {
        let _ = self.dashboard.set(feed);
    }

    pub fn scopes(&self) -> &ScopeTracker {
        &self.scopes
    }

    pub fn audit(&self) -> Option<&AuditLog> {
        self.audit.as_ref()
    }

    /// The scrape: everything recorded, plus what is read at scrape time.
    /// `None` when no recorder was installed.
    pub fn render(&self, now: Millis, status: &PolicyStatus) -> Option<String> {
        let handle = self.prometheus.get()?;
        metrics::gauge!(names::RESERVATIONS_IN_FLIGHT).set(self.in_flight.count(now) as f64);
        metrics::gauge!(names::USAGE_SCOPES_TRACKED).set(self.scopes.len() as f64);
        let mut text = handle.render();
        render_policy(&mut text, status);
        Some(text)
    }

    /// Runs the recorder's periodic maintenance (draining histograms).
    pub fn upkeep(&self) {
        if let Some(h) = self.prometheus.get() {
            h.run_upkeep();
        }
    }
}

fn render_policy(text: &mut String, s: &PolicyStatus) {
    let version = s.version.replace('\\', "\\\\").replace('"', "\\\"");
    let _ = write!(
        text,
        "# HELP {reloads} Policy reloads applied (success) and edits rejected (failure)\n\
         # TYPE {reloads} counter\n\
         {reloads}{{result=\"success\"}} {ok}\n\
         {reloads}{{result=\"failure\"}} {failed}\n\
         # HELP {info} The policy set in force, by content version\n\
         # TYPE {info} gauge\n\
         {info}{{version=\"{version}\"}} 1\n\
         # HELP {rules} Rules in the policy set in force\n\
         # TYPE {rules} gauge\n\
         {rules} {count}\n",
        reloads = names::POLICY_RELOADS,
        info = names::POLICY_INFO,
        rules = names::POLICY_RULES,
        ok = s.reloads,
        failed = s.failed_reloads,
        count = s.rules,
    );
}

/// Copies the leasing store's counts into the metrics, every second
/// until the store goes.
pub fn watch_leases(stats: std::sync::Weak<tollgate_core::store::LeaseStats>) {
    use std::sync::atomic::Ordering::Relaxed;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(s) = stats.upgrade() else {
                return;
            };
            for (name, value) in [
                (names::LEASE_HITS, &s.hits),
                (names::LEASE_MISSES, &s.misses),
                (names::LEASE_REFILLS, &s.refills),
                (names::LEASE_RENEWALS, &s.renewals),
                (names::LEASE_RETURNS, &s.returns),
                (names::LEASE_EARLY_DENIALS, &s.early_denials),
                (names::LEASE_REDIS_CALLS, &s.redis_calls),
            ] {
                metrics::counter!(name).absolute(value.load(Relaxed));
            }
        }
    });
}

/// A failed write of the embedded store's data directory (`file` is `log`
/// or `snapshot`); called from the store's writer thread.
pub fn record_store_disk_error(file: &'static str) {
    metrics::counter!(names::STORE_DISK_ERRORS, "file" => file).increment(1);
}

/// The gate reports to telemetry: metrics for every decision and store
/// call, the tracked scopes, reservations in flight, and the decision log.
impl Observer for Telemetry {
    fn decided(&self, report: &DecisionReport<'_>) {
        let (result, reason, rule) = match report.result {
            Ok(d) => (d.verdict.name(), d.reason.code(), d.rule.as_deref()),
            Err(e) => ("error", e.code(), None),
        };
        self.decisions
            .increment(result, reason, rule.unwrap_or_default());
        self.decision_duration
            .get_or_init(|| metrics::histogram!(names::DECISION_DURATION))
            .record(report.elapsed.as_secs_f64());
        if let Ok(d) = report.result {
            let feed = self.dashboard.get();
            for counter in &d.counters {
                if self.scopes.observe(counter) {
                    if let Some(feed) = feed {
                        feed.scope_seen(&counter.rule, &counter.scope);
                    }
                }
            }
            if let Some(feed) = feed {
                feed.decided(report);
            }
            if d.reservation_id.is_some() && d.verdict != Verdict::Deny {
                self.in_flight.reserved(report.now + self.ttl);
            }
        }
        if let Some(audit) = &self.audit {
            audit.record(report);
        }
    }

    fn topped_up(&self, report: &TopUpReport<'_>) {
        if let Some(audit) = &self.audit {
            audit.record_top_up(report);
        }
    }

    fn cancelled(&self) {
        metrics::counter!(names::DECISIONS, "result" => "cancelled", "reason" => "cancelled", "rule" => "")
            .increment(1);
    }

    fn store_call(&self, elapsed: Duration, error: Option<&StoreError>) {
        self.store_duration
            .get_or_init(|| metrics::histogram!(names::STORE_DURATION))
            .record(elapsed.as_secs_f64());
        if let Some(e) = error {
            metrics::counter!(names::STORE_ERRORS, "kind" => e.kind()).increment(1);
        }
    }

    fn settled(&self, expires_at: Millis) {
        self.in_flight.settled(expires_at);
    }

    fn approval(&self, action: &str) {
        metrics::counter!(names::APPROVALS, "action" => action.to_string()).increment(1);
    }

    fn served_other_model(&self) {
        metrics::counter!(names::MODEL_MISMATCHES).increment(1);
    }

    fn spent(&self, model: &str, team: &str, used: &tollgate_core::store::SpendEntry) {
        let (model, team) = self.spend_labels.labels(model, team);
        // The exporter's counters count whole numbers; dollars are not.
        // This gauge only ever goes up, so it reads as a counter.
        metrics::gauge!(names::SPEND_USD, "model" => model.clone(), "team" => team.clone())
            .increment(used.spend_pico as f64 / 1e12);
        for (kind, n) in [
            ("input", used.input_tokens),
            ("cached_input", used.cached_input_tokens),
            ("output", used.output_tokens),
            ("reasoning", used.reasoning_tokens),
        ] {
            if n > 0 {
                metrics::counter!(names::SPEND_TOKENS, "model" => model.clone(), "team" => team.clone(), "kind" => kind)
                    .increment(n as u64);
            }
        }
    }

    fn withdrawn(&self, kept: bool) {
        let outcome = if kept { "kept_estimate" } else { "refunded" };
        metrics::counter!(names::WITHDRAWN, "outcome" => outcome).increment(1);
    }

    fn withdraw_failed(&self) {
        metrics::counter!(names::WITHDRAWN, "outcome" => "failed").increment(1);
    }
}
