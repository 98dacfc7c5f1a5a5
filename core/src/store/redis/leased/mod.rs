//! Redis with leases: most decisions are made in the process, from budget
//! already counted in Redis on this replica's behalf, with no round trip.
//!
//! Invariants:
//! - Every amount a decision here spends was added to its Redis counter
//!   before (a lease), so the counters, summed over replicas, never pass a
//!   cap: a lease is granted only below the cap, by the same script that
//!   decides. A replica that dies keeps its unused leases counted (at most
//!   one lease per counter), on the side of denying.
//! - A decision that cannot be made from leases goes to Redis as one
//!   reserve, which gives back this replica's unused leases on its
//!   counters and grants new ones in the same call ([`LeaseBook::ask`]).
//! - What a decision here must still tell Redis (its reservation record,
//!   its request id's outcome, a settle its lease cannot absorb, a lease
//!   handed back) is written in batches, every [`FLUSH_EVERY`] ms: that is
//!   how stale another replica's view of them can be.

mod local;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ::redis::Script;
use async_trait::async_trait;

use self::local::{Decided, Local, Pending};
use super::codec::encode_replay;
use super::cross_slot::SlotLeases;
use super::keys::{by_tag, slot_tag};
use super::replays::ReplaySpot;
use super::reserve::{LeaseAsk, OpAsk};
use super::RedisStore;
use crate::store::lease::{leasable, Ask, LeaseBook, LeaseConfig, LONGEST_LIFE};
use crate::store::*;

/// How often batched writes and expired leases go to Redis, in ms.
pub const FLUSH_EVERY: Millis = 20;

/// Leases renewed in one script call, at most: each costs the script a
/// few commands, and one call holds Redis while it runs.
const RENEWALS_PER_CALL: usize = 25;

/// Request ids in one item of `flush.lua`, at most.
const REPLAYS_PER_ITEM: usize = 500;

/// How long a decision refused only for this replica's own lease in flight
/// waits for that lease.
const REFILL_WAIT: Duration = Duration::from_millis(100);

/// What the leasing store counts, for metrics.
#[derive(Debug, Default)]
pub struct LeaseStats {
    /// Decisions made from leases, with no round trip.
    pub hits: AtomicU64,
    /// Decisions that went to Redis.
    pub misses: AtomicU64,
    /// Leases granted by Redis.
    pub refills: AtomicU64,
    /// Of those, granted to a busy lease before it ran out, in the
    /// background: no decision waited for them.
    pub renewals: AtomicU64,
    /// Unused leases handed back.
    pub returns: AtomicU64,
    /// Denials only because other replicas held unused leases.
    pub early_denials: AtomicU64,
    /// Calls made to Redis (decisions, batches, settles, reads).
    pub redis_calls: AtomicU64,
}

impl LeaseStats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A batch whose write failed: its id, the `now` it was taken at, and
/// what it holds. Its reply may only have been lost, so it is sent again
/// as it was, and `flush.lua` applies it once.
#[derive(Debug)]
struct Unsent(String, Millis, Pending);

#[derive(Debug)]
pub struct LeasedStore {
    redis: RedisStore,
    replica: String,
    /// `<replica> <lifetime> <share>`, as `reserve.lua` takes it.
    spec: String,
    book: Mutex<LeaseBook>,
    local: Mutex<Local>,
    /// One batch at a time, so that batches land in order; it holds the
    /// batch whose write failed, sent again, whole and under its id,
    /// before anything newer.
    flushing: tokio::sync::Mutex<Option<Unsent>>,
    /// Numbers this replica's batches.
    batches: AtomicU64,
    stats: Arc<LeaseStats>,
    clock: CallerClock,
    flush: Arc<Script>,
    /// Told whenever a refill's answer has been read into the book.
    refilled: tokio::sync::Notify,
}

/// Time as the callers give it (the store has no clock of its own, like
/// every store): the latest `now` seen, moved on by the time that passed
/// since, so that leases of an idle replica still lapse and go back.
#[derive(Debug)]
struct CallerClock {
    seen: AtomicI64,
    seen_at: AtomicU64,
    start: Instant,
}

impl Default for CallerClock {
    fn default() -> Self {
        CallerClock {
            seen: AtomicI64::new(Millis::MIN),
            seen_at: AtomicU64::new(0),
            start: Instant::now(),
        }
    }
}

