//! The budget dashboard: a page at `/ui/` (`/` redirects there), its
//! assets compiled into the binary, and the JSON behind it,
//! `GET /v1/dashboard` (API version 1, documented in docs/dashboard.md).
//!
//! Everything the page shows comes from the counter store, so every
//! replica on one Redis shows the same: the counters of every scope any
//! replica tracks (the scopes log), the denials, their counts by minute and
//! the alerts that `telemetry::dashboard` writes there, the grants. The one
//! thing kept in this process is the last hour's samples of the busiest
//! [`TOP_N`] scopes, for their last-hour burn rate: at most [`TOP_N`] ×
//! [`MAX_SAMPLES`] samples, whatever the number of scopes.
//!
//! The answer is built at most once a [`CACHE_FOR`] and shared by every
//! caller in that time, so viewers cost the store a bounded number of
//! reads however many they are.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde::Serialize;

use super::admin::AdminToken;
use super::status::Refusal;
use crate::reload::Reloader;
use crate::telemetry::dashboard::{
    AlertRecord, CountsRecord, DenialRecord, ScopeRecord, ALERTS_LOG, DENIALS_LOG,
    DENIAL_COUNTS_LOG, SCOPES_LOG,
};
use crate::telemetry::Telemetry;
use tollgate_core::engine::window::{format_utc, span, Millis};
use tollgate_core::engine::CounterReport;
use tollgate_core::gate::{grant_view, Gate, READER_TIMEOUT, SCOPES_PER_READ};
use tollgate_core::policy::{CompiledPolicy, Enforcement, OnExceed, Rule, Window};
use tollgate_core::store::CounterStore;

/// The version of `/v1/dashboard`'s JSON; a field is only ever added
/// within one version.
pub const API_VERSION: u32 = 1;
/// Scopes whose last-hour rate is followed.
pub const TOP_N: usize = 20;
/// Samples kept per followed scope: one every [`SAMPLE_EVERY`] for an
/// hour and a little more.
pub const MAX_SAMPLES: usize = 400;
const SAMPLE_EVERY: Millis = 10_000;
const HOUR: Millis = 3_600_000;
/// How long one built answer is served.
pub const CACHE_FOR: Duration = Duration::from_secs(1);
/// Budget rows listed at most.
pub const MAX_ROWS: usize = 5_000;
/// Entries read from each log.
const RECENT_DENIALS_READ: usize = 500;
const RECENT_DENIALS_SHOWN: usize = 50;
const ALERTS_SHOWN: usize = 50;
const COUNTS_READ: usize = 5_000;
/// The denial history: hourly buckets, this many hours back.
pub const HISTORY_HOURS: usize = 72;
const HISTORY_SERIES: usize = 12;
/// An approval ask is listed this long after its last denial.
const PENDING_FOR: Millis = 24 * HOUR;

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const STYLE_CSS: &str = include_str!("ui/style.css");
const FAVICON_SVG: &str = include_str!("ui/favicon.svg");

/// Whether the dashboard is served, and to whom (`--dashboard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DashboardMode {
    /// The page and its JSON for anyone who reaches the HTTP port;
    /// approving still takes the admin token.
    On,
    /// Neither.
    Off,
    /// The page, but its JSON only with the admin token.
    Admin,
}

/// Where the admin API is, as the page tells its reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminPlace {
    /// No admin token configured: no approvals from anywhere.
    Off,
    /// On this HTTP port: the page can approve.
    Shared,
    /// On a listener of its own (`--admin-listen`), at this address.
    Own(String),
}

#[derive(Debug)]
pub struct Dashboard {
    gate: Arc<Gate>,
    store: Arc<dyn CounterStore>,
    reloader: Arc<Reloader>,
    telemetry: Arc<Telemetry>,
    mode: DashboardMode,
    token: Option<AdminToken>,
    admin: AdminPlace,
    rates: Mutex<Rates>,
    /// The last answer, or refusal, and when it was built.
    cache: tokio::sync::Mutex<Option<(Instant, Answer)>>,
}

/// One built answer: the JSON, or why there is none.
type Answer = Result<Arc<String>, Refusal>;

pub struct DashboardConfig {
    pub mode: DashboardMode,
    pub token: Option<AdminToken>,
    pub admin: AdminPlace,
}

