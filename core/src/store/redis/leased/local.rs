//! What a leasing replica keeps about the decisions it made itself: their
//! reservations (to settle them here), the request ids it answered (to
//! replay them here), and what it still owes Redis, gathered into the next
//! batch.
//!
//! Invariants: a reservation is settled here only before its record is
//! written to Redis (within one batch interval); after that, Redis alone
//! settles it, so that a settle sent to two replicas counts once. (A final
//! estimate has no record, and nothing but this replica's gate takes it
//! back: it stays here until it lapses.) Bounded:
//! a reservation is kept until it is written, or [`KEEP`] has passed (Redis
//! down); request ids for their replay window, at most [`MAX_REPLAYS`];
//! counter moves are summed per counter; records and
//! request ids waiting for Redis are capped at [`MAX_WAITING`] each.

use std::collections::{HashMap, VecDeque};

use super::super::replays::ReplaySpot;
use super::super::{key_lifetime, RedisStore, SETTLED_KEY_LIFETIME};
use crate::store::*;

/// How long a reservation Redis cannot take is kept here, in ms.
const KEEP: Millis = 60_000;

/// Records, and request ids, waiting for Redis, at most; past it the
/// oldest go unwritten (a settle of such a reservation on another replica
/// finds nothing, and its estimate stays charged).
const MAX_WAITING: usize = 200_000;

/// Request ids answered here, at most.
const MAX_REPLAYS: usize = 100_000;

/// A decision made here.
pub(super) struct Made {
    /// The reservation record, as `reserve.lua` would have stored it;
    /// none for a final estimate, which nothing settles: it is kept here
    /// only for the gate to take back (see [`Decided::Held`]).
    pub record: Option<String>,
    /// Each counter and the amount reserved on it.
    pub ops: Vec<(String, i64)>,
    pub expires_at: Millis,
    pub reservation: Reservation,
    /// The request id, where Redis keeps it and the outcome to keep there,
    /// remembered until the last.
    pub replay: Option<(String, ReplaySpot, String, Millis)>,
    pub outcome: ReserveOutcome,
    pub now: Millis,
}

#[derive(Debug)]
struct Entry {
    record: Option<String>,
    ops: Vec<(String, i64)>,
    expires_at: Millis,
    reservation: Reservation,
}

/// One batch for Redis: full keys with what to write there.
#[derive(Debug, Default)]
pub(super) struct Pending {
    /// Reservation key, record, lifetime (ms).
    pub records: Vec<(String, String, Millis)>,
    /// Where a request id is kept, its outcome, and until when that is
    /// valid (a window after its decision).
    pub replays: Vec<(ReplaySpot, String, Millis)>,
    /// The decision each replay belongs to, by index.
    pub replay_ids: Vec<Decided>,
    /// Counter key, delta.
    pub moves: Vec<(String, i64)>,
    /// Counter key, unused lease handed back, when its entry lapses.
    pub returns: Vec<(String, i64, Millis)>,
    /// Counter key, what the lease still holds, when its record lapses.
    pub updates: Vec<(String, i64, Millis)>,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
            && self.replays.is_empty()
            && self.moves.is_empty()
            && self.returns.is_empty()
            && self.updates.is_empty()
    }
}

/// A decision made here, as a repeat of its request id on another replica
/// would take it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Decided {
    /// Through its reservation record, in Redis by then.
    Reservation(String),
    /// A final estimate, which has no record: each counter with what it
    /// charged there.
    Final(Vec<(String, i64)>),
    /// A final estimate kept here under its reservation id, which the
    /// gate may still take back here: taken back through it, unless the
    /// gate did first.
    Held(String, Vec<(String, i64)>),
}

#[derive(Debug, Default)]
pub(super) struct Local {
    reservations: HashMap<String, Entry>,
    /// When each reservation may be forgotten, oldest first.
    forget_at: VecDeque<(Millis, String)>,
    replays: HashMap<String, (Millis, ReserveOutcome)>,
    replay_order: VecDeque<(Millis, String)>,
    /// Reservations whose record is to be written (again, once settled).
    unwritten: VecDeque<String>,
    /// Request ids to write: the id, where, outcome, until, decision.
    replays_unwritten: VecDeque<(String, ReplaySpot, String, Millis, Decided)>,
    moves: HashMap<String, i64>,
}

impl Local {
    pub fn made(&mut self, id: &str, made: Made) {
        if let Some((rid, key, text, until)) = made.replay {
            let decided = match made.record {
                Some(_) => Decided::Reservation(id.to_string()),
                None => Decided::Held(id.to_string(), made.ops.clone()),
            };
            self.answered_as((rid, key, text, until), decided, made.outcome);
        }
        if made.record.is_some() {
            self.unwritten.push_back(id.to_string());
            if self.unwritten.len() > MAX_WAITING {
                self.unwritten.pop_front();
            }
        }
        self.forget_at
            .push_back(((made.now + KEEP).min(made.expires_at), id.to_string()));
        self.reservations.insert(
            id.to_string(),
            Entry {
                record: made.record,
                ops: made.ops,
                expires_at: made.expires_at,
                reservation: made.reservation,
            },
        );
    }

