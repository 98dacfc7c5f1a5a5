//! The spend account as the gate writes it: every allowed reservation adds
//! its estimate to the `estimated` side of its row; a settle takes that
//! estimate back out and adds what the call really used to the `settled`
//! side. An estimate nobody settles stays estimated, which is what the
//! report shows apart. Changes gather here and go to the store in one
//! batch a second (see [`Gate::flush_spend`](super::Gate::flush_spend)),
//! never on a decision's path.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::engine::charge::{cost, Usage};
use crate::engine::Attributes;
use crate::policy::CompiledPolicy;
use crate::store::spend::{to_micros, to_pico, Day};
use crate::store::{SpendDelta, SpendDims, SpendEntry};

/// Rows gathered between two flushes; past this, new rows go into `other`
/// until the next flush, so a flood of distinct owners cannot grow memory.
const MAX_PENDING_ROWS: usize = 50_000;

/// Separates the parts of an account tag: the owner, then one entry per
/// model the call may run as.
const PART: char = '\u{1e}';
/// Separates a model from its estimate in a tag.
const MODEL: char = '\u{1d}';

/// What the reservation carries so that the settling replica can move the
/// estimate: the owner dimensions but the model's, and the estimate for
/// each model the decision may have chosen (the request's, then each
/// downgrade's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct AccountTag {
    /// The day the call was decided on: its estimate and its settled
    /// usage both count on that day, whenever the settle comes.
    pub day: Day,
    /// Every dimension but the model and its family, which come from the
    /// model the reservation holds.
    pub owner: SpendDims,
    pub estimates: Vec<(String, SpendEntry)>,
}

impl AccountTag {
    pub(super) fn to_text(&self) -> String {
        let mut out = self.day.to_string();
        out.push(PART);
        out.push_str(&self.owner.to_text());
        for (model, entry) in &self.estimates {
            out.push(PART);
            out.push_str(model);
            out.push(MODEL);
            out.push_str(&entry.to_text());
        }
        out
    }

    pub(super) fn from_text(text: &str) -> Option<AccountTag> {
        let mut parts = text.split(PART);
        let day = parts.next()?.parse().ok()?;
        let owner = SpendDims::from_text(parts.next()?)?;
        let estimates = parts
            .map(|p| {
                let (model, entry) = p.split_once(MODEL)?;
                Some((model.to_string(), SpendEntry::from_text(entry)?))
            })
            .collect::<Option<_>>()?;
        Some(AccountTag {
            day,
            owner,
            estimates,
        })
    }

    /// The estimate recorded for a reservation that runs `model`.
    pub(super) fn estimate(&self, model: Option<&str>) -> Option<&SpendEntry> {
        let model = crate::store::spend::clean(model.unwrap_or(""));
        self.estimates
            .iter()
            .find(|(m, _)| *m == model)
            .map(|(_, e)| e)
    }
}

/// The owner dimensions of a request, its model and family left empty.
pub(super) fn owner(attrs: &Attributes) -> SpendDims {
    SpendDims::new([
        None,
        None,
        attrs.team.as_deref(),
        attrs.key.as_deref(),
        attrs.workflow.as_deref(),
        attrs.environment.as_deref(),
        attrs.customer.as_deref(),
        attrs.modality.as_deref(),
    ])
}

/// `owner` with `model` and its first family filled in.
pub(super) fn row(policy: &CompiledPolicy, owner: &SpendDims, model: Option<&str>) -> SpendDims {
    let mut dims = owner.clone();
    if let Some(model) = model {
        dims.0[0] = crate::store::spend::clean(model);
        dims.0[1] = policy
            .families_of(model)
            .into_iter()
            .next()
            .unwrap_or_default();
    }
    dims
}

/// Counts past this are clamped: the same bound as a counter's, so that
/// sums of many entries still fit.
const MAX_COUNT: u64 = 1 << 52;