impl Dashboard {
    pub fn new(
        gate: Arc<Gate>,
        store: Arc<dyn CounterStore>,
        reloader: Arc<Reloader>,
        telemetry: Arc<Telemetry>,
        config: DashboardConfig,
    ) -> Result<Dashboard, String> {
        if config.mode == DashboardMode::Admin && config.token.is_none() {
            return Err("--dashboard admin needs an admin token (--admin-token-file or TOLLGATE_ADMIN_TOKEN)".to_string());
        }
        Ok(Dashboard {
            gate,
            store,
            reloader,
            telemetry,
            mode: config.mode,
            token: config.token,
            admin: config.admin,
            rates: Mutex::new(Rates::default()),
            cache: tokio::sync::Mutex::new(None),
        })
    }

    pub fn mode(&self) -> DashboardMode {
        self.mode
    }

    /// The page's routes; none when the dashboard is off.
    pub fn routes(self: &Arc<Self>) -> Router {
        if self.mode == DashboardMode::Off {
            return Router::new();
        }
        Router::new()
            .route("/", get(redirect))
            .route("/ui", get(redirect))
            .route(
                "/ui/",
                get(|| asset(INDEX_HTML, "text/html; charset=utf-8")),
            )
            .route(
                "/ui/index.html",
                get(|| asset(INDEX_HTML, "text/html; charset=utf-8")),
            )
            .route(
                "/ui/app.js",
                get(|| asset(APP_JS, "text/javascript; charset=utf-8")),
            )
            .route(
                "/ui/style.css",
                get(|| asset(STYLE_CSS, "text/css; charset=utf-8")),
            )
            .route(
                "/ui/favicon.svg",
                get(|| asset(FAVICON_SVG, "image/svg+xml")),
            )
            .route("/v1/dashboard", get(data))
            .with_state(self.clone())
    }

