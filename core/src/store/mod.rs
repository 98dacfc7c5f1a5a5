//! Counter storage behind one trait.
//!
//! The engine turns a request into a [`ReserveRequest`]: one or more
//! *candidates* (the request as asked, then each downgrade), each a list of
//! counter operations. A store applies the first candidate that fits, all of
//! its operations or none, in one atomic step; for Redis that is a single
//! script, so a decision costs one round trip whatever the number of rules.

pub mod durable;
pub mod lease;
pub mod memory;
pub mod redis;
pub mod spend;

use std::fmt;

use async_trait::async_trait;

use crate::clock::Millis;
use crate::policy::Unit;

pub use lease::LeaseConfig;
pub use memory::MemoryStore;
pub use redis::{LeaseStats, LeasedStore, LogBounds, RedisConfig, RedisStore};
pub use spend::{DayCalendar, SpendBounds, SpendDay, SpendDelta, SpendDims, SpendEntry, SpendRow};

/// A counter to read for a usage report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterRef {
    pub key: String,
    pub kind: CounterKind,
}

/// How a counter counts. The engine sets it once, from the rule; each
/// store keeps every kind in its own way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum CounterKind {
    /// A total, in a calendar window or for ever.
    Plain,
    /// A total in a window that starts at the counter's first use.
    Rolling,
    /// Requests in flight (a concurrency limit): each reservation holds
    /// one slot, given back on settle or when the reservation lapses.
    Gauge,
}

impl CounterKind {
    pub const ALL: [CounterKind; 3] =
        [CounterKind::Plain, CounterKind::Rolling, CounterKind::Gauge];
}

/// When a counter resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// At a known moment (the end of a calendar window).
    At(Millis),
    /// This long after the counter is first created (a rolling window).
    AfterFirstUse(Millis),
    /// Never (lifetime totals and concurrency gauges).
    Never,
}

/// One counter a candidate adds to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterOp {
    /// Rule id, unit, scope hash and window id; never a raw value.
    pub key: String,
    pub unit: Unit,
    pub amount: i64,
    pub limit: i64,
    /// Whether exceeding `limit` blocks the candidate (hard rules) or only
    /// gets counted (soft rules).
    pub enforced: bool,
    /// A blocked enforced op with this flag lets the store try the next
    /// candidate; without it the whole request is denied.
    pub downgradable: bool,
    pub expiry: Expiry,
    pub kind: CounterKind,
    /// The approval grant that can open or extend this counter.
    pub grant: Option<GrantRef>,
    /// Counter values at which one of the rule's alert thresholds is
    /// reached, lowest first. A store that leases budget never leases a
    /// counter up to one of them, so that each crossing is decided by the
    /// store, one decision at a time, and judged on the counter as it
    /// stands there.
    pub alert_at: Vec<i64>,
}

/// Where a counter looks for an approval grant, read in the same atomic
/// step as the counter so that a grant made on one replica applies on all
/// of them at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRef {
    /// `rule|scope-hash`: one grant per rule and scope, whatever the window.
    pub key: String,
    /// Without an active grant the op blocks (an `approval` gate); with one
    /// it counts against its limit plus the grant's extra.
    pub required: bool,
}

impl CounterOp {
    /// Whether adding this op to a counter in `state` breaks an enforced
    /// limit: a required grant is missing, or the amount does not fit under
    /// the limit plus any granted extra.
    pub fn blocks_at(&self, state: &CounterState) -> bool {
        if !self.enforced {
            return false;
        }
        if self.grant.as_ref().is_some_and(|g| g.required) && state.grant.is_none() {
            return true;
        }
        state.used_before.saturating_add(self.amount) > self.effective_limit(state)
    }

    /// The limit plus the extra of an active grant.
    pub fn effective_limit(&self, state: &CounterState) -> i64 {
        self.limit.saturating_add(state.grant.unwrap_or(0).max(0))
    }
}

/// Whether a candidate fits the counters as they stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    Fits,
    /// Blocked only by ops that allow a downgrade: try the next candidate.
    TryNext,
    /// Blocked by an op that denies outright.
    Blocked,
}

