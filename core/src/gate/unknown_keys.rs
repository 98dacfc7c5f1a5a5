//! A bound on how many unregistered keys are counted apart.
//!
//! Every unregistered key with `per: [key]` rules gets counters of its own.
//! Without a bound, a client sending random keys fills the embedded store
//! (and then every new key, registered or not, is refused) or grows Redis
//! without limit. So each process counts at most `max_unknown_keys` of them
//! apart; the others share one key attribute, [`SHARED_UNKNOWN_KEY`], and
//! with it one set of counters per rule. Registered keys never enter this
//! set and are never affected by it.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::engine::window::Millis;
use crate::engine::Attributes;
use crate::policy::SHARED_UNKNOWN_KEY;

/// A key not seen for this long gives its place up to a newcomer.
const IDLE: Millis = 3_600_000;

#[derive(Debug, Default)]
pub struct UnknownKeyBucket {
    /// The unregistered keys counted apart, with when each was last seen.
    apart: Mutex<HashMap<String, Millis>>,
}

impl UnknownKeyBucket {
    /// Leaves `attrs.key` as it is if that key may be counted apart, and
    /// otherwise moves it to the shared bucket.
    pub fn bound(&self, attrs: &mut Attributes, max: usize, now: Millis) {
        let Some(key) = attrs.key.as_deref() else {
            return;
        };
        let mut apart = self.apart.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(seen) = apart.get_mut(key) {
            *seen = now;
            return;
        }
        if apart.len() >= max {
            // Only when full: one sweep makes room for many newcomers.
            apart.retain(|_, seen| now - *seen < IDLE);
        }
        if apart.len() < max {
            apart.insert(key.to_string(), now);
        } else {
            attrs.key = Some(SHARED_UNKNOWN_KEY.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(bucket: &UnknownKeyBucket, k: &str, max: usize, now: Millis) -> String {
        let mut a = Attributes {
            key: Some(k.to_string()),
            ..Default::default()
        };
        bucket.bound(&mut a, max, now);
        a.key.unwrap()
    }

    #[test]
    fn past_the_bound_keys_share_one_bucket_until_a_place_frees() {
        let b = UnknownKeyBucket::default();
        assert_eq!(key(&b, "sha256:a", 2, 0), "sha256:a");
        assert_eq!(key(&b, "sha256:b", 2, 0), "sha256:b");
        assert_eq!(key(&b, "sha256:c", 2, 0), SHARED_UNKNOWN_KEY);
        // Known ones stay apart.
        assert_eq!(key(&b, "sha256:a", 2, 10), "sha256:a");
        // b idles out; a was seen since, so it stays.
        assert_eq!(key(&b, "sha256:c", 2, IDLE + 1), "sha256:c");
        assert_eq!(key(&b, "sha256:a", 2, IDLE + 2), "sha256:a");
        assert_eq!(key(&b, "sha256:b", 2, IDLE + 3), SHARED_UNKNOWN_KEY);
        // Zero: every unregistered key shares.
        assert_eq!(
            key(&UnknownKeyBucket::default(), "sha256:x", 0, 0),
            SHARED_UNKNOWN_KEY
        );
    }
}