/// One call's usage as an account entry, priced at `model`'s price (an
/// unpriced model's spend counts 0; no rule charged it either). `None`
/// when the model has a price the usage cannot be priced at (counts past
/// every bound): the caller books the estimate instead, as the counters do.
pub(super) fn entry(
    policy: &CompiledPolicy,
    model: Option<&str>,
    usage: &Usage,
    reasoning_tokens: u64,
) -> Option<SpendEntry> {
    let spend = match model.and_then(|m| Some((m, policy.price(m)?))) {
        Some((m, price)) => to_pico(cost(price, usage, m).ok()?),
        None => 0,
    };
    let n = |x: u64| x.min(MAX_COUNT) as i64;
    Some(SpendEntry {
        requests: 1,
        input_tokens: n(usage.input_tokens),
        cached_input_tokens: n(usage.cached_input_tokens),
        output_tokens: n(usage.output_tokens),
        reasoning_tokens: n(reasoning_tokens),
        images: n(usage.images),
        video_us: to_micros(usage.video_seconds),
        audio_us: to_micros(usage.audio_seconds),
        spend_pico: spend,
    })
}

/// Changes not yet written to the store.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    pending: Mutex<HashMap<(Day, SpendDims, bool), SpendEntry>>,
    /// A batch whose store call failed or timed out, with its id: sent
    /// again as it was, so that the store can tell if it already has it.
    unsent: Mutex<Option<(String, Vec<SpendDelta>)>>,
}

impl Ledger {
    pub(super) fn add(&self, day: Day, dims: SpendDims, settled: bool, e: SpendEntry) {
        if e.is_zero() {
            return;
        }
        let mut pending = self.lock();
        let key = if pending.len() >= MAX_PENDING_ROWS
            && !pending.contains_key(&(day, dims.clone(), settled))
        {
            (day, SpendDims::other(), settled)
        } else {
            (day, dims, settled)
        };
        pending.entry(key).or_default().add(&e);
    }

    /// The next batch to send: the one that failed last, as it was, or
    /// else everything gathered so far under a fresh id.
    pub(super) fn next_batch(&self) -> Option<(String, Vec<SpendDelta>)> {
        if let Some(unsent) = self.unsent_lock().take() {
            return Some(unsent);
        }
        let deltas: Vec<SpendDelta> = self
            .lock()
            .drain()
            .map(|((day, dims, settled), entry)| SpendDelta {
                day,
                dims,
                settled,
                entry,
            })
            .collect();
        (!deltas.is_empty()).then(|| (super::new_reservation_id(), deltas))
    }

    /// The store did not confirm this batch: it goes again, first.
    pub(super) fn unsent(&self, batch: (String, Vec<SpendDelta>)) {
        *self.unsent_lock() = Some(batch);
    }

    fn unsent_lock(&self) -> std::sync::MutexGuard<'_, Option<(String, Vec<SpendDelta>)>> {
        self.unsent.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Day, SpendDims, bool), SpendEntry>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_reads_back() {
        let tag = AccountTag {
            day: 20_423,
            owner: SpendDims::new([
                None,
                None,
                Some("growth"),
                Some("sha256:ab"),
                None,
                Some("prod"),
                None,
                Some("text"),
            ]),
            estimates: vec![
                (
                    "gpt-4o".to_string(),
                    SpendEntry {
                        requests: 1,
                        spend_pico: 52_500_000_000,
                        ..Default::default()
                    },
                ),
                (
                    "gpt-4o-mini".to_string(),
                    SpendEntry {
                        requests: 1,
                        output_tokens: 9,
                        ..Default::default()
                    },
                ),
            ],
        };
        let text = tag.to_text();
        assert!(!text.contains(['\n', '\t']));
        assert_eq!(AccountTag::from_text(&text), Some(tag.clone()));
        assert_eq!(tag.estimate(Some("gpt-4o-mini")).unwrap().output_tokens, 9);
        assert_eq!(tag.estimate(Some("o3")), None);
    }
}
