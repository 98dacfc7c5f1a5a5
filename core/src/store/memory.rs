//! The embedded store: counters in this process, for a single instance.
//!
//! One mutex guards everything, which makes every reserve trivially
//! all-or-nothing; it is held for microseconds and never across an await.
//! Memory stays bounded: counters and reservations are swept once their
//! window or lifetime is over, and the number of live counters is capped.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use super::*;

/// How often expired entries are swept, in store time.
const SWEEP_EVERY: Millis = 1_000;
pub const DEFAULT_MAX_COUNTERS: usize = 1_000_000;
/// Entries kept per append-only log; older ones are dropped first. The
/// embedded store serves one instance, whose logs also go to its log
/// output, so this is a convenience window, not the record.
pub const MAX_LOG_ENTRIES: usize = 10_000;

#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    max_counters: usize,
}

#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct Inner {
    counters: HashMap<String, Counter>,
    reservations: HashMap<String, Reservation>,
    replays: HashMap<String, (ReserveOutcome, Millis)>,
    grants: HashMap<String, Grant>,
    logs: HashMap<String, VecDeque<String>>,
    /// Reservations holding concurrency slots, by when they lapse: a slot
    /// stops counting at that moment exactly, as in Redis, not at the next
    /// sweep.
    lapses: BTreeSet<(Millis, String)>,
    /// Alert markers set: who set each, and when it may go.
    fired: HashMap<String, (String, Option<Millis>)>,
    /// The spend account, by day.
    #[serde(default)]
    spend: BTreeMap<spend::Day, SpendAccountDay>,
    /// The last spend batches added, so that one sent twice adds once.
    #[serde(default)]
    spend_batches: VecDeque<String>,
    next_sweep: Millis,
}

/// One day of the spend account: rows by their dimensions' text form.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct SpendAccountDay {
    /// Settled, then estimated.
    rows: HashMap<String, (SpendEntry, SpendEntry)>,
    /// Rows folded into `other`, counted up to a bound.
    folded: HashSet<String>,
}

/// Folded rows counted exactly up to here; past it the count stays put.
const MAX_FOLDED_COUNTED: usize = 100_000;

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Counter {
    value: i64,
    expires_at: Option<Millis>,
}

impl Counter {
    fn live(&self, now: Millis) -> bool {
        self.expires_at.is_none_or(|t| t > now)
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new(DEFAULT_MAX_COUNTERS)
    }
}