    /// Takes a sample of the busiest scopes every `every`, so that their
    /// last-hour rates are known when nobody is looking.
    pub fn spawn_sampler(
        self: &Arc<Self>,
        every: Duration,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        if self.mode == DashboardMode::Off {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            tokio::pin!(shutdown);
            // The first a period after the start: a server nobody looks at
            // reads nothing for the dashboard in its first moments.
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tokio::select! {
                    _ = tick.tick() => { let _ = me.answer().await; }
                    () = &mut shutdown => return,
                }
            }
        });
    }

    /// The JSON, from the cache when it is fresh. A refusal is kept as
    /// long, so that a store in trouble is not asked again by every caller.
    pub async fn answer(&self) -> Result<Arc<String>, Refusal> {
        let mut cache = self.cache.lock().await;
        if let Some((at, answer)) = cache.as_ref() {
            if at.elapsed() < CACHE_FOR {
                return answer.clone();
            }
        }
        let answer = self
            .build()
            .await
            .map(|view| Arc::new(serde_json::to_string(&view).unwrap_or_default()));
        *cache = Some((Instant::now(), answer.clone()));
        answer
    }

    async fn build(&self) -> Result<View, Refusal> {
        let policy = self.gate.policy();
        let now = self.gate.now();
        let local = self.telemetry.scopes();
        let scopes_max = local.max();
        let (seen, denials, counts, alerts, grants) = tokio::join!(
            self.log(SCOPES_LOG, MAX_ROWS),
            self.log(DENIALS_LOG, RECENT_DENIALS_READ),
            self.log(DENIAL_COUNTS_LOG, COUNTS_READ),
            self.log(ALERTS_LOG, ALERTS_SHOWN),
            tokio::time::timeout(READER_TIMEOUT, self.gate.approvals()),
        );
        let mut warnings = Vec::new();
        let mut wanted: Vec<(String, String)> = local.list();
        let mut known: HashSet<(String, String)> = wanted.iter().cloned().collect();
        for s in parse::<ScopeRecord>(&seen, &mut warnings, SCOPES_LOG) {
            if wanted.len() >= MAX_ROWS {
                break;
            }
            let pair = (s.rule, s.scope);
            if known.insert(pair.clone()) {
                wanted.push(pair);
            }
        }
        wanted.truncate(MAX_ROWS);
        // In slices, one after the other, each bounded by its own timeout
        // (not the decisions' one, which a read of many counters on a busy
        // store can miss): a slice that fails costs its rows, not the
        // answer.
        let mut counters = Vec::with_capacity(wanted.len());
        let mut unread = 0;
        let mut last_error = None;
        for slice in wanted.chunks(SCOPES_PER_READ) {
            match self.gate.read_scopes_within(slice, READER_TIMEOUT).await {
                Ok(c) => counters.extend(c),
                Err(e) => {
                    unread += slice.len();
                    last_error = Some(e);
                }
            }
        }
        if let Some(e) = last_error {
            if counters.is_empty() {
                return Err(Refusal::from_gate_error(&e));
            }
            warnings.push(format!("{unread} scopes not read: {e}"));
        }
        let mut budgets: Vec<Budget> = counters
            .iter()
            .map(|c| Budget::of(&policy, c, now))
            .collect();
        self.rates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sample(&mut budgets, now);
        budgets.sort_by(|a, b| (&a.rule, &a.scope).cmp(&(&b.rule, &b.scope)));

        let mut recent: Vec<DenialRecord> = parse(&denials, &mut warnings, DENIALS_LOG);
        recent.sort_by_key(|d| std::cmp::Reverse(d.at));
        let grants = match grants {
            Ok(Ok(g)) => g,
            Ok(Err(e)) => {
                warnings.push(format!("grants: {e}"));
                Vec::new()
            }
            Err(_) => {
                warnings.push("grants: the store did not answer in time".to_string());
                Vec::new()
            }
        };
        let granted: HashSet<(&str, &str)> = grants
            .iter()
            .map(|g| (g.rule.as_str(), g.scope.as_str()))
            .collect();
        let pending = pending_asks(&policy, &recent, &granted);
        let mut alerts: Vec<AlertRecord> = parse(&alerts, &mut warnings, ALERTS_LOG);
        alerts.sort_by_key(|a| std::cmp::Reverse(a.at));
        let history = history(&parse(&counts, &mut warnings, DENIAL_COUNTS_LOG), now);
        recent.truncate(RECENT_DENIALS_SHOWN);
        let rules = policy
            .rules()
            .iter()
            .map(|r| RuleView::of(r, &policy))
            .collect();
        Ok(View {
            api_version: API_VERSION,
            generated_at: format_utc(now),
            generated_at_ms: now,
            mode: match self.mode {
                DashboardMode::Admin => "admin",
                _ => "on",
            },
            policy: self.reloader.status(),
            admin: match &self.admin {
                AdminPlace::Off => AdminView {
                    api: "off",
                    address: None,
                },
                AdminPlace::Shared => AdminView {
                    api: "shared",
                    address: None,
                },
                AdminPlace::Own(a) => AdminView {
                    api: "own",
                    address: Some(a.clone()),
                },
            },
            rules,
            scopes_listed: budgets.len(),
            scopes_max,
            budgets,
            denials: Denials {
                recent: recent.iter().map(DenialView::of).collect(),
                history,
            },
            alerts: alerts.iter().map(AlertView::of).collect(),
            approvals: Approvals {
                grants: grants.iter().map(grant_view).collect(),
                pending,
            },
            learned_output: learned_view(&policy, &self.gate),
            warnings,
        })
    }

    async fn log(&self, log: &str, limit: usize) -> Result<Vec<String>, String> {
        match tokio::time::timeout(READER_TIMEOUT, self.store.entries(log, limit)).await {
            Ok(Ok(e)) => Ok(e),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the store did not answer in time".to_string()),
        }
    }

    fn allowed(&self, headers: &HeaderMap) -> bool {
        if self.mode != DashboardMode::Admin {
            return true;
        }
        let header = headers.get("authorization").and_then(|v| v.to_str().ok());
        self.token.as_ref().is_some_and(|t| t.accepts(header))
    }
}

fn parse<T: serde::de::DeserializeOwned>(
    entries: &Result<Vec<String>, String>,
    warnings: &mut Vec<String>,
    log: &str,
) -> Vec<T> {
    match entries {
        Ok(entries) => entries
            .iter()
            .filter_map(|e| serde_json::from_str(e).ok())
            .collect(),
        Err(e) => {
            warnings.push(format!("{log}: {e}"));
            Vec::new()
        }
    }
}

async fn redirect() -> Response {
    (StatusCode::FOUND, [("location", "/ui/")]).into_response()
}

/// Served with a policy that lets the page load nothing but its own
/// assets, and talk to nothing but this server.
async fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        StatusCode::OK,
        [
            ("content-type", content_type),
            ("cache-control", "no-cache"),
            ("x-content-type-options", "nosniff"),
            ("referrer-policy", "no-referrer"),
            (
                "content-security-policy",
                "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
        ],
        body,
    )
        .into_response()
}