/// The one rule every store applies: `state(i)` is op i's counter now.
pub fn fit(ops: &[CounterOp], state: impl Fn(usize) -> CounterState) -> Fit {
    let mut result = Fit::Fits;
    for (i, op) in ops.iter().enumerate() {
        if op.blocks_at(&state(i)) {
            if !op.downgradable {
                return Fit::Blocked;
            }
            result = Fit::TryNext;
        }
    }
    result
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The model this candidate would call; kept on the reservation so that
    /// settle can price the actual usage.
    pub model: Option<String>,
    pub ops: Vec<CounterOp>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveRequest {
    pub now: Millis,
    pub candidates: Vec<Candidate>,
    /// Fresh and unguessable; becomes the reservation's id if one applies.
    pub reservation_id: String,
    /// How long an unsettled reservation lives before its estimate is kept
    /// for good and its concurrency slots are freed.
    pub reservation_ttl: Millis,
    /// A caller's request id: a repeat within the idempotency window gets
    /// the first outcome back and charges nothing more.
    pub request_id: Option<String>,
    /// The spend-account tag, kept on the reservation so that whichever
    /// replica settles it can move its estimate to settled usage. Opaque
    /// to stores; never holds a newline or a tab.
    pub account: Option<String>,
    /// Nothing will settle this reservation (ext_authz alone, `settle:
    /// never`): its estimate is the charge. A store need keep its record
    /// only for taking back a decision that stalled past its caller.
    pub final_estimate: bool,
}

impl ReserveRequest {
    /// How long this request's id is remembered for replays.
    pub fn replay_window(&self) -> Millis {
        match self.final_estimate {
            true => FINAL_REPLAY_WINDOW,
            false => REPLAY_WINDOW,
        }
    }
}

/// A counter as the store saw it, just before this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct CounterState {
    pub used_before: i64,
    /// When the counter resets, if it does.
    pub resets_at: Option<Millis>,
    /// The extra amount of an active grant, when the op names a grant and
    /// one is active (0 for a grant that only opens a gate).
    pub grant: Option<i64>,
    /// In a report: budget counted in the store but held unspent in
    /// replicas' leases, and so not in `used_before`. Always 0 in a
    /// decision's states.
    #[serde(default)]
    pub leased: i64,
}

/// An approval: it opens an `approval` gate for one rule and scope, and may
/// add an extra amount to the rule's limit, until it expires.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Grant {
    pub rule: String,
    /// For people: `team=growth`, or `all`.
    pub scope: String,
    /// What counters are keyed by; see [`GrantRef::key`].
    pub key: String,
    /// The rule's unit when granted, so the extra reads right later.
    pub unit: Unit,
    /// In counter units (micro-USD for spend).
    pub extra: i64,
    pub expires_at: Millis,
    pub approver: String,
    pub reason: String,
    pub created_at: Millis,
}

impl Grant {
    pub fn active(&self, now: Millis) -> bool {
        self.expires_at > now
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReserveOutcome {
    /// The candidate that was applied, if any.
    pub applied: Option<usize>,
    /// For each candidate tried, in order, the state of each of its ops.
    /// The last entry is the applied candidate or the one that blocked last.
    pub tried: Vec<Vec<CounterState>>,
    /// Set when a candidate applied.
    pub reservation_id: Option<String>,
    /// True when this is a repeat of an earlier request id.
    pub replayed: bool,
}

/// A reservation as kept by the store until settled or expired.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reservation {
    pub model: Option<String>,
    pub ops: Vec<ReservedOp>,
    pub settled: bool,
    pub expires_at: Millis,
    /// [`ReserveRequest::account`], as given.
    #[serde(default)]
    pub account: Option<String>,
}

impl Reservation {
    /// The unsettled reservation a store keeps for `candidate` once it
    /// applies.
    pub fn of(candidate: &Candidate, expires_at: Millis, account: Option<String>) -> Reservation {
        Reservation {
            model: candidate.model.clone(),
            ops: candidate
                .ops
                .iter()
                .map(|op| ReservedOp {
                    key: op.key.clone(),
                    unit: op.unit,
                    amount: op.amount,
                    kind: op.kind,
                })
                .collect(),
            settled: false,
            expires_at,
            account,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReservedOp {
    pub key: String,
    pub unit: Unit,
    pub amount: i64,
    pub kind: CounterKind,
}

/// How long a settled reservation is kept, to answer a repeated settle
/// with `AlreadySettled`; after that a settle finds nothing (and charges
/// nothing). The Redis scripts are given it as an argument.
pub const SETTLED_RETENTION: Millis = 60_000;

/// How long a request id is remembered for replays.
pub const REPLAY_WINDOW: Millis = 60_000;

/// How long the request id of a call that nothing will settle is
/// remembered. Its repeat is a caller's retry after a timeout, which comes
/// within seconds, and a proxy's own ids (Envoy's `x-request-id`) never
/// repeat: remembering each for a minute would keep a minute of traffic in
/// the store for nothing.
pub const FINAL_REPLAY_WINDOW: Millis = 5_000;

/// A marker that an alert threshold fired for one counter in one window.
/// Set at most once, atomically, whatever the counter does afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertMarker {
    /// `<counter key>|<threshold>|<window end or ->`: the counter key
    /// names the calendar window; the end tells rolling windows apart.
    pub key: String,
    /// When the marker may go: its window's end plus a grace, or never
    /// for a lifetime counter (whose threshold can fire only once).
    pub expires_at: Option<Millis>,
    /// Who sets it. An attempt whose answer was lost (a timeout) is asked
    /// again with the same token, and learns whether it was the one.
    pub token: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleOutcome {
    Settled,
    AlreadySettled,
    /// Never existed, or expired (its estimate stays charged).
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("counter store unavailable: {0}")]
    Unavailable(String),
    #[error("counter store is full ({0} counters); refusing to grow further")]
    Full(usize),
    #[error("counter store timed out after {0} ms")]
    Timeout(u64),
    /// The store refuses writes because its memory is spent (Redis at
    /// `maxmemory` with `noeviction`): nothing new can be reserved until
    /// keys expire or it is given more memory.
    #[error("counter store is out of memory; refusing writes: {0}")]
    OutOfMemory(String),
}

impl StoreError {
    /// What went wrong, as the store-error metric labels it.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Full(_) | StoreError::OutOfMemory(_) => "full",
            StoreError::Timeout(_) => "timeout",
        }
    }

