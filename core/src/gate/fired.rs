//! Which alert markers this process already knows are set, so that a
//! counter past a threshold costs a store call only the first time this
//! process finds it there. Bounded: past the cap the memory is dropped,
//! which costs a few store calls again, never a second alert (the store's
//! marker decides that).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::clock::Millis;
use crate::engine::decide::AlertCrossing;
use crate::store::AlertMarker;

const MAX_KNOWN: usize = 100_000;

#[derive(Debug, Default)]
pub(super) struct FiredMarkers {
    inner: Mutex<Known>,
}

#[derive(Debug, Default)]
struct Known {
    /// Markers the store has answered for, until they go.
    set: HashMap<String, Option<Millis>>,
    /// Markers asked for whose answer was lost, with the token asked with.
    pending: HashMap<String, String>,
}

impl FiredMarkers {
    /// The crossings whose marker is not known to be set, each with the
    /// marker to ask the store for.
    pub(super) fn unknown(
        &self,
        crossings: Vec<AlertCrossing>,
        now: Millis,
    ) -> Vec<(AlertCrossing, AlertMarker)> {
        let known = self.lock();
        crossings
            .into_iter()
            .filter_map(|c| {
                let mut marker = c.marker();
                if known
                    .set
                    .get(&marker.key)
                    .is_some_and(|until| until.is_none_or(|t| t > now))
                {
                    return None;
                }
                marker.token = match known.pending.get(&marker.key) {
                    Some(token) => token.clone(),
                    None => super::new_reservation_id(),
                };
                Some((c, marker))
            })
            .collect()
    }

    /// The store answered for these markers.
    pub(super) fn answered(&self, markers: &[AlertMarker], now: Millis) {
        let mut known = self.lock();
        if known.set.len() + markers.len() > MAX_KNOWN {
            known.set.retain(|_, until| until.is_none_or(|t| t > now));
            if known.set.len() + markers.len() > MAX_KNOWN {
                known.set.clear();
            }
        }
        for m in markers {
            known.pending.remove(&m.key);
            known.set.insert(m.key.clone(), m.expires_at);
        }
    }

    /// The store's answer for these markers was lost: ask again with the
    /// same tokens.
    pub(super) fn unanswered(&self, markers: &[AlertMarker]) {
        let mut known = self.lock();
        if known.pending.len() + markers.len() > MAX_KNOWN {
            // Dropping pending tokens can lose an alert, never repeat one.
            known.pending.clear();
        }
        for m in markers {
            known.pending.insert(m.key.clone(), m.token.clone());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}
