//! Request ids' outcomes, kept so that a repeat is answered as the first
//! request was: where they live (one hash per slot, shard, span and time
//! bucket; see [`ReplaySpot`]) and the calls that read, keep and forget
//! them outside `reserve.lua` and `flush.lua`.

use sha2::{Digest, Sha256};

use super::keys::slot_tag;
use super::RedisStore;
use crate::clock::Millis;
use crate::policy::hex;
use crate::store::{ReserveRequest, StoreError, FINAL_REPLAY_WINDOW, REPLAY_WINDOW};

impl RedisStore {
    /// A key in the slot `tag` that no script reads or writes.
    pub(super) fn replay_slot_key(&self, tag: &str) -> String {
        format!("{}q:{{{tag}}}", self.prefix)
    }

    /// Where request `request_id`'s outcome is kept when it is decided in
    /// the slot `tag` (the slot of its first candidate's first counter),
    /// remembered for `window`.
    pub(super) fn replay_spot(&self, tag: &str, request_id: &str, window: Millis) -> ReplaySpot {
        let field = hex(&Sha256::digest(request_id.as_bytes())[..16]);
        let shard = &field[..1];
        let span = replay_span(window);
        ReplaySpot {
            base: format!("{}q:{{{tag}}}{shard}.{span}.", self.prefix),
            field,
            window,
        }
    }

    /// The slot a request's outcome is kept in, on a Cluster: its first
    /// candidate's first counter's (a reservation made in one slot, from a
    /// lease or in Redis, is there too); without counters, its own.
    pub(super) fn replay_tag(&self, req: &ReserveRequest) -> String {
        if !self.cluster() {
            return String::new();
        }
        match req.candidates.first().and_then(|c| c.ops.first()) {
            Some(op) => slot_tag(&op.key).to_string(),
            None => format!("q{}", req.request_id.as_deref().unwrap_or("")),
        }
    }

    /// Where a reserve that made reservation `id` kept request
    /// `request_id`'s outcome, for each window it may have had: the
    /// reservation's id names the slot (see [`RedisStore::replay_tag`]).
    pub(super) fn replay_spots_of(&self, id: &str, request_id: &str) -> [ReplaySpot; 2] {
        let tag = match (self.cluster(), id.split_once('.')) {
            (false, _) => String::new(),
            (true, Some((_, tag))) => tag.to_string(),
            (true, None) => format!("q{request_id}"),
        };
        [REPLAY_WINDOW, FINAL_REPLAY_WINDOW].map(|w| self.replay_spot(&tag, request_id, w))
    }

    /// The outcome kept at `spot` that is still valid at `now`, as text.
    pub(super) async fn kept_replay(
        &self,
        spot: &ReplaySpot,
        now: Millis,
    ) -> Result<Option<String>, StoreError> {
        let mut inv = self.replay.prepare_invoke();
        inv.key(&spot.base)
            .arg(now)
            .arg("get")
            .arg("")
            .arg(spot.script_arg(now));
        self.invoke(&inv).await
    }

    /// Keeps `text` (which begins with when it stops being valid) at `spot`.
    pub(super) async fn keep_replay(
        &self,
        spot: &ReplaySpot,
        text: &str,
        now: Millis,
    ) -> Result<(), StoreError> {
        let mut inv = self.replay.prepare_invoke();
        inv.key(&spot.base)
            .arg(now)
            .arg("set")
            .arg(text)
            .arg(spot.script_arg(now));
        self.invoke::<i64>(&inv).await.map(drop)
    }

    /// Forgets what a reserve that made reservation `id` kept for request
    /// `request_id`, in whichever window it was kept.
    pub(super) async fn forget_replay(
        &self,
        id: &str,
        request_id: &str,
        now: Millis,
    ) -> Result<(), StoreError> {
        let spots = self.replay_spots_of(id, request_id);
        let mut inv = self.replay.prepare_invoke();
        for spot in &spots {
            inv.key(&spot.base);
        }
        inv.arg(now).arg("forget").arg("");
        for spot in &spots {
            inv.arg(spot.script_arg(now));
        }
        self.invoke::<i64>(&inv).await.map(drop)
    }
}

/// The time a replay hash gathers request ids for: its window, at most
/// [`MAX_REPLAY_SPAN`].
fn replay_span(window: Millis) -> Millis {
    window.clamp(1, MAX_REPLAY_SPAN)
}

/// A replay hash is deleted whole when it lapses, which blocks Redis for
/// about 0.17 µs a field (measured: 5,000 fields 0.9 ms, 16,000 2.6 ms,
/// 64,000 17 ms); a span this long and 16 shards keep one near a
/// millisecond at 17,000 request ids a second.
const MAX_REPLAY_SPAN: Millis = 15_000;

