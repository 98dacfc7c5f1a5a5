//! Reserving a decision whose counters share one slot: one `EVALSHA` of
//! `reserve.lua`. On a single server every decision is this one call.

use ::redis::Value;

use super::codec::{
    decode_leasing_outcome, decode_outcome, encode_reservation, op_mode, LeaseAnswer,
};
use super::keys::by_tag;
use super::{key_lifetime, RedisStore, CLEANUP_GRACE};
use crate::store::*;

impl RedisStore {
    /// The whole reserve: one script when every key shares a slot (always,
    /// off a cluster), otherwise slot by slot.
    pub(super) async fn reserve_decision(
        &self,
        req: &ReserveRequest,
    ) -> Result<ReserveOutcome, StoreError> {
        let candidates: Vec<&Candidate> = req.candidates.iter().collect();
        if !self.cluster() {
            return self
                .reserve_in_slot(
                    req,
                    &candidates,
                    "",
                    &req.reservation_id,
                    &req.reservation_id,
                    true,
                    None,
                )
                .await
                .map(|(outcome, _)| outcome);
        }
        let tags = by_tag(
            req.candidates
                .iter()
                .flat_map(|c| c.ops.iter().map(|op| op.key.as_str())),
        );
        match tags.keys().next() {
            Some(tag) if tags.len() == 1 => {
                let id = format!("{}.{tag}", req.reservation_id);
                self.reserve_in_slot(req, &candidates, tag, &id, &id, true, None)
                    .await
                    .map(|(outcome, _)| outcome)
            }
            _ => self.reserve_across_slots(req).await,
        }
    }

    /// Runs `reserve.lua` for `candidates` whose keys all share `tag`'s
    /// slot. `key_id` places the reservation key; `reservation_id` is what
    /// the reservation is known by (and what holds concurrency slots).
    /// With `lease` (one candidate only), the replica gives back and asks
    /// for leases on the candidate's plain counters in the same call.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn reserve_in_slot(
        &self,
        req: &ReserveRequest,
        candidates: &[&Candidate],
        tag: &str,
        key_id: &str,
        reservation_id: &str,
        record: bool,
        lease: Option<&LeaseAsk<'_>>,
    ) -> Result<(ReserveOutcome, Option<LeaseAnswer>), StoreError> {
        let mut inv = self.reserve.prepare_invoke();
        inv.key(self.reservation_key(key_id));
        let replay = match (record, req.request_id.as_deref()) {
            (true, Some(rid)) => Some(self.replay_spot(tag, rid, req.replay_window())),
            _ => None,
        };
        match &replay {
            Some(spot) => inv.key(&spot.base),
            // Only to name the slot.
            None => inv.key(self.replay_slot_key(tag)),
        };
        inv.arg(req.now)
            .arg(key_lifetime(req.reservation_ttl))
            .arg(reservation_id)
            .arg(replay.map_or_else(|| "0".to_string(), |spot| spot.script_arg(req.now)))
            .arg(CLEANUP_GRACE)
            .arg(candidates.len())
            .arg(lease.map_or("", |l| l.spec));
        for candidate in candidates {
            let keys: Vec<String> = candidate
                .ops
                .iter()
                .map(|op| self.counter_key(&op.key))
                .collect();
            let text = if record {
                encode_reservation(
                    req.now + req.reservation_ttl,
                    candidate,
                    &keys,
                    req.account.as_deref(),
                )
            } else {
                String::new()
            };
            inv.arg(candidate.ops.len()).arg(text);
            for (o, (op, key)) in candidate.ops.iter().zip(keys).enumerate() {
                inv.key(key);
                inv.arg(op.amount)
                    .arg(op.limit)
                    .arg(&op_mode(op)[..])
                    .arg(script_expiry(op, req));
                if let Some(lease) = lease {
                    let ask = lease.ops.get(o).copied().unwrap_or_default();
                    inv.arg(ask.unused)
                        .arg(ask.want)
                        .arg(alert_values_text(&op.alert_at))
                        .arg(ask.life);
                }
            }
            for grant in candidate.ops.iter().filter_map(|op| op.grant.as_ref()) {
                inv.key(self.grant_key(&grant.key));
            }
        }
        let reply: Vec<Value> = self.invoke(&inv).await?;
        match lease {
            None => Ok((decode_outcome(&reply)?, None)),
            Some(lease) => {
                let (outcome, answer) = decode_leasing_outcome(&reply, lease.ops.len())?;
                Ok((outcome, Some(answer)))
            }
        }
    }
}

/// What a replica gives back and asks for, per op of the one candidate,
/// in a reserve that refills its leases; see `reserve.lua`.
pub(super) struct LeaseAsk<'a> {
    /// `<replica> <longest lease life ms> <share>`.
    pub spec: &'a str,
    pub ops: &'a [OpAsk],
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct OpAsk {
    pub unused: i64,
    pub want: i64,
    /// How long the replica will use the lease, in ms.
    pub life: i64,
}

fn alert_values_text(values: &[i64]) -> String {
    let mut text = String::new();
    for v in values {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(&v.to_string());
    }
    text
}

/// An op's `expiry` for `reserve.lua`, relative to the caller's clock.
fn script_expiry(op: &CounterOp, req: &ReserveRequest) -> Millis {
    match (op.kind, op.expiry) {
        (CounterKind::Gauge, _) => req.reservation_ttl,
        (_, Expiry::Never) => 0,
        (_, Expiry::At(t)) => (t - req.now).max(1) + CLEANUP_GRACE,
        (_, Expiry::AfterFirstUse(d)) => d.max(1),
    }
}