impl CallerClock {
    fn saw(&self, now: Millis) {
        if self.seen.fetch_max(now, Ordering::Relaxed) < now {
            self.seen_at
                .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    }

    /// `None` before any caller gave a time.
    fn now(&self) -> Option<Millis> {
        let seen = self.seen.load(Ordering::Relaxed);
        if seen == Millis::MIN {
            return None;
        }
        let since = (self.start.elapsed().as_millis() as u64)
            .saturating_sub(self.seen_at.load(Ordering::Relaxed));
        Some(seen + since as Millis)
    }
}

impl LeasedStore {
    /// Wraps `redis`, and writes batches every [`FLUSH_EVERY`] ms until
    /// the store is dropped. Must be called inside a Tokio runtime.
    pub fn start(redis: RedisStore, config: LeaseConfig) -> Arc<LeasedStore> {
        let replica = replica_id();
        let store = Arc::new(LeasedStore {
            spec: format!(
                "{replica} {} {}",
                config.lifetime * LONGEST_LIFE,
                config.share.max(1)
            ),
            replica,
            redis,
            book: Mutex::new(LeaseBook::new(config)),
            local: Mutex::new(Local::default()),
            flushing: tokio::sync::Mutex::new(None),
            batches: AtomicU64::new(0),
            stats: Arc::new(LeaseStats::default()),
            clock: CallerClock::default(),
            refilled: tokio::sync::Notify::new(),
            flush: Arc::new(Script::new(concat!(
                include_str!("../move_counter.lua"),
                include_str!("flush.lua")
            ))),
        });
        spawn_flusher(Arc::downgrade(&store));
        store
    }

    pub fn stats(&self) -> Arc<LeaseStats> {
        self.stats.clone()
    }

    /// What this replica holds unused on the counters of rule `rule`.
    pub fn unused_on(&self, rule: &str) -> i64 {
        let prefix = format!("{rule}|");
        let book = self.book.lock().unwrap();
        book.outstanding()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v)
            .sum()
    }

    /// Where a reservation made here lives in Redis.
    fn local_id(&self, req: &ReserveRequest, ops: &[CounterOp]) -> String {
        let id = format!("L{}", req.reservation_id);
        if !self.redis.cluster() {
            return id;
        }
        // In the first counter's slot, so that one batch writes the
        // records of many decisions across slots in few calls.
        match ops.first() {
            Some(op) => format!("{id}.{}", slot_tag(&op.key)),
            None => id,
        }
    }

    /// The decision, made from leases, if every counter of the first
    /// candidate has a lease that holds its amount. `at_once`: asked by
    /// [`CounterStore::reserve_now`], so that nothing can stall it and
    /// nothing will take it back (a decision made here inside `reserve`
    /// may be, when it outlives the store timeout or its caller).
    fn decide_here(&self, req: &ReserveRequest, at_once: bool) -> Option<ReserveOutcome> {
        self.clock.saw(req.now);
        let candidate = req.candidates.first()?;
        if let Some(rid) = &req.request_id {
            if let Some(outcome) = self.local.lock().unwrap().replayed(rid, req.now) {
                return Some(outcome);
            }
        }
        let states = self.book.lock().unwrap().spend(&candidate.ops, req.now)?;
        let id = self.local_id(req, &candidate.ops);
        let outcome = ReserveOutcome {
            applied: Some(0),
            tried: vec![states],
            reservation_id: Some(id.clone()),
            replayed: false,
        };
        let replay = req.request_id.as_ref().map(|rid| {
            let until = req.now + req.replay_window();
            (
                rid.clone(),
                self.redis
                    .replay_spot(&self.redis.replay_tag(req), rid, req.replay_window()),
                encode_replay(until, &outcome),
                until,
            )
        });
        LeaseStats::add(&self.stats.hits, 1);
        if req.final_estimate && at_once {
            // Nothing settles it, and decided at once it never stalled,
            // so nothing takes it back: it needs no record, only its
            // request id's outcome for a repeat on another replica.
            if let Some(replay) = replay {
                let ops = candidate
                    .ops
                    .iter()
                    .map(|op| (op.key.clone(), op.amount))
                    .collect();
                self.local
                    .lock()
                    .unwrap()
                    .answered(replay, ops, outcome.clone());
            }
            return Some(outcome);
        }
        // A final estimate decided here after a wait (its caller may have
        // gone, and the gate then takes it back) is kept here until it
        // lapses, for that alone: nothing else settles it, so Redis needs
        // no record of it.
        let record = (!req.final_estimate).then(|| {
            let keys: Vec<String> = candidate
                .ops
                .iter()
                .map(|op| self.redis.counter_key(&op.key))
                .collect();
            super::codec::encode_reservation(
                req.now + req.reservation_ttl,
                candidate,
                &keys,
                req.account.as_deref(),
            )
        });
        self.local.lock().unwrap().made(
            &id,
            local::Made {
                record,
                ops: candidate
                    .ops
                    .iter()
                    .map(|op| (op.key.clone(), op.amount))
                    .collect(),
                expires_at: req.now + req.reservation_ttl,
                reservation: Reservation::of(
                    candidate,
                    req.now + req.reservation_ttl,
                    req.account.clone(),
                ),
                replay,
                outcome: outcome.clone(),
                now: req.now,
            },
        );
        Some(outcome)
    }