impl MemoryStore {
    pub fn new(max_counters: usize) -> MemoryStore {
        MemoryStore {
            inner: Mutex::new(Inner::default()),
            max_counters,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing under this lock can panic halfway through an update, so
        // a poisoned lock still guards consistent data.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Live counters right now; for tests and metrics.
    pub fn counter_count(&self) -> usize {
        self.lock().counters.len()
    }
}

impl Inner {
    fn state(&self, op: &CounterOp, now: Millis) -> CounterState {
        let grant = op.grant.as_ref().and_then(|g| {
            self.grants
                .get(&g.key)
                .filter(|g| g.active(now))
                .map(|g| g.extra)
        });
        match self.counters.get(&op.key).filter(|c| c.live(now)) {
            Some(c) => CounterState {
                used_before: c.value,
                resets_at: match op.expiry {
                    Expiry::AfterFirstUse(_) => c.expires_at,
                    _ => None,
                },
                grant,
                leased: 0,
            },
            None => CounterState {
                used_before: 0,
                resets_at: match op.expiry {
                    Expiry::AfterFirstUse(d) => Some(now + d),
                    _ => None,
                },
                grant,
                leased: 0,
            },
        }
    }

    /// Gives back the slots of every unsettled reservation that lapsed at
    /// or before `now` (a slot lasting to `t` counts while `t > now`); the
    /// estimate stays charged. Costs only the reservations that lapsed.
    fn lapse(&mut self, now: Millis) {
        while self.lapses.first().is_some_and(|(at, _)| *at <= now) {
            let Some((at, id)) = self.lapses.pop_first() else {
                break;
            };
            let gauges: Vec<(String, i64)> = match self.reservations.get(&id) {
                Some(r) if !r.settled && r.expires_at == at => r
                    .ops
                    .iter()
                    .filter(|op| op.kind == CounterKind::Gauge)
                    .map(|op| (op.key.clone(), op.amount))
                    .collect(),
                _ => continue,
            };
            for (key, amount) in gauges {
                self.add(&key, -amount, now);
            }
        }
    }

    fn sweep(&mut self, now: Millis) {
        self.lapse(now);
        self.counters.retain(|_, c| c.live(now));
        // Their slots were given back by `lapse`.
        self.reservations.retain(|_, r| r.expires_at > now);
        self.replays.retain(|_, (_, until)| *until > now);
        self.grants.retain(|_, g| g.active(now));
        self.fired
            .retain(|_, (_, until)| until.is_none_or(|t| t > now));
        self.next_sweep = now + SWEEP_EVERY;
    }

    /// Adds to a live counter, never taking it below zero.
    fn add(&mut self, key: &str, delta: i64, now: Millis) {
        if let Some(c) = self.counters.get_mut(key).filter(|c| c.live(now)) {
            c.value = c.value.saturating_add(delta).max(0);
        }
    }

    /// Replaces each reserved amount with `actual[i]` (0 past its end) and
    /// frees the reservation's slots, once.
    fn settle(&mut self, id: &str, actual: &[i64], now: Millis) -> SettleOutcome {
        self.lapse(now);
        if now >= self.next_sweep {
            self.sweep(now);
        }
        let Some(r) = self.reservations.get(id).filter(|r| r.expires_at > now) else {
            return SettleOutcome::Unknown;
        };
        if r.settled {
            return SettleOutcome::AlreadySettled;
        }
        let deltas: Vec<(String, i64)> = r
            .ops
            .iter()
            .zip(actual.iter().copied().chain(std::iter::repeat(0)))
            .map(|(op, actual)| {
                let actual = if op.kind == CounterKind::Gauge {
                    0
                } else {
                    actual
                };
                (op.key.clone(), actual - op.amount)
            })
            .collect();
        for (key, delta) in deltas {
            self.add(&key, delta, now);
        }
        if let Some(r) = self.reservations.get_mut(id) {
            r.settled = true;
            r.expires_at = r.expires_at.min(now + SETTLED_RETENTION);
        }
        SettleOutcome::Settled
    }

    fn new_keys(&self, ops: &[CounterOp], now: Millis) -> usize {
        ops.iter()
            .filter(|op| !self.counters.get(&op.key).is_some_and(|c| c.live(now)))
            .count()
    }
}

#[async_trait]
impl CounterStore for MemoryStore {
    async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveOutcome, StoreError> {
        let now = req.now;
        let mut inner = self.lock();
        inner.lapse(now);
        if now >= inner.next_sweep {
            inner.sweep(now);
        }
        if let Some(rid) = &req.request_id {
            if let Some((outcome, until)) = inner.replays.get(rid) {
                if *until > now {
                    return Ok(ReserveOutcome {
                        replayed: true,
                        ..outcome.clone()
                    });
                }
            }
        }

        let mut tried = Vec::new();
        let mut applied = None;
        for (i, candidate) in req.candidates.iter().enumerate() {
            let states: Vec<CounterState> = candidate
                .ops
                .iter()
                .map(|op| inner.state(op, now))
                .collect();
            let verdict = fit(&candidate.ops, |j| states[j]);
            tried.push(states);
            match verdict {
                Fit::Fits => {
                    applied = Some(i);
                    break;
                }
                Fit::TryNext => continue,
                Fit::Blocked => break,
            }
        }

        if let Some(i) = applied {
            let candidate = &req.candidates[i];
            let new_keys = inner.new_keys(&candidate.ops, now);
            if inner.counters.len() + new_keys > self.max_counters {
                inner.sweep(now);
                if inner.counters.len() + new_keys > self.max_counters {
                    return Err(StoreError::Full(self.max_counters));
                }
            }
            for op in &candidate.ops {
                // The key is copied only for a counter seen for the first
                // time: most decisions add to counters that exist.
                if !inner.counters.contains_key(&op.key) {
                    inner.counters.insert(
                        op.key.clone(),
                        Counter {
                            value: 0,
                            expires_at: Some(now),
                        },
                    );
                }
                let Some(counter) = inner.counters.get_mut(&op.key) else {
                    continue;
                };
                if !counter.live(now) {
                    *counter = Counter {
                        value: 0,
                        expires_at: match op.expiry {
                            Expiry::At(t) => Some(t),
                            Expiry::AfterFirstUse(d) => Some(now + d),
                            Expiry::Never => None,
                        },
                    };
                }
                counter.value = counter.value.saturating_add(op.amount);
            }
            let expires_at = now + req.reservation_ttl;
            if candidate.ops.iter().any(|op| op.kind == CounterKind::Gauge) {
                inner
                    .lapses
                    .insert((expires_at, req.reservation_id.clone()));
            }
            inner.reservations.insert(
                req.reservation_id.clone(),
                Reservation::of(candidate, expires_at, req.account.clone()),
            );
        }

        let outcome = ReserveOutcome {
            applied,
            tried,
            reservation_id: applied.map(|_| req.reservation_id.clone()),
            replayed: false,
        };
        if let Some(rid) = &req.request_id {
            inner
                .replays
                .insert(rid.clone(), (outcome.clone(), now + req.replay_window()));
        }
        Ok(outcome)
    }

    async fn reservation(&self, id: &str, now: Millis) -> Result<Option<Reservation>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .reservations
            .get(id)
            .filter(|r| r.expires_at > now)
            .cloned())
    }