async fn data(State(d): State<Arc<Dashboard>>, headers: HeaderMap) -> Response {
    if !d.allowed(&headers) {
        return json(&Refusal::unauthenticated());
    }
    match d.answer().await {
        Ok(body) => (
            StatusCode::OK,
            [
                ("content-type", "application/json"),
                ("cache-control", "no-store"),
            ],
            body.as_ref().clone(),
        )
            .into_response(),
        Err(r) => json(&r),
    }
}

fn json(r: &Refusal) -> Response {
    let status = StatusCode::from_u16(r.http).unwrap_or(StatusCode::BAD_REQUEST);
    (status, [("content-type", "application/json")], r.body()).into_response()
}

#[derive(Serialize)]
struct View {
    api_version: u32,
    generated_at: String,
    generated_at_ms: Millis,
    mode: &'static str,
    policy: crate::status::PolicyStatus,
    admin: AdminView,
    rules: Vec<RuleView>,
    scopes_listed: usize,
    scopes_max: usize,
    budgets: Vec<Budget>,
    denials: Denials,
    alerts: Vec<AlertView>,
    approvals: Approvals,
    learned_output: LearnedView,
    warnings: Vec<String>,
}

/// The output tokens this replica learned from the calls it settled
/// (`defaults.output_tokens: learned`); unlike the rest of the view, not
/// read from the store: each replica learns its own.
#[derive(Serialize)]
struct LearnedView {
    enabled: bool,
    percentile: Option<u8>,
    min_samples: Option<u32>,
    keys_max: usize,
    /// Keys that took the place of the one settled longest ago.
    keys_evicted: u64,
    entries: Vec<tollgate_core::gate::LearnedRow>,
}

fn learned_view(policy: &CompiledPolicy, gate: &Gate) -> LearnedView {
    let learn = policy.set.defaults.learn_output;
    let (entries, keys_evicted) = gate.learned_outputs().unwrap_or_default();
    LearnedView {
        enabled: learn.is_some(),
        percentile: learn.map(|l| l.percentile),
        min_samples: learn.map(|l| l.min_samples),
        keys_max: tollgate_core::gate::MAX_LEARNED_KEYS,
        keys_evicted,
        entries,
    }
}

#[derive(Serialize)]
struct AdminView {
    api: &'static str,
    address: Option<String>,
}

#[derive(Serialize)]
struct RuleView {
    id: String,
    description: Option<String>,
    owner: Option<String>,
    enforcement: &'static str,
    /// What happens once the limit is reached: `deny`, `downgrade` or
    /// `approval`.
    on_exceed: &'static str,
    unit: String,
    window: String,
    limit: String,
    alerts: Vec<u32>,
    per: Vec<String>,
    /// Each condition as `attribute`: patterns.
    #[serde(rename = "match")]
    conditions: BTreeMap<String, Vec<String>>,
    file: String,
}

impl RuleView {
    fn of(r: &Rule, _policy: &CompiledPolicy) -> RuleView {
        RuleView {
            id: r.id.clone(),
            description: r.description.clone(),
            owner: r.owner.clone(),
            enforcement: enforcement(&r.enforcement),
            on_exceed: match r.on_exceed {
                OnExceed::Deny => "deny",
                OnExceed::Downgrade(_) => "downgrade",
                OnExceed::Approval => "approval",
            },
            unit: r.limit.unit.name().to_string(),
            window: r.limit.window.to_string(),
            limit: r.limit.amount.normalize().to_string(),
            alerts: r.alerts.clone(),
            per: r.per.iter().map(|a| a.to_string()).collect(),
            conditions: r
                .conditions
                .iter()
                .map(|c| {
                    (
                        c.attr.to_string(),
                        c.patterns.iter().map(|p| p.to_string()).collect(),
                    )
                })
                .collect(),
            file: r.origin.to_string(),
        }
    }
}

fn enforcement(e: &Enforcement) -> &'static str {
    match e {
        Enforcement::Hard => "hard",
        Enforcement::Soft => "soft",
        Enforcement::Approval => "approval",
    }
}