    /// The stable code of a decision that failed on it.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::Unavailable(_) => "store_unavailable",
            StoreError::Full(_) | StoreError::OutOfMemory(_) => "store_full",
            StoreError::Timeout(_) => "store_timeout",
        }
    }
}

#[async_trait]
pub trait CounterStore: Send + Sync + fmt::Debug + 'static {
    /// Applies the first candidate whose enforced ops all fit, atomically.
    async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveOutcome, StoreError>;

    /// The same decision, made with no I/O when the store can (from
    /// budget it holds in the process); `None` when it has to ask.
    fn reserve_now(&self, _req: &ReserveRequest) -> Option<ReserveOutcome> {
        None
    }

    /// Writes what the store kept back to write in batches and hands back
    /// any budget it holds in the process (at shutdown).
    async fn close(&self, _now: Millis) -> Result<(), StoreError> {
        Ok(())
    }

    /// Looks up a live reservation.
    async fn reservation(&self, id: &str, now: Millis) -> Result<Option<Reservation>, StoreError>;

    /// Replaces each reserved amount with `actual[i]` (same order as the
    /// reservation's ops) and frees concurrency slots, once.
    async fn settle(
        &self,
        id: &str,
        actual: &[i64],
        now: Millis,
    ) -> Result<SettleOutcome, StoreError>;

    /// Takes back a reservation whose decision never reached its caller
    /// (the call outlived the store timeout, or the caller went away): every
    /// counter gives back its amount and its slot, once, and the request id
    /// that made it is forgotten, so that a retry is decided afresh rather
    /// than replayed onto a reservation that no longer counts.
    async fn withdraw(
        &self,
        id: &str,
        request_id: Option<&str>,
        now: Millis,
    ) -> Result<SettleOutcome, StoreError>;

    /// Sets each marker that is not set yet; `true` where the marker is
    /// this token's (set now, or by an earlier attempt with the same
    /// token): its alert fires. `false` where another token holds it.
    async fn mark_alerts(
        &self,
        markers: &[AlertMarker],
        now: Millis,
    ) -> Result<Vec<bool>, StoreError>;

    /// Whether a call can outlive the store timeout (a store across a
    /// network). The gate lets such a call run to its end in the
    /// background, so that what it reserved can be taken back.
    fn can_stall(&self) -> bool {
        true
    }

    /// Adds to the spend account, all of `deltas` or none, once per
    /// `batch` id: a batch sent again after its answer was lost is not
    /// added twice. A row that is new on its day past
    /// `bounds.max_rows_per_day` rows goes into the `other` row instead,
    /// and is counted as folded.
    async fn record_spend(
        &self,
        batch: &str,
        deltas: &[SpendDelta],
        bounds: SpendBounds,
        now: Millis,
    ) -> Result<(), StoreError>;

    /// The account of each day from `from` to `to`, both included.
    async fn spend(&self, from: spend::Day, to: spend::Day) -> Result<Vec<SpendDay>, StoreError>;

    /// Current values of counters, for reporting. Missing counters read 0.
    async fn read(
        &self,
        counters: &[CounterRef],
        now: Millis,
    ) -> Result<Vec<CounterState>, StoreError>;

    /// Records a grant, replacing any earlier one for the same rule and
    /// scope; every later reserve sees it.
    async fn put_grant(&self, grant: &Grant, now: Millis) -> Result<(), StoreError>;

    /// Removes the grant with this key; returns it if it was there.
    async fn remove_grant(&self, key: &str, now: Millis) -> Result<Option<Grant>, StoreError>;

    /// Every grant that has not expired.
    async fn grants(&self, now: Millis) -> Result<Vec<Grant>, StoreError>;

    /// Appends one entry (a JSON object) to the append-only log `log`,
    /// such as the approvals audit trail or the alert feed.
    async fn append(&self, log: &str, entry: &str) -> Result<(), StoreError>;

    /// The last `limit` entries of `log`, oldest first.
    async fn entries(&self, log: &str, limit: usize) -> Result<Vec<String>, StoreError>;
}