    async fn settle(
        &self,
        id: &str,
        actual: &[i64],
        now: Millis,
    ) -> Result<SettleOutcome, StoreError> {
        Ok(self.lock().settle(id, actual, now))
    }

    async fn withdraw(
        &self,
        id: &str,
        request_id: Option<&str>,
        now: Millis,
    ) -> Result<SettleOutcome, StoreError> {
        let mut inner = self.lock();
        let outcome = inner.settle(id, &[], now);
        if let Some(rid) = request_id {
            inner.replays.remove(rid);
        }
        Ok(outcome)
    }

    async fn mark_alerts(
        &self,
        markers: &[AlertMarker],
        now: Millis,
    ) -> Result<Vec<bool>, StoreError> {
        let mut inner = self.lock();
        Ok(markers
            .iter()
            .map(|m| match inner.fired.get(&m.key) {
                Some((token, until)) if until.is_none_or(|t| t > now) => *token == m.token,
                _ => {
                    inner
                        .fired
                        .insert(m.key.clone(), (m.token.clone(), m.expires_at));
                    true
                }
            })
            .collect())
    }

    fn can_stall(&self) -> bool {
        false
    }

    async fn record_spend(
        &self,
        batch: &str,
        deltas: &[SpendDelta],
        bounds: SpendBounds,
        now: Millis,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if !batch.is_empty() {
            if inner.spend_batches.iter().any(|b| b == batch) {
                return Ok(());
            }
            if inner.spend_batches.len() >= 64 {
                inner.spend_batches.pop_front();
            }
            inner.spend_batches.push_back(batch.to_string());
        }
        let oldest = spend::utc_day(now - bounds.retention);
        inner.spend.retain(|day, _| *day >= oldest);
        let other = SpendDims::other().to_text();
        for d in deltas {
            let account = inner.spend.entry(d.day).or_default();
            let mut row = d.dims.to_text();
            if !account.rows.contains_key(&row) && account.rows.len() >= bounds.max_rows_per_day {
                if account.folded.len() < MAX_FOLDED_COUNTED {
                    account.folded.insert(row);
                }
                row = other.clone();
            }
            let (settled, estimated) = account.rows.entry(row).or_default();
            if d.settled { settled } else { estimated }.add(&d.entry);
        }
        Ok(())
    }