/// One rule and scope: where it stands and where it is heading. Rates are
/// per hour, in the rule's unit.
#[derive(Serialize)]
struct Budget {
    rule: String,
    scope: String,
    /// The scope's attributes, `name: value`.
    attributes: BTreeMap<String, String>,
    unit: String,
    window: String,
    used: String,
    /// Held unspent in replicas' leases (Redis); absent when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    leased: Option<String>,
    limit: String,
    remaining: String,
    percent: Option<f64>,
    window_start: Option<String>,
    resets_at: Option<String>,
    resets_at_ms: Option<Millis>,
    enforced: bool,
    enforcement: &'static str,
    owner: Option<String>,
    description: Option<String>,
    alerts: Vec<u32>,
    /// The highest alert threshold reached.
    alert_level: Option<u32>,
    rate_window: Option<f64>,
    rate_last_hour: Option<f64>,
    forecast: Forecast,
    #[serde(skip)]
    used_f: f64,
    #[serde(skip)]
    limit_f: f64,
    #[serde(skip)]
    now: Millis,
}

#[derive(Serialize, Default)]
struct Forecast {
    /// `runs_out` (at `at`), `not_this_window`, `exhausted`, `idle`
    /// (nothing used yet) or `unknown` (a lifetime budget with no
    /// last-hour rate).
    state: &'static str,
    at: Option<String>,
    at_ms: Option<Millis>,
    /// Which rate it is made from: `last_hour` or `window`.
    basis: Option<&'static str>,
}

impl Budget {
    fn of(policy: &CompiledPolicy, c: &CounterReport, now: Millis) -> Budget {
        let rule = policy.rule_index(&c.rule).map(|i| &policy.rules()[i]);
        let used_f = c.used.to_f64().unwrap_or(0.0);
        let limit_f = c.limit.to_f64().unwrap_or(0.0);
        let percent = (!c.limit.is_zero())
            .then(|| (c.used * Decimal::from(100) / c.limit).to_f64())
            .flatten()
            .map(|p| (p * 10.0).round() / 10.0);
        let start = window_start(&c.window, now, c.resets_at);
        let rate_window = start
            .filter(|s| now > *s)
            .map(|s| used_f / ((now - s) as f64 / HOUR as f64));
        let alerts = rule.map(|r| r.alerts.clone()).unwrap_or_default();
        let alert_level =
            percent.and_then(|p| alerts.iter().rev().find(|t| p >= f64::from(**t)).copied());
        let attributes = c
            .scope
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut b = Budget {
            rule: c.rule.clone(),
            scope: c.scope.clone(),
            attributes,
            unit: c.unit.name().to_string(),
            window: c.window.to_string(),
            used: c.used.normalize().to_string(),
            leased: (!c.leased.is_zero()).then(|| c.leased.normalize().to_string()),
            limit: c.limit.normalize().to_string(),
            remaining: c.remaining.normalize().to_string(),
            percent,
            window_start: start.map(format_utc),
            resets_at: c.resets_at.map(format_utc),
            resets_at_ms: c.resets_at,
            enforced: c.enforced,
            enforcement: rule.map(|r| enforcement(&r.enforcement)).unwrap_or("hard"),
            owner: rule.and_then(|r| r.owner.clone()),
            description: rule.and_then(|r| r.description.clone()),
            alerts,
            alert_level,
            rate_window,
            rate_last_hour: None,
            forecast: Forecast::default(),
            used_f,
            limit_f,
            now,
        };
        b.forecast = b.forecast();
        b
    }

    /// When the budget runs out at the last hour's rate, when known, else
    /// at the window's rate so far.
    fn forecast(&self) -> Forecast {
        let (rate, basis) = match (self.rate_last_hour, self.rate_window) {
            (Some(r), _) => (Some(r), "last_hour"),
            (None, r) => (r, "window"),
        };
        let state = |state| Forecast {
            state,
            basis: rate.map(|_| basis),
            ..Forecast::default()
        };
        if self.limit_f <= 0.0 || self.used_f >= self.limit_f {
            return state("exhausted");
        }
        if self.used_f <= 0.0 && rate.is_none() {
            return state("idle");
        }
        let Some(rate) = rate.filter(|r| *r > 0.0) else {
            return match self.resets_at_ms {
                Some(_) => state("not_this_window"),
                None => state(if self.used_f > 0.0 { "unknown" } else { "idle" }),
            };
        };
        let hours = (self.limit_f - self.used_f) / rate;
        let at = self
            .now
            .saturating_add((hours * HOUR as f64).min(1e15) as Millis);
        if self.resets_at_ms.is_some_and(|r| at >= r) {
            return state("not_this_window");
        }
        Forecast {
            state: "runs_out",
            at: Some(format_utc(at)),
            at_ms: Some(at),
            basis: Some(basis),
        }
    }
}

