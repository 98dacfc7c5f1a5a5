//! Settling a reservation (`settle.lua` in one slot; across slots,
//! `claim.lua` once and then `adjust.lua` per slot), looking one up, and
//! reading counters for a report (`read.lua`).

use super::codec::{decode_counters, decode_reservation};
use super::keys::{by_tag, slot_tag};
use super::{RedisStore, SETTLED_KEY_LIFETIME};
use crate::store::*;

impl RedisStore {
    pub(super) async fn load_reservation(
        &self,
        id: &str,
    ) -> Result<Option<Reservation>, StoreError> {
        let text: Option<String> = self
            .query(::redis::cmd("GET").arg(self.reservation_key(id)))
            .await?;
        let Some(text) = text else {
            return Ok(None);
        };
        decode_reservation(&text, &self.prefix)
            .map(Some)
            .map_err(|e| StoreError::Unavailable(format!("{e} (id {id})")))
    }

    pub(super) async fn settle_reservation(
        &self,
        id: &str,
        actual: &[i64],
        now: Millis,
    ) -> Result<SettleOutcome, StoreError> {
        let Some(reservation) = self.load_reservation(id).await? else {
            return Ok(SettleOutcome::Unknown);
        };
        let record_tag = id.split_once('.').map(|(_, t)| t);
        let one_slot = !self.cluster()
            || reservation
                .ops
                .iter()
                .all(|op| Some(slot_tag(&op.key)) == record_tag);
        if one_slot {
            let mut inv = self.settle.prepare_invoke();
            inv.key(self.reservation_key(id));
            inv.arg(now)
                .arg(id)
                .arg(SETTLED_RETENTION)
                .arg(SETTLED_KEY_LIFETIME);
            for (i, op) in reservation.ops.iter().enumerate() {
                inv.key(self.counter_key(&op.key));
                inv.arg(actual.get(i).copied().unwrap_or(0));
            }
            let outcome: String = self.invoke(&inv).await?;
            return Ok(match outcome.as_str() {
                "settled" => SettleOutcome::Settled,
                "already_settled" => SettleOutcome::AlreadySettled,
                _ => SettleOutcome::Unknown,
            });
        }
        // Across slots: claim the reservation once, then move each slot.
        let mut inv = self.claim.prepare_invoke();
        inv.key(self.reservation_key(id))
            .arg(now)
            .arg(SETTLED_RETENTION)
            .arg(SETTLED_KEY_LIFETIME);
        let claimed: String = self.invoke(&inv).await?;
        match claimed.as_str() {
            "unknown" => return Ok(SettleOutcome::Unknown),
            "already_settled" => return Ok(SettleOutcome::AlreadySettled),
            _ => {}
        }
        let moves: Vec<(String, CounterKind, i64)> = reservation
            .ops
            .iter()
            .enumerate()
            .map(|(i, op)| {
                (
                    op.key.clone(),
                    op.kind,
                    actual.get(i).copied().unwrap_or(0) - op.amount,
                )
            })
            .collect();
        self.adjust(now, id, &moves).await?;
        Ok(SettleOutcome::Settled)
    }

    /// Settles at zero, then forgets the request id, whose record would
    /// otherwise replay this reservation to a retry.
    pub(super) async fn withdraw_reservation(
        &self,
        id: &str,
        request_id: Option<&str>,
        now: Millis,
    ) -> Result<SettleOutcome, StoreError> {
        let outcome = self.settle_reservation(id, &[], now).await?;
        if let Some(request_id) = request_id {
            self.forget_replay(id, request_id, now).await?;
        }
        Ok(outcome)
    }

    /// Reads counters with what leases hold of them apart: `replica`'s own
    /// unused leases are `own[i]` (it knows them exactly), every other
    /// replica's as of its last refill.
    pub(super) async fn read_counters(
        &self,
        counters: &[CounterRef],
        now: Millis,
        replica: &str,
        own: &[i64],
    ) -> Result<Vec<CounterState>, StoreError> {
        let mut out = vec![CounterState::default(); counters.len()];
        for group in by_tag(counters.iter().map(|c| c.key.as_str())).values() {
            let mut inv = self.read.prepare_invoke();
            for &i in group {
                inv.key(self.counter_key(&counters[i].key));
            }
            inv.arg(now).arg(replica);
            for &i in group {
                inv.arg(own.get(i).copied().unwrap_or(0));
            }
            let values: Vec<i64> = self.invoke(&inv).await?;
            for (&i, state) in group.iter().zip(decode_counters(&values, group.len())?) {
                out[i] = state;
            }
        }
        Ok(out)
    }
}