    /// A final estimate decided here (no record, see [`Decided::Final`]):
    /// only its request id is kept, and written.
    pub fn answered(
        &mut self,
        replay: (String, ReplaySpot, String, Millis),
        ops: Vec<(String, i64)>,
        outcome: ReserveOutcome,
    ) {
        self.answered_as(replay, Decided::Final(ops), outcome);
    }

    fn answered_as(
        &mut self,
        (rid, key, text, until): (String, ReplaySpot, String, Millis),
        decided: Decided,
        outcome: ReserveOutcome,
    ) {
        self.replays_unwritten
            .push_back((rid.clone(), key, text, until, decided));
        self.remember(
            &rid,
            until,
            ReserveOutcome {
                replayed: true,
                ..outcome
            },
        );
        if self.replays_unwritten.len() > MAX_WAITING {
            self.replays_unwritten.pop_front();
        }
    }

    pub fn remember(&mut self, rid: &str, until: Millis, outcome: ReserveOutcome) {
        self.replay_order.push_back((until, rid.to_string()));
        self.replays.insert(rid.to_string(), (until, outcome));
        // Past the cap the oldest go first: a repeat of one is decided
        // afresh here, and its batch finds the id in Redis and takes the
        // new decision back, so it is still charged once.
        while self.replays.len() > MAX_REPLAYS {
            let Some((_, old)) = self.replay_order.pop_front() else {
                break;
            };
            self.replays.remove(&old);
        }
    }

    pub fn replayed(&self, rid: &str, now: Millis) -> Option<ReserveOutcome> {
        self.replays
            .get(rid)
            .filter(|(until, _)| *until > now)
            .map(|(_, o)| o.clone())
    }

    /// Forgets request id `rid` (its decision was withdrawn), here and
    /// in the next batch: a retry, here or on another replica, is decided
    /// afresh rather than replayed, or taken back as a repeat.
    pub fn forget(&mut self, rid: &str) {
        self.replays.remove(rid);
        self.replays_unwritten.retain(|(r, ..)| r != rid);
    }

    pub fn reservation(&self, id: &str, now: Millis) -> Option<Reservation> {
        self.reservations
            .get(id)
            .filter(|e| e.expires_at > now)
            .map(|e| e.reservation.clone())
    }

    /// Settles a reservation made here, once: its counters with the
    /// amounts reserved, or what a settle of it answers now. `None` when it was not made
    /// here (or is forgotten).
    pub fn settle(
        &mut self,
        id: &str,
        now: Millis,
    ) -> Option<Result<Vec<(String, i64)>, SettleOutcome>> {
        let entry = self.reservations.get_mut(id)?;
        if entry.expires_at <= now {
            self.reservations.remove(id);
            return Some(Err(SettleOutcome::Unknown));
        }
        if entry.reservation.settled {
            return Some(Err(SettleOutcome::AlreadySettled));
        }
        entry.reservation.settled = true;
        Some(Ok(entry.ops.clone()))
    }

    /// Adds counter moves (full key, delta) to the next batch.
    pub fn moved(&mut self, moves: Vec<(String, i64)>) {
        for (key, delta) in moves {
            *self.moves.entry(key).or_default() += delta;
        }
    }

    /// Everything to write now, taken out; reservations and request ids
    /// past their time are forgotten.
    pub fn take_batch(&mut self, now: Millis, redis: &RedisStore) -> Pending {
        let mut batch = Pending {
            moves: self.moves.drain().filter(|(_, d)| *d != 0).collect(),
            ..Pending::default()
        };
        while let Some(id) = self.unwritten.pop_front() {
            let Some(entry) = self.reservations.get(&id) else {
                continue;
            };
            let Some(record) = entry.record.as_deref().filter(|_| entry.expires_at > now) else {
                continue;
            };
            let settled = entry.reservation.settled;
            let (text, lifetime) = if settled {
                let keep = (now + SETTLED_RETENTION).min(entry.expires_at);
                let rest = record.split_once('\n').map_or("", |(_, r)| r);
                (format!("1 {keep}\n{rest}"), SETTLED_KEY_LIFETIME)
            } else {
                (record.to_string(), key_lifetime(entry.expires_at - now))
            };
            batch
                .records
                .push((redis.reservation_key(&id), text, lifetime));
            // Redis answers for it from now on, for every replica.
            self.reservations.remove(&id);
        }
        while let Some((_, key, text, until, id)) = self.replays_unwritten.pop_front() {
            if until > now {
                batch.replays.push((key, text, until));
                batch.replay_ids.push(id);
            }
        }
        while self.forget_at.front().is_some_and(|(at, _)| *at <= now) {
            // Unwritten this long (Redis down), it is let go rather than
            // kept without bound.
            let (_, id) = self.forget_at.pop_front().expect("checked");
            self.reservations.remove(&id);
        }
        while self.replay_order.front().is_some_and(|(at, _)| *at <= now) {
            let (_, rid) = self.replay_order.pop_front().expect("checked");
            if self
                .replays
                .get(&rid)
                .is_some_and(|(until, _)| *until <= now)
            {
                self.replays.remove(&rid);
            }
        }
        batch
    }

    /// The reservations made here whose request id another replica had
    /// decided first: each is to be taken back, so that the request is
    /// charged once.
    pub fn duplicates(batch: &Pending, duplicates: &[usize]) -> Vec<Decided> {
        duplicates
            .iter()
            .filter_map(|&i| batch.replay_ids.get(i).cloned())
            .collect()
    }
}