/// When the counter's window began: a calendar window's start, or a
/// rolling one's end less its length; a lifetime has none.
fn window_start(window: &Window, now: Millis, resets_at: Option<Millis>) -> Option<Millis> {
    match window {
        Window::Lifetime => None,
        Window::Rolling(secs) => resets_at.map(|r| r - (*secs as Millis) * 1000),
        other => span(*other, now).start,
    }
}

/// The last hour's samples of the busiest scopes.
#[derive(Debug, Default)]
struct Rates {
    samples: HashMap<(String, String), VecDeque<(Millis, f64)>>,
}

impl Rates {
    /// Samples the [`TOP_N`] busiest budgets (by their window's rate, as a
    /// share of their limit), forgets the rest, and fills in the last-hour
    /// rate and forecast of those with samples enough.
    fn sample(&mut self, budgets: &mut [Budget], now: Millis) {
        let mut order: Vec<usize> = (0..budgets.len())
            .filter(|i| budgets[*i].used_f > 0.0)
            .collect();
        // A lifetime budget has no window rate: it ranks last.
        let busy = |b: &Budget| b.rate_window.unwrap_or(0.0) / b.limit_f.max(f64::MIN_POSITIVE);
        order.sort_by(|a, b| busy(&budgets[*b]).total_cmp(&busy(&budgets[*a])));
        order.truncate(TOP_N);
        let keep: HashSet<(String, String)> = order
            .iter()
            .map(|i| (budgets[*i].rule.clone(), budgets[*i].scope.clone()))
            .collect();
        self.samples.retain(|k, _| keep.contains(k));
        for i in order {
            let b = &mut budgets[i];
            let s = self
                .samples
                .entry((b.rule.clone(), b.scope.clone()))
                .or_default();
            // A window that reset starts the samples over.
            if s.back().is_some_and(|(_, used)| *used > b.used_f) {
                s.clear();
            }
            if s.back().is_none_or(|(t, _)| now - t >= SAMPLE_EVERY) {
                s.push_back((now, b.used_f));
            }
            while s.len() > MAX_SAMPLES || s.front().is_some_and(|(t, _)| now - t > HOUR) {
                s.pop_front();
            }
            if let Some((t0, u0)) = s.front() {
                if now - t0 >= SAMPLE_EVERY {
                    b.rate_last_hour = Some((b.used_f - u0) / ((now - t0) as f64 / HOUR as f64));
                    b.forecast = b.forecast();
                }
            }
        }
    }
}

#[derive(Serialize)]
struct Denials {
    recent: Vec<DenialView>,
    history: History,
}

#[derive(Serialize)]
struct DenialView {
    at: String,
    at_ms: Millis,
    rule: String,
    scope: String,
    reason: String,
    retry_after: Option<u64>,
    key: Option<String>,
    model: Option<String>,
}

impl DenialView {
    fn of(d: &DenialRecord) -> DenialView {
        DenialView {
            at: format_utc(d.at),
            at_ms: d.at,
            rule: d.rule.clone(),
            scope: d.scope.clone(),
            reason: d.reason.clone(),
            retry_after: d.retry_after,
            key: d.key.clone(),
            model: d.model.clone(),
        }
    }
}

#[derive(Serialize)]
struct History {
    bucket_seconds: u32,
    /// The start of the first bucket.
    since: String,
    since_ms: Millis,
    series: Vec<Series>,
}

#[derive(Serialize)]
struct Series {
    rule: String,
    reason: String,
    total: u64,
    counts: Vec<u64>,
}