    /// The decision, made in Redis, refilling this replica's leases on the
    /// counters it touches when it can.
    async fn decide_in_redis(&self, req: &ReserveRequest) -> Result<ReserveOutcome, StoreError> {
        LeaseStats::add(&self.stats.misses, 1);
        let candidate = match req.candidates.as_slice() {
            [only] if only.ops.iter().any(leasable) => only,
            _ => {
                // One script call, or one per slot a cluster spreads the
                // candidates' counters over.
                let slots = match self.redis.cluster() {
                    true => by_tag(
                        req.candidates
                            .iter()
                            .flat_map(|c| c.ops.iter().map(|op| op.key.as_str())),
                    )
                    .len(),
                    false => 1,
                };
                LeaseStats::add(&self.stats.redis_calls, slots.max(1) as u64);
                let outcome = self.redis.reserve(req).await?;
                self.remember_replay(req, &outcome);
                return Ok(outcome);
            }
        };
        let asks = self.book.lock().unwrap().ask(&candidate.ops, req.now);
        let op_asks: Vec<OpAsk> = asks.iter().copied().map(OpAsk::from).collect();
        let lease = LeaseAsk {
            spec: &self.spec,
            ops: &op_asks,
        };
        let tags = by_tag(candidate.ops.iter().map(|op| op.key.as_str()));
        let answer = if !self.redis.cluster() || tags.len() == 1 {
            LeaseStats::add(&self.stats.redis_calls, 1);
            let tag = tags
                .keys()
                .next()
                .filter(|_| self.redis.cluster())
                .cloned()
                .unwrap_or_default();
            let id = if tag.is_empty() {
                req.reservation_id.clone()
            } else {
                format!("{}.{tag}", req.reservation_id)
            };
            self.redis
                .reserve_in_slot(req, &[candidate], &tag, &id, &id, true, Some(&lease))
                .await
                .map(|(outcome, answer)| {
                    let reached = vec![true; candidate.ops.len()];
                    (outcome, answer.unwrap_or_default(), reached)
                })
        } else {
            // One script per slot, in order; a slot not reached took
            // nothing back.
            LeaseStats::add(&self.stats.redis_calls, tags.len() as u64);
            self.redis
                .reserve_across_slots_leasing(req, Some(&lease))
                .await
                .map(|(outcome, leases)| {
                    let leases = leases.unwrap_or_else(|| SlotLeases {
                        answer: Default::default(),
                        reached: vec![false; candidate.ops.len()],
                    });
                    (outcome, leases.answer, leases.reached)
                })
        };
        let (outcome, granted, reached) = match answer {
            Ok(answer) => answer,
            Err(e) => {
                self.book
                    .lock()
                    .unwrap()
                    .refill_failed(&candidate.ops, &asks);
                self.refilled.notify_waiters();
                return Err(e);
            }
        };
        {
            let mut book = self.book.lock().unwrap();
            book.not_reached(&candidate.ops, &asks, &reached);
            if outcome.replayed {
                // A replay changed nothing in Redis: what was sent back is
                // still counted there for this replica, so its leases hold
                // it again, as if the call had not reached Redis.
                // (Those marked unreached got theirs back just above.)
                let unrestored: Vec<bool> = reached.iter().map(|r| !r).collect();
                book.not_reached(&candidate.ops, &asks, &unrestored);
            } else if let Some(states) = outcome.tried.last() {
                if outcome.applied.is_some() {
                    book.demanded(&candidate.ops);
                }
                let reached_asks: Vec<Ask> = asks
                    .iter()
                    .zip(&reached)
                    .map(|(a, r)| if *r { *a } else { Ask::default() })
                    .collect();
                book.refilled(
                    &candidate.ops,
                    &reached_asks,
                    states,
                    &granted.granted,
                    outcome.applied.is_some(),
                    req.now,
                );
            }
        }
        self.refilled.notify_waiters();
        if outcome.applied.is_none() && !outcome.replayed && granted.own_blocked > 0 {
            // Refused only for this replica's own lease, granted by a refill
            // still on its way: once it lands, the lease decides.
            if let Some(outcome) = self.after_refills(req, &candidate.ops).await {
                return Ok(outcome);
            }
        }
        let refills = granted.granted.iter().filter(|&&g| g > 0).count() as u64;
        LeaseStats::add(&self.stats.refills, refills);
        let returned = asks
            .iter()
            .zip(&reached)
            .filter(|(a, r)| a.unused > 0 && **r)
            .count() as u64;
        LeaseStats::add(&self.stats.returns, returned);
        if outcome.applied.is_none() {
            LeaseStats::add(
                &self.stats.early_denials,
                granted.early_denials.max(0) as u64,
            );
        }
        let retry_after = self.book.lock().unwrap().config().retry_early_denial_after;
        if outcome.applied.is_none()
            && !outcome.replayed
            && granted.early_denials > 0
            && retry_after > 0
        {
            // Another replica's lease may come back idle by then.
            tokio::time::sleep(Duration::from_millis(retry_after as u64)).await;
            LeaseStats::add(&self.stats.redis_calls, 1);
            let again = ReserveRequest {
                now: req.now + retry_after,
                ..req.clone()
            };
            let outcome = self.redis.reserve(&again).await?;
            self.remember_replay(req, &outcome);
            return Ok(outcome);
        }
        self.remember_replay(req, &outcome);
        Ok(outcome)
    }