    async fn spend(&self, from: spend::Day, to: spend::Day) -> Result<Vec<SpendDay>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .spend
            .range(from..=to)
            .map(|(day, account)| {
                let mut rows: Vec<SpendRow> = account
                    .rows
                    .iter()
                    .filter_map(|(dims, (settled, estimated))| {
                        Some(SpendRow {
                            day: *day,
                            dims: SpendDims::from_text(dims)?,
                            settled: *settled,
                            estimated: *estimated,
                        })
                    })
                    .collect();
                rows.sort_by(|a, b| a.dims.cmp(&b.dims));
                SpendDay {
                    day: *day,
                    rows,
                    folded_rows: account.folded.len() as u64,
                }
            })
            .collect())
    }

    async fn read(
        &self,
        counters: &[CounterRef],
        now: Millis,
    ) -> Result<Vec<CounterState>, StoreError> {
        let mut inner = self.lock();
        inner.lapse(now);
        Ok(counters
            .iter()
            .map(
                |c| match inner.counters.get(&c.key).filter(|c| c.live(now)) {
                    Some(c) => CounterState {
                        used_before: c.value,
                        resets_at: c.expires_at,
                        grant: None,
                        leased: 0,
                    },
                    None => CounterState::default(),
                },
            )
            .collect())
    }

    async fn put_grant(&self, grant: &Grant, _now: Millis) -> Result<(), StoreError> {
        self.lock().grants.insert(grant.key.clone(), grant.clone());
        Ok(())
    }

    async fn remove_grant(&self, key: &str, now: Millis) -> Result<Option<Grant>, StoreError> {
        Ok(self.lock().grants.remove(key).filter(|g| g.active(now)))
    }

    async fn grants(&self, now: Millis) -> Result<Vec<Grant>, StoreError> {
        let mut grants: Vec<Grant> = self
            .lock()
            .grants
            .values()
            .filter(|g| g.active(now))
            .cloned()
            .collect();
        grants.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(grants)
    }

    async fn append(&self, log: &str, entry: &str) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let entries = inner.logs.entry(log.to_string()).or_default();
        if entries.len() >= MAX_LOG_ENTRIES {
            entries.pop_front();
        }
        entries.push_back(entry.to_string());
        Ok(())
    }

    async fn entries(&self, log: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        let inner = self.lock();
        let Some(entries) = inner.logs.get(log) else {
            return Ok(Vec::new());
        };
        Ok(entries
            .iter()
            .skip(entries.len().saturating_sub(limit))
            .cloned()
            .collect())
    }
}

/// The whole state of a [`MemoryStore`] at one moment, for the durable
/// store's snapshots (`store::durable`): every counter, reservation,
/// request id, grant, log entry and alert marker, and when the next sweep
/// is due, so that calls replayed on it are answered as they were.
#[derive(Debug, Clone)]
pub struct MemoryImage(Inner);

impl MemoryImage {
    pub fn to_json(&self) -> Result<Vec<u8>, String> {
        serde_json::to_vec(&self.0).map_err(|e| e.to_string())
    }

    pub fn from_json(bytes: &[u8]) -> Result<MemoryImage, String> {
        serde_json::from_slice(bytes)
            .map(MemoryImage)
            .map_err(|e| e.to_string())
    }
}

impl MemoryStore {
    /// A copy of the state as it stands, taken under the store's lock.
    pub fn export(&self) -> MemoryImage {
        MemoryImage(self.lock().clone())
    }

    /// A store that starts from `image`.
    pub fn from_image(max_counters: usize, image: MemoryImage) -> MemoryStore {
        MemoryStore {
            inner: Mutex::new(image.0),
            max_counters,
        }
    }
}
