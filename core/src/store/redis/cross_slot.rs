//! Reserving a decision whose counters span several cluster slots: one
//! `reserve.lua` per slot, in a stable order, undoing the slots already
//! reserved (with `adjust.lua`) when a later one does not fit or fails.
//! Each slot's check and reserve is atomic, so no counter ever passes its
//! cap; an undo that fails leaves its counters charged, on the side of
//! denying rather than overspending.

use super::codec::{decode_replay, encode_replay, encode_reservation, flag, LeaseAnswer};
use super::keys::by_tag;
use super::reserve::{LeaseAsk, OpAsk};
use super::{key_lifetime, RedisStore};
use crate::store::*;

/// What a leasing reserve across slots answers beyond the outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotLeases {
    pub answer: LeaseAnswer,
    /// Per op: its slot's script ran, so it took back the unused lease.
    pub reached: Vec<bool>,
}

impl RedisStore {
    /// A decision whose keys span several cluster slots: one script per
    /// slot, undoing earlier slots when a later one does not fit or fails.
    pub(super) async fn reserve_across_slots(
        &self,
        req: &ReserveRequest,
    ) -> Result<ReserveOutcome, StoreError> {
        self.reserve_across_slots_leasing(req, None)
            .await
            .map(|(outcome, _)| outcome)
    }

    /// The same, giving back and refilling leases in each slot's script
    /// when `lease` is given (one candidate only): the leases granted per
    /// op, and which ops' slots were reached (only those gave back their
    /// unused lease).
    pub(super) async fn reserve_across_slots_leasing(
        &self,
        req: &ReserveRequest,
        lease: Option<&LeaseAsk<'_>>,
    ) -> Result<(ReserveOutcome, Option<SlotLeases>), StoreError> {
        let lease = lease.filter(|_| req.candidates.len() == 1);
        let mut leases = lease.map(|l| SlotLeases {
            answer: LeaseAnswer {
                granted: vec![0; l.ops.len()],
                ..LeaseAnswer::default()
            },
            reached: vec![false; l.ops.len()],
        });
        let replay_tag = self.replay_tag(req);
        let replay = req
            .request_id
            .as_deref()
            .map(|r| self.replay_spot(&replay_tag, r, req.replay_window()));
        if let Some(spot) = &replay {
            let prev = self.kept_replay(spot, req.now).await?;
            // A record that does not read is decided afresh.
            let prev = prev.and_then(|p| decode_replay(&p, req.now).ok().flatten());
            if let Some(outcome) = prev {
                return Ok((outcome, leases));
            }
        }
        // Named for the slot of its request id's outcome, so that a
        // withdrawal finds it there; its record is kept there too.
        let rid = format!("{}.{replay_tag}", req.reservation_id);
        let mut tried = Vec::new();
        let mut applied = None;
        for (ci, candidate) in req.candidates.iter().enumerate() {
            let groups = by_tag(candidate.ops.iter().map(|op| op.key.as_str()));
            let mut states: Vec<Option<CounterState>> = vec![None; candidate.ops.len()];
            let mut done: Vec<usize> = Vec::new();
            let mut fit_result = Fit::Fits;
            for (tag, indices) in &groups {
                let part = Candidate {
                    model: candidate.model.clone(),
                    ops: indices.iter().map(|&i| candidate.ops[i].clone()).collect(),
                };
                let part_asks: Vec<OpAsk> = lease
                    .map(|l| indices.iter().map(|&i| l.ops[i]).collect())
                    .unwrap_or_default();
                let part_lease = lease.map(|l| LeaseAsk {
                    spec: l.spec,
                    ops: &part_asks,
                });
                let out = match self
                    .reserve_in_slot(
                        req,
                        &[&part],
                        tag,
                        &format!("{}.{tag}", req.reservation_id),
                        &rid,
                        false,
                        part_lease.as_ref(),
                    )
                    .await
                {
                    Ok((out, answer)) => {
                        if let (Some(leases), Some(answer)) = (leases.as_mut(), answer) {
                            for (k, &i) in indices.iter().enumerate() {
                                leases.reached[i] = true;
                                leases.answer.granted[i] =
                                    answer.granted.get(k).copied().unwrap_or(0);
                            }
                            leases.answer.early_denials += answer.early_denials;
                            leases.answer.own_blocked += answer.own_blocked;
                        }
                        out
                    }
                    Err(e) => {
                        self.undo(req.now, &rid, candidate, &done).await;
                        return Err(e);
                    }
                };
                for (&i, s) in indices.iter().zip(&out.tried[0]) {
                    states[i] = Some(*s);
                }
                if out.applied.is_some() {
                    done.extend(indices);
                    continue;
                }
                fit_result = fit(&part.ops, |j| out.tried[0][j]);
                break;
            }
            if fit_result != Fit::Fits {
                self.undo(req.now, &rid, candidate, &done).await;
                // The slots not reached are read as their script would
                // have seen them, grants included, and the candidate is
                // judged on all of its ops: an op there that denies
                // outright stops the downgrades here too.
                let missing: Vec<usize> =
                    (0..states.len()).filter(|&i| states[i].is_none()).collect();
                for (i, s) in missing
                    .iter()
                    .zip(self.unreached_states(candidate, &missing, req.now).await?)
                {
                    states[*i] = Some(s);
                }
                fit_result = fit(&candidate.ops, |i| states[i].unwrap_or_default());
            }
            tried.push(states.into_iter().map(Option::unwrap_or_default).collect());
            match fit_result {
                Fit::Fits => {
                    applied = Some(ci);
                    break;
                }
                Fit::TryNext => continue,
                Fit::Blocked => break,
            }
        }
        if let Some(ci) = applied {
            let candidate = &req.candidates[ci];
            let all: Vec<usize> = (0..candidate.ops.len()).collect();
            let keys: Vec<String> = candidate
                .ops
                .iter()
                .map(|op| self.counter_key(&op.key))
                .collect();
            let text = encode_reservation(
                req.now + req.reservation_ttl,
                candidate,
                &keys,
                req.account.as_deref(),
            );
            let stored = self
                .query::<()>(
                    ::redis::cmd("SET")
                        .arg(self.reservation_key(&rid))
                        .arg(text)
                        .arg("PX")
                        .arg(key_lifetime(req.reservation_ttl)),
                )
                .await;
            if let Err(e) = stored {
                self.undo(req.now, &rid, candidate, &all).await;
                return Err(e);
            }
        }
        let outcome = ReserveOutcome {
            applied,
            tried,
            reservation_id: applied.map(|_| rid),
            replayed: false,
        };
        if let Some(spot) = &replay {
            let text = encode_replay(req.now + req.replay_window(), &outcome);
            // The decision stands without it; only a repeat would be
            // decided again.
            if let Err(e) = self.keep_replay(spot, &text, req.now).await {
                tracing::warn!(error = %e, "could not record a request id for replays");
            }
        }
        Ok((outcome, leases))
    }