    /// The decision made from leases once the refills in flight on `ops`
    /// have landed, if it can be (waiting at most [`REFILL_WAIT`]).
    async fn after_refills(
        &self,
        req: &ReserveRequest,
        ops: &[CounterOp],
    ) -> Option<ReserveOutcome> {
        let deadline = tokio::time::Instant::now() + REFILL_WAIT;
        loop {
            let landed = self.refilled.notified();
            tokio::pin!(landed);
            landed.as_mut().enable();
            if !self.book.lock().unwrap().refilling(ops, req.now) {
                break;
            }
            if tokio::time::timeout_at(deadline, landed).await.is_err() {
                break;
            }
        }
        self.decide_here(req, false)
    }

    /// A request id decided in Redis is answered here too if it comes back.
    fn remember_replay(&self, req: &ReserveRequest, outcome: &ReserveOutcome) {
        if let Some(rid) = &req.request_id {
            let mut replayed = outcome.clone();
            replayed.replayed = true;
            self.local
                .lock()
                .unwrap()
                .remember(rid, req.now + req.replay_window(), replayed);
        }
    }

    /// Takes back all a local decision charged on each of its counters.
    fn give_back(&self, ops: &[(String, i64)], now: Millis) {
        let deltas: Vec<i64> = ops.iter().map(|(_, reserved)| -reserved).collect();
        self.move_local(ops, &deltas, now);
    }

    /// Moves a local reservation's counters by `deltas` (actual less
    /// reserved): through its leases where they can take it, the rest in
    /// the next batch.
    fn move_local(&self, ops: &[(String, i64)], deltas: &[i64], now: Millis) {
        let moves: Vec<(String, i64)> = {
            let mut book = self.book.lock().unwrap();
            ops.iter()
                .zip(deltas)
                .filter(|((key, _), &delta)| delta != 0 && !book.credit(key, -delta, now))
                .map(|((key, _), &delta)| (self.redis.counter_key(key), delta))
                .collect()
        };
        self.local.lock().unwrap().moved(moves);
    }

