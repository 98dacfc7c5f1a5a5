//! The models seen in traffic that have no price, for `tollgate pricing
//! missing`: a bounded map per process, so a client naming random models
//! cannot grow it without limit.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::engine::window::Millis;

/// Distinct model names kept; requests for others past the bound are only
/// counted.
pub const MAX_UNPRICED_MODELS: usize = 1000;

/// Longest model name kept; longer ones are cut at a character boundary.
const MAX_NAME: usize = 256;

/// One model seen without a price.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnpricedModel {
    pub model: String,
    /// Requests that named it since the process started.
    pub requests: u64,
    pub first_seen: Millis,
    pub last_seen: Millis,
}

#[derive(Debug, Default)]
pub struct UnpricedSeen {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    models: HashMap<String, UnpricedModel>,
    /// Requests for models past the bound.
    overflow: u64,
}

impl UnpricedSeen {
    pub fn seen(&self, model: &str, now: Millis) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = inner.models.get_mut(model) {
            m.requests += 1;
            m.last_seen = now;
            return;
        }
        if inner.models.len() >= MAX_UNPRICED_MODELS {
            inner.overflow += 1;
            return;
        }
        let mut name = model.to_string();
        if name.len() > MAX_NAME {
            let mut end = MAX_NAME;
            while !name.is_char_boundary(end) {
                end -= 1;
            }
            name.truncate(end);
        }
        inner.models.insert(
            model.to_string(),
            UnpricedModel {
                model: name,
                requests: 1,
                first_seen: now,
                last_seen: now,
            },
        );
    }

    /// Every model kept, most requested first, and the requests past the
    /// bound.
    pub fn list(&self) -> (Vec<UnpricedModel>, u64) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut models: Vec<UnpricedModel> = inner.models.values().cloned().collect();
        models.sort_by(|a, b| b.requests.cmp(&a.requests).then(a.model.cmp(&b.model)));
        (models, inner.overflow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_models_and_stays_bounded() {
        let seen = UnpricedSeen::default();
        seen.seen("a", 1);
        seen.seen("b", 2);
        seen.seen("a", 3);
        let (models, overflow) = seen.list();
        assert_eq!(models[0].model, "a");
        assert_eq!(
            (
                models[0].requests,
                models[0].first_seen,
                models[0].last_seen
            ),
            (2, 1, 3)
        );
        assert_eq!(overflow, 0);
        for i in 0..2 * MAX_UNPRICED_MODELS {
            seen.seen(&format!("m{i}"), 4);
        }
        let (models, overflow) = seen.list();
        assert_eq!(models.len(), MAX_UNPRICED_MODELS);
        assert_eq!(overflow, MAX_UNPRICED_MODELS as u64 + 2);
    }
}