    /// The states of `candidate`'s ops at `indices` as `reserve.lua` would
    /// report them now, without reserving anything: the counter (a fresh
    /// rolling window resets its length from now) and any active grant.
    async fn unreached_states(
        &self,
        candidate: &Candidate,
        indices: &[usize],
        now: Millis,
    ) -> Result<Vec<CounterState>, StoreError> {
        if indices.is_empty() {
            return Ok(Vec::new());
        }
        let refs: Vec<CounterRef> = indices
            .iter()
            .map(|&i| CounterRef {
                key: candidate.ops[i].key.clone(),
                kind: candidate.ops[i].kind,
            })
            .collect();
        let mut states = self.read_counters(&refs, now, "-", &[]).await?;
        let grant_keys: Vec<&str> = indices
            .iter()
            .filter_map(|&i| candidate.ops[i].grant.as_ref().map(|g| g.key.as_str()))
            .collect();
        let mut grants = self.grants_in_force(&grant_keys, now).await?.into_iter();
        for (&i, s) in indices.iter().zip(states.iter_mut()) {
            let op = &candidate.ops[i];
            s.resets_at = match (op.kind, op.expiry) {
                (CounterKind::Rolling, Expiry::AfterFirstUse(d)) => {
                    s.resets_at.or(Some(now + d.max(1)))
                }
                (CounterKind::Rolling, _) => s.resets_at,
                _ => None,
            };
            if op.grant.is_some() {
                s.grant = grants.next().flatten();
            }
        }
        Ok(states)
    }

    /// Moves each `(key, kind, delta)` in one slot; see `adjust.lua`.
    pub(super) async fn adjust(
        &self,
        now: Millis,
        rid: &str,
        moves: &[(String, CounterKind, i64)],
    ) -> Result<(), StoreError> {
        for group in by_tag(moves.iter().map(|(k, _, _)| k.as_str())).values() {
            let mut inv = self.adjust.prepare_invoke();
            inv.arg(now).arg(rid);
            for &i in group {
                let (key, kind, delta) = &moves[i];
                inv.key(self.counter_key(key))
                    .arg(flag(*kind).to_string())
                    .arg(*delta);
            }
            self.invoke::<String>(&inv).await?;
        }
        Ok(())
    }

    /// Gives back what `candidate`'s ops at `indices` reserved. Best
    /// effort: if it fails, those counters stay charged, on the side of
    /// denying rather than overspending.
    async fn undo(&self, now: Millis, rid: &str, candidate: &Candidate, indices: &[usize]) {
        if indices.is_empty() {
            return;
        }
        let moves: Vec<(String, CounterKind, i64)> = indices
            .iter()
            .map(|&i| {
                let op = &candidate.ops[i];
                (op.key.clone(), op.kind, -op.amount)
            })
            .collect();
        if let Err(e) = self.adjust(now, rid, &moves).await {
            tracing::error!(error = %e, "could not undo a partial reservation across slots; its counters stay charged");
        }
    }
}