    /// Writes what gathered, and hands back expired leases: one script per
    /// slot. A batch that fails is sent again, whole and under its id,
    /// before anything newer: if Redis ran it and only the reply was lost,
    /// `flush.lua` knows it by its id and applies it once.
    async fn flush_batch(&self, now: Millis, drain: bool) -> Result<(), StoreError> {
        let mut unsent = self.flushing.lock().await;
        if let Some(Unsent(id, taken_at, batch)) = unsent.take() {
            match self.write(&id, &batch, taken_at).await {
                Ok(duplicates) => self.take_back(&batch, &duplicates, now).await,
                Err(e) => {
                    *unsent = Some(Unsent(id, taken_at, batch));
                    return Err(e);
                }
            }
        }
        let (returns, updates) = {
            let mut book = self.book.lock().unwrap();
            if drain {
                // What is spent out goes from the store's list too; what
                // is left is handed back.
                let updates = book.changed(now);
                (book.drain(), updates)
            } else {
                (book.expired(now), book.changed(now))
            }
        };
        let mut batch = self.local.lock().unwrap().take_batch(now, &self.redis);
        batch.updates = updates
            .into_iter()
            .map(|(key, unused, until)| (self.redis.counter_key(&key), unused, until))
            .collect();
        LeaseStats::add(&self.stats.returns, returns.len() as u64);
        batch.returns.extend(
            returns
                .into_iter()
                .map(|r| (self.redis.counter_key(&r.key), r.unused, r.until)),
        );
        if batch.is_empty() {
            return Ok(());
        }
        let id = format!(
            "{}.{}",
            self.replica,
            self.batches.fetch_add(1, Ordering::Relaxed)
        );
        match self.write(&id, &batch, now).await {
            Ok(duplicates) => {
                self.take_back(&batch, &duplicates, now).await;
                Ok(())
            }
            Err(e) => {
                *unsent = Some(Unsent(id, now, batch));
                Err(e)
            }
        }
    }

    /// Renews busy leases before decisions find them spent or lapsed (see
    /// [`LeaseBook::renewals`]): one `reserve.lua` per slot (and per
    /// [`RENEWALS_PER_CALL`]), of one candidate whose ops are all at 0, so
    /// that it decides nothing and writes no record; the script grants
    /// each lease as it would a refill, near a cap or a threshold nothing.
    /// The decisions that would have waited for those refills are made
    /// in the process instead, and many refills share one call.
    async fn renew(&self, now: Millis) {
        // Held as a batch is: a shutdown's drain waits for renewals in
        // flight, and hands back what they granted too.
        let _flushing = self.flushing.lock().await;
        let renewals = self.book.lock().unwrap().renewals(now);
        if renewals.is_empty() {
            return;
        }
        let slots = match self.redis.cluster() {
            true => by_tag(renewals.iter().map(|(op, _)| op.key.as_str())),
            false => [(String::new(), (0..renewals.len()).collect())].into(),
        };
        for (tag, group) in &slots {
            let tag = tag.as_str();
            for part in group.chunks(RENEWALS_PER_CALL) {
                let ops: Vec<CounterOp> = part.iter().map(|&i| renewals[i].0.clone()).collect();
                let asks: Vec<Ask> = part.iter().map(|&i| renewals[i].1).collect();
                let op_asks: Vec<OpAsk> = asks.iter().copied().map(OpAsk::from).collect();
                let lease = LeaseAsk {
                    spec: &self.spec,
                    ops: &op_asks,
                };
                let id = match tag {
                    "" => format!("renew-{}", self.replica),
                    tag => format!("renew-{}.{tag}", self.replica),
                };
                let req = ReserveRequest {
                    now,
                    candidates: vec![Candidate { model: None, ops }],
                    reservation_id: id.clone(),
                    reservation_ttl: 1,
                    request_id: None,
                    account: None,
                    final_estimate: true,
                };
                let candidate = &req.candidates[0];
                LeaseStats::add(&self.stats.redis_calls, 1);
                let answer = self
                    .redis
                    .reserve_in_slot(&req, &[candidate], tag, &id, &id, false, Some(&lease))
                    .await;
                let mut book = self.book.lock().unwrap();
                match answer {
                    Ok((outcome, Some(granted))) if outcome.applied.is_some() => {
                        let states = outcome.tried.last().map_or(&[][..], Vec::as_slice);
                        book.renewed(&candidate.ops, &asks, states, &granted.granted, now);
                        let renewed = granted.granted.iter().filter(|&&g| g > 0).count();
                        LeaseStats::add(&self.stats.renewals, renewed as u64);
                        LeaseStats::add(&self.stats.refills, renewed as u64);
                    }
                    Ok(_) => book.renew_failed(&candidate.ops),
                    Err(e) => {
                        book.renew_failed(&candidate.ops);
                        tracing::debug!(error = %e, "could not renew leases; they lapse and are refilled by decisions");
                    }
                }
                drop(book);
                // Decisions wait for a renewal in flight as for a refill.
                self.refilled.notify_waiters();
            }
        }
    }