/// Hourly counts by rule and reason over the last [`HISTORY_HOURS`],
/// summed over every replica's minutes; the [`HISTORY_SERIES`] largest,
/// the rest as rule `other`.
fn history(records: &[CountsRecord], now: Millis) -> History {
    let this_hour = now - now.rem_euclid(HOUR);
    let since = this_hour - (HISTORY_HOURS as Millis - 1) * HOUR;
    let mut by: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.at >= since && r.at <= now) {
        let i = ((r.at - since) / HOUR) as usize;
        for (rule, reason, n) in &r.counts {
            let counts = by
                .entry((rule.clone(), reason.clone()))
                .or_insert_with(|| vec![0; HISTORY_HOURS]);
            if let Some(c) = counts.get_mut(i) {
                *c += n;
            }
        }
    }
    let mut series: Vec<Series> = by
        .into_iter()
        .map(|((rule, reason), counts)| Series {
            total: counts.iter().sum(),
            rule,
            reason,
            counts,
        })
        .collect();
    series.sort_by_key(|s| std::cmp::Reverse(s.total));
    if series.len() > HISTORY_SERIES {
        let rest = series.split_off(HISTORY_SERIES - 1);
        let mut other = Series {
            rule: "other".to_string(),
            reason: "other".to_string(),
            total: 0,
            counts: vec![0; HISTORY_HOURS],
        };
        for s in rest {
            other.total += s.total;
            for (o, c) in other.counts.iter_mut().zip(s.counts) {
                *o += c;
            }
        }
        series.push(other);
    }
    History {
        bucket_seconds: HOUR as u32 / 1000,
        since: format_utc(since),
        since_ms: since,
        series,
    }
}

#[derive(Serialize)]
struct AlertView {
    at: String,
    at_ms: Millis,
    rule: String,
    scope: String,
    threshold: u32,
    unit: String,
    used: String,
    limit: String,
    owner: Option<String>,
}

impl AlertView {
    fn of(a: &AlertRecord) -> AlertView {
        AlertView {
            at: format_utc(a.at),
            at_ms: a.at,
            rule: a.rule.clone(),
            scope: a.scope.clone(),
            threshold: a.threshold,
            unit: a.unit.clone(),
            used: a.used.clone(),
            limit: a.limit.clone(),
            owner: a.owner.clone(),
        }
    }
}

#[derive(Serialize)]
struct Approvals {
    grants: Vec<serde_json::Value>,
    pending: Vec<Pending>,
}

/// A scope recently denied for want of an approval, with no grant in force.
#[derive(Serialize)]
struct Pending {
    rule: String,
    scope: String,
    owner: Option<String>,
    description: Option<String>,
    /// A cap that asks for approval once reached takes an extra amount,
    /// in `unit`; a rule enforced by approval alone does not.
    extra_required: bool,
    unit: String,
    denials: usize,
    last_denied_at: String,
    last_denied_at_ms: Millis,
}