/// Where a request id's outcome is kept: a field (the id's hash) of one
/// hash per slot, shard (the hash's first hex digit), span and time bucket
/// (`now / span`). One hash takes many ids in one command, which is what
/// lets a replica's batch of ids cost Redis a few commands instead of one
/// per request. An id decided at `t` is in bucket `t / span` (or a later
/// one, for an id written late from a batch) and is valid until
/// `t + window`; so a lookup at `now` reads the buckets from
/// `(now - window) / span` to `now / span`, and one more for a replica
/// whose clock is ahead by less than a span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ReplaySpot {
    /// `<prefix>q:{<tag>}<shard>.<span>.`: a bucket's key is this and the
    /// bucket's number.
    pub base: String,
    /// The request id's hash, in hex.
    pub field: String,
    pub window: Millis,
}

impl ReplaySpot {
    fn bucket(&self, at: Millis) -> i64 {
        at.div_euclid(replay_span(self.window))
    }

    /// What the scripts are told of it at `now`: the window, the first and
    /// last bucket to read, the bucket to write, the written hash's
    /// lifetime (ms) and the field.
    pub fn script_arg(&self, now: Millis) -> String {
        format!("{} {}", self.buckets_arg(now), self.field)
    }

    /// The same less the field: what every id of one hash shares.
    pub fn buckets_arg(&self, now: Millis) -> String {
        self.buckets_from(now, now)
    }

    /// What a batch written at `now` reads for ids decided from `earliest`
    /// on (a batch interval before, or longer with Redis down), each
    /// judged at its own decision's time: back to the bucket of the
    /// oldest outcome still valid at `earliest`, and no further.
    pub fn batch_buckets_arg(&self, now: Millis, earliest: Millis) -> String {
        self.buckets_from(now, earliest.min(now))
    }

    fn buckets_from(&self, now: Millis, earliest: Millis) -> String {
        let write = self.bucket(now);
        // Written again with each id: it outlives the last id written,
        // whose outcome is valid for the window from then at most.
        let lifetime = super::key_lifetime(self.window);
        format!(
            "{} {} {} {write} {lifetime}",
            self.window,
            self.bucket(earliest - self.window),
            write + 1,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spot(window: Millis) -> ReplaySpot {
        ReplaySpot {
            base: "q:{}a.".into(),
            field: "ab".into(),
            window,
        }
    }

    fn buckets(spot: &ReplaySpot, now: Millis) -> (i64, i64, i64) {
        let arg = spot.buckets_arg(now);
        let n: Vec<i64> = arg.split(' ').map(|t| t.parse().unwrap()).collect();
        (n[1], n[2], n[3])
    }

    #[test]
    fn the_scripts_are_told_the_buckets_to_read_and_write() {
        assert_eq!(spot(5_000).script_arg(12_345), "5000 1 3 2 10000 ab");
        assert_eq!(spot(60_000).script_arg(100_000), "60000 2 7 6 120000 ab");
    }

    /// A batch written at `now` finds, for an id it decided at `d`, every
    /// outcome kept at `t` that is valid at `d` (by a replica up to a span
    /// ahead, or late), reading from the bucket `earliest` (its oldest
    /// decision) names; and it reads one bucket fewer than a lookup from
    /// `now - window` less one would.
    #[test]
    fn a_batch_reads_back_only_as_far_as_its_oldest_decision_needs() {
        for window in [5_000, 60_000] {
            let spot = spot(window);
            let span = replay_span(window);
            let batch = |now, earliest| {
                let arg = spot.batch_buckets_arg(now, earliest);
                let n: Vec<i64> = arg.split(' ').map(|t| t.parse().unwrap()).collect();
                (n[1], n[2])
            };
            for t in (1_000_000..1_000_000 + 2 * span).step_by(997) {
                for ahead in [0, span / 2, span - 1] {
                    for late in [0, 20, 999] {
                        let (_, _, written) = buckets(&spot, t + ahead + late);
                        for d in [t + 1, t + window / 2, t + window - 1] {
                            for delay in [0, 20, 3_000] {
                                let now = (d + delay).max(t + late);
                                let (first, last) = batch(now, d);
                                assert!(
                                    (first..=last).contains(&written),
                                    "window {window}, kept at {t} (+{ahead}, {late} late), decided at {d}, batch at {now}"
                                );
                            }
                        }
                    }
                }
            }
            let now = 1_000_000 + span / 2;
            let (first, _) = batch(now, now - 20);
            assert_eq!(first, spot.bucket(now - window), "window {window}");
        }
    }

    /// An id kept at `t` (by a replica whose clock is up to a span ahead,
    /// or late, from a batch) is read by every lookup while it is valid.
    #[test]
    fn an_id_is_found_for_as_long_as_it_is_valid() {
        for window in [5_000, 60_000] {
            let spot = spot(window);
            let span = replay_span(window);
            for t in (1_000_000..1_000_000 + 2 * span).step_by(997) {
                for ahead in [0, 1, span / 2, span - 1] {
                    for late in [0, 20, 999] {
                        let (_, _, written) = buckets(&spot, t + ahead + late);
                        for now in [t, t + 1, t + window / 2, t + window - 1] {
                            if now >= t + late + window {
                                continue;
                            }
                            let (first, last, _) = buckets(&spot, now.max(t + late));
                            assert!(
                                (first..=last).contains(&written),
                                "window {window}, kept at {t} (+{ahead} ahead, {late} late), read at {now}"
                            );
                        }
                    }
                }
            }
        }
    }
}