    /// Takes back each decision of `batch` whose request id another
    /// replica had decided first.
    async fn take_back(&self, batch: &Pending, duplicates: &[usize], now: Millis) {
        for decided in Local::duplicates(batch, duplicates) {
            match decided {
                // Written in this batch: Redis takes it back.
                Decided::Reservation(id) => {
                    LeaseStats::add(&self.stats.redis_calls, 1);
                    if let Err(e) = self.redis.withdraw(&id, None, now).await {
                        tracing::error!(reservation = %id, error = %e, "could not take back a decision another replica had made for the same request id; it stays charged");
                    }
                }
                // No record: its counters go back by what it charged,
                // through the leases or the next batch.
                Decided::Final(ops) => self.give_back(&ops, now),
                // Kept here: taken back as the gate would, once.
                Decided::Held(id, ops) => {
                    let taken = self.local.lock().unwrap().settle(&id, now);
                    if !matches!(taken, Some(Err(SettleOutcome::AlreadySettled))) {
                        self.give_back(&ops, now);
                    }
                }
            }
        }
    }

    /// One `flush.lua` per slot; the request ids another replica decided
    /// first, by their index in `batch.replays`.
    async fn write(
        &self,
        id: &str,
        batch: &Pending,
        now: Millis,
    ) -> Result<Vec<usize>, StoreError> {
        enum Item<'b> {
            Record(&'b str, &'b str, Millis),
            /// Request ids of one replay hash: each one's index in
            /// `batch.replays`, field, outcome, and until when it is valid.
            Replays(&'b ReplaySpot, Vec<(usize, &'b str, &'b str, Millis)>),
            Move(&'b str, i64),
            Return(&'b str, i64, Millis),
            Update(&'b str, i64, Millis),
        }
        let mut groups: std::collections::BTreeMap<&str, Vec<Item>> = Default::default();
        let cluster = self.redis.cluster();
        fn tag(cluster: bool, key: &str) -> &str {
            if cluster {
                full_key_tag(key)
            } else {
                ""
            }
        }
        let tag = |key| tag(cluster, key);
        for (key, text, lifetime) in &batch.records {
            groups
                .entry(tag(key))
                .or_default()
                .push(Item::Record(key, text, *lifetime));
        }
        let mut hashes: std::collections::BTreeMap<&str, (&ReplaySpot, Vec<_>)> =
            Default::default();
        for (i, (spot, text, until)) in batch.replays.iter().enumerate() {
            hashes
                .entry(&spot.base)
                .or_insert_with(|| (spot, Vec::new()))
                .1
                .push((i, spot.field.as_str(), text.as_str(), *until));
        }
        for (base, (spot, mut ids)) in hashes {
            // A few hundred at most in one item: the script spreads them
            // as arguments of one command.
            while !ids.is_empty() {
                let rest = ids.split_off(ids.len().min(REPLAYS_PER_ITEM));
                groups
                    .entry(tag(base))
                    .or_default()
                    .push(Item::Replays(spot, std::mem::replace(&mut ids, rest)));
            }
        }
        for (key, delta) in &batch.moves {
            groups
                .entry(tag(key))
                .or_default()
                .push(Item::Move(key, *delta));
        }
        for (key, unused, until) in &batch.returns {
            groups
                .entry(tag(key))
                .or_default()
                .push(Item::Return(key, *unused, *until));
        }
        for (key, unused, until) in &batch.updates {
            groups
                .entry(tag(key))
                .or_default()
                .push(Item::Update(key, *unused, *until));
        }
        let mut duplicates = Vec::new();
        for (group, items) in &groups {
            let mut inv = self.flush.prepare_invoke();
            inv.key(self.redis.batch_key(group, id));
            inv.arg(now).arg(&self.replica);
            let mut replays = Vec::new();
            for item in items {
                match *item {
                    Item::Record(key, text, lifetime) => {
                        inv.key(key).arg("r").arg(text).arg(lifetime);
                    }
                    Item::Replays(spot, ref ids) => {
                        // Each outcome is valid for a window from its
                        // decision.
                        let earliest = ids
                            .iter()
                            .map(|&(.., until)| until - spot.window)
                            .min()
                            .unwrap_or(now);
                        inv.key(&spot.base)
                            .arg("q")
                            .arg(spot.batch_buckets_arg(now, earliest))
                            .arg(ids.len());
                        for &(i, field, text, _) in ids {
                            inv.arg(field).arg(text);
                            replays.push(i);
                        }
                    }
                    Item::Move(key, delta) => {
                        inv.key(key).arg("m").arg("p").arg(delta);
                    }
                    Item::Return(key, unused, until) => {
                        inv.key(key).arg("l").arg(unused).arg(until);
                    }
                    Item::Update(key, unused, until) => {
                        inv.key(key).arg("u").arg(unused).arg(until);
                    }
                }
            }
            LeaseStats::add(&self.stats.redis_calls, 1);
            let dup: Vec<i64> = self.redis.invoke(&inv).await?;
            duplicates.extend(
                dup.into_iter()
                    .filter_map(|q| usize::try_from(q - 1).ok())
                    .filter_map(|q| replays.get(q).copied()),
            );
        }
        Ok(duplicates)
    }
}

/// The hash tag of a full key: what is between its first braces.
fn full_key_tag(key: &str) -> &str {
    key.split_once('{')
        .and_then(|(_, rest)| rest.split_once('}'))
        .map_or("", |(tag, _)| tag)
}

/// A fresh id for this replica's leases.
fn replica_id() -> String {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes = (nanos ^ u64::from(std::process::id())).to_le_bytes();
    }
    crate::policy::hex(&bytes)
}

fn spawn_flusher(store: Weak<LeasedStore>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(FLUSH_EVERY as u64));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            let Some(store) = store.upgrade() else {
                return;
            };
            let Some(now) = store.clock.now() else {
                continue;
            };
            store.renew(now).await;
            match store.flush_batch(now, false).await {
                Ok(()) => failing = false,
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "cannot write the leased decisions' batch to Redis; keeping it to write later");
                    }
                    failing = true;
                }
            }
        }
    });
}