fn pending_asks(
    policy: &CompiledPolicy,
    recent: &[DenialRecord],
    granted: &HashSet<(&str, &str)>,
) -> Vec<Pending> {
    let mut out: Vec<Pending> = Vec::new();
    let since = recent.first().map_or(0, |d| d.at) - PENDING_FOR;
    for d in recent
        .iter()
        .filter(|d| d.reason == "approval_required" && d.at >= since)
    {
        // A denial older than the grant's start is no ask any more.
        if granted.contains(&(d.rule.as_str(), d.scope.as_str())) {
            continue;
        }
        if let Some(p) = out
            .iter_mut()
            .find(|p| p.rule == d.rule && p.scope == d.scope)
        {
            p.denials += 1;
            continue;
        }
        let rule = policy.rule_index(&d.rule).map(|i| &policy.rules()[i]);
        out.push(Pending {
            rule: d.rule.clone(),
            scope: d.scope.clone(),
            owner: rule.and_then(|r| r.owner.clone()),
            description: rule.and_then(|r| r.description.clone()),
            extra_required: rule.is_some_and(|r| {
                r.on_exceed == OnExceed::Approval && r.enforcement != Enforcement::Approval
            }),
            unit: rule
                .map(|r| r.limit.unit.name().to_string())
                .unwrap_or_default(),
            denials: 1,
            last_denied_at: format_utc(d.at),
            last_denied_at_ms: d.at,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(
        used: f64,
        limit: f64,
        now: Millis,
        resets: Option<Millis>,
        rate: Option<f64>,
    ) -> Budget {
        Budget {
            rule: "r".to_string(),
            scope: format!("team={}", rate.unwrap_or(used)),
            attributes: BTreeMap::new(),
            unit: "requests".to_string(),
            window: "daily".to_string(),
            used: used.to_string(),
            limit: limit.to_string(),
            leased: None,
            remaining: (limit - used).to_string(),
            percent: None,
            window_start: None,
            resets_at: None,
            resets_at_ms: resets,
            enforced: true,
            enforcement: "hard",
            owner: None,
            description: None,
            alerts: vec![],
            alert_level: None,
            rate_window: rate,
            rate_last_hour: None,
            forecast: Forecast::default(),
            used_f: used,
            limit_f: limit,
            now,
        }
    }

    #[test]
    fn the_forecast_says_when_a_budget_runs_out_or_that_the_window_resets_first() {
        let now = 10 * HOUR;
        // 50 left at 10 an hour: five hours, before the reset in ten.
        let f = budget(50.0, 100.0, now, Some(now + 10 * HOUR), Some(10.0)).forecast();
        assert_eq!(
            (f.state, f.at_ms, f.basis),
            ("runs_out", Some(now + 5 * HOUR), Some("window"))
        );
        // The same with the reset in two hours.
        let f = budget(50.0, 100.0, now, Some(now + 2 * HOUR), Some(10.0)).forecast();
        assert_eq!(f.state, "not_this_window");
        assert_eq!(
            budget(100.0, 100.0, now, None, Some(1.0)).forecast().state,
            "exhausted"
        );
        assert_eq!(
            budget(0.0, 100.0, now, Some(now + HOUR), None)
                .forecast()
                .state,
            "idle"
        );
        assert_eq!(
            budget(5.0, 100.0, now, None, None).forecast().state,
            "unknown"
        );
    }

    #[test]
    fn the_last_hour_is_sampled_for_the_busiest_scopes_only() {
        let mut rates = Rates::default();
        let now = 100 * HOUR;
        let mut budgets: Vec<Budget> = (1..=(TOP_N as u32 + 30))
            .map(|i| {
                budget(
                    f64::from(i),
                    1000.0,
                    now,
                    Some(now + 10 * HOUR),
                    Some(f64::from(i)),
                )
            })
            .collect();
        rates.sample(&mut budgets, now);
        assert_eq!(rates.samples.len(), TOP_N);
        // The busiest kept: the largest rates.
        assert!(rates.samples.keys().all(|(_, s)| s != "team=1"));
        // A minute later each followed scope used 60 more: 3600 an hour.
        let later = now + 60_000;
        let mut budgets: Vec<Budget> = (1..=(TOP_N as u32 + 30))
            .map(|i| {
                budget(
                    f64::from(i) + 60.0,
                    1000.0,
                    later,
                    Some(later + 10 * HOUR),
                    Some(f64::from(i)),
                )
            })
            .collect();
        rates.sample(&mut budgets, later);
        let followed: Vec<&Budget> = budgets
            .iter()
            .filter(|b| b.rate_last_hour.is_some())
            .collect();
        assert_eq!(followed.len(), TOP_N);
        for b in followed {
            assert!((b.rate_last_hour.unwrap() - 3600.0).abs() < 1e-6);
            assert_eq!(b.forecast.basis, Some("last_hour"));
        }
        assert!(rates.samples.values().all(|s| s.len() <= MAX_SAMPLES));
    }

    #[test]
    fn the_history_sums_minutes_into_hours_and_folds_the_small_series() {
        let now = 500 * HOUR + 30 * 60_000;
        let mut records = vec![
            CountsRecord {
                at: now - 60_000,
                counts: vec![("a".into(), "budget_exceeded".into(), 2)],
            },
            CountsRecord {
                at: now - 2 * 60_000,
                counts: vec![("a".into(), "budget_exceeded".into(), 3)],
            },
            CountsRecord {
                at: now - 5 * HOUR,
                counts: vec![("b".into(), "blocked".into(), 1)],
            },
            // Too old to show.
            CountsRecord {
                at: now - 100 * HOUR,
                counts: vec![("c".into(), "blocked".into(), 9)],
            },
        ];
        for i in 0..20 {
            records.push(CountsRecord {
                at: now - HOUR,
                counts: vec![(format!("x{i}"), "blocked".into(), 1)],
            });
        }
        let h = history(&records, now);
        assert_eq!(h.series.len(), HISTORY_SERIES);
        assert_eq!(h.series[0].rule, "a");
        assert_eq!(h.series[0].counts[HISTORY_HOURS - 1], 5);
        assert_eq!(h.series.last().unwrap().rule, "other");
        let total: u64 = h.series.iter().map(|s| s.total).sum();
        assert_eq!(total, 5 + 1 + 20);
        assert!(h.series.iter().all(|s| s.counts.len() == HISTORY_HOURS));
    }
}