#[async_trait]
impl CounterStore for LeasedStore {
    fn reserve_now(&self, req: &ReserveRequest) -> Option<ReserveOutcome> {
        self.decide_here(req, true)
    }

    async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveOutcome, StoreError> {
        if let Some(outcome) = self.decide_here(req, false) {
            return Ok(outcome);
        }
        // A refill of one of its counters is on its way: waiting for it
        // costs no more than a round trip of its own, and no Redis call.
        if let Some(candidate) = req.candidates.first() {
            let refilling = self.book.lock().unwrap().refilling(&candidate.ops, req.now);
            if refilling {
                if let Some(outcome) = self.after_refills(req, &candidate.ops).await {
                    return Ok(outcome);
                }
            }
        }
        self.decide_in_redis(req).await
    }

    async fn reservation(&self, id: &str, now: Millis) -> Result<Option<Reservation>, StoreError> {
        if let Some(r) = self.local.lock().unwrap().reservation(id, now) {
            return Ok(Some(r));
        }
        LeaseStats::add(&self.stats.redis_calls, 1);
        let found = self.redis.reservation(id, now).await?;
        if found.is_none() && id.starts_with('L') {
            // Made on another replica, whose batch may not have landed.
            tokio::time::sleep(Duration::from_millis(FLUSH_EVERY as u64 + 5)).await;
            LeaseStats::add(&self.stats.redis_calls, 1);
            return self.redis.reservation(id, now).await;
        }
        Ok(found)
    }

    async fn settle(
        &self,
        id: &str,
        actual: &[i64],
        now: Millis,
    ) -> Result<SettleOutcome, StoreError> {
        self.clock.saw(now);
        let found = self.local.lock().unwrap().settle(id, now);
        match found {
            Some(Ok(ops)) => {
                let deltas: Vec<i64> = ops
                    .iter()
                    .enumerate()
                    .map(|(i, (_, reserved))| actual.get(i).copied().unwrap_or(0) - reserved)
                    .collect();
                self.move_local(&ops, &deltas, now);
                return Ok(SettleOutcome::Settled);
            }
            Some(Err(outcome)) => return Ok(outcome),
            None => {}
        }
        LeaseStats::add(&self.stats.redis_calls, 1);
        let outcome = self.redis.settle(id, actual, now).await?;
        if outcome == SettleOutcome::Unknown && id.starts_with('L') {
            tokio::time::sleep(Duration::from_millis(FLUSH_EVERY as u64 + 5)).await;
            LeaseStats::add(&self.stats.redis_calls, 1);
            return self.redis.settle(id, actual, now).await;
        }
        Ok(outcome)
    }

    async fn withdraw(
        &self,
        id: &str,
        request_id: Option<&str>,
        now: Millis,
    ) -> Result<SettleOutcome, StoreError> {
        self.clock.saw(now);
        if let Some(rid) = request_id {
            self.local.lock().unwrap().forget(rid);
        }
        let found = self.local.lock().unwrap().settle(id, now);
        match found {
            Some(Ok(ops)) => {
                self.give_back(&ops, now);
                Ok(SettleOutcome::Settled)
            }
            Some(Err(outcome)) => Ok(outcome),
            None => {
                LeaseStats::add(&self.stats.redis_calls, 1);
                self.redis.withdraw(id, request_id, now).await
            }
        }
    }

    async fn mark_alerts(
        &self,
        markers: &[AlertMarker],
        now: Millis,
    ) -> Result<Vec<bool>, StoreError> {
        LeaseStats::add(&self.stats.redis_calls, 1);
        self.redis.mark_alerts(markers, now).await
    }

    async fn close(&self, now: Millis) -> Result<(), StoreError> {
        // What gathered, then every lease handed back.
        self.flush_batch(now, false).await?;
        self.flush_batch(now, true).await
    }

    async fn record_spend(
        &self,
        batch: &str,
        deltas: &[SpendDelta],
        bounds: SpendBounds,
        now: Millis,
    ) -> Result<(), StoreError> {
        self.redis.record_spend(batch, deltas, bounds, now).await
    }

    async fn spend(&self, from: spend::Day, to: spend::Day) -> Result<Vec<SpendDay>, StoreError> {
        self.redis.spend(from, to).await
    }

    async fn read(
        &self,
        counters: &[CounterRef],
        now: Millis,
    ) -> Result<Vec<CounterState>, StoreError> {
        let own: Vec<i64> = {
            let book = self.book.lock().unwrap();
            counters.iter().map(|c| book.unused(&c.key)).collect()
        };
        LeaseStats::add(&self.stats.redis_calls, 1);
        self.redis
            .read_counters(counters, now, &self.replica, &own)
            .await
    }

    async fn put_grant(&self, grant: &Grant, now: Millis) -> Result<(), StoreError> {
        self.redis.put_grant(grant, now).await
    }

    async fn remove_grant(&self, key: &str, now: Millis) -> Result<Option<Grant>, StoreError> {
        self.redis.remove_grant(key, now).await
    }

    async fn grants(&self, now: Millis) -> Result<Vec<Grant>, StoreError> {
        self.redis.grants(now).await
    }

    async fn append(&self, log: &str, entry: &str) -> Result<(), StoreError> {
        self.redis.append(log, entry).await
    }

    async fn entries(&self, log: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        self.redis.entries(log, limit).await
    }
}

impl From<Ask> for OpAsk {
    fn from(a: Ask) -> OpAsk {
        OpAsk {
            unused: a.unused,
            want: a.want,
            life: a.life,
        }
    }
}
