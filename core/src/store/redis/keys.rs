//! Key layout. Every key starts with the configured prefix:
//!
//! - `c:{<scope>}<rule>|<unit>|<scope>|<window>`: a counter (a plain
//!   integer; a hash of value `v` and logical end `e` for rolling windows;
//!   a sorted set of reservation ids for concurrency gauges).
//! - `r:{..}<id>`: a reservation, in the slot of the counters it holds.
//! - `q:{..}<hash>`: a request id's outcome, for replays.
//! - `g:{<scope>}<rule>|<scope>`: an approval grant in force, in the slot
//!   of the counters it opens.
//! - `grants`: a hash listing every grant's full record.
//! - `log:<name>`: an append-only stream (the approvals audit trail, the
//!   alert feed), capped at about `MAX_LOG_ENTRIES` entries.
//!
//! Every one of the first four carries a TTL, so counters of removed rules
//! and old windows disappear by themselves. The `{..}` part is the hash tag
//! that picks a cluster slot.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::RedisStore;
use crate::policy::hex;

impl RedisStore {
    pub(super) fn counter_key(&self, key: &str) -> String {
        full_counter_key(&self.prefix, key)
    }

    /// A grant's key (`rule|scope`) shares the slot of the counters of its
    /// scope, so the reserve script can read it.
    pub(super) fn grant_key(&self, key: &str) -> String {
        let tag = key.rsplit('|').next().unwrap_or(key);
        format!("{}g:{{{tag}}}{key}", self.prefix)
    }

    /// Every grant's full record, in one hash for listing.
    pub(super) fn grant_index_key(&self) -> String {
        format!("{}grants", self.prefix)
    }

    pub(super) fn log_key(&self, log: &str) -> String {
        format!("{}log:{log}", self.prefix)
    }

    /// Reservation ids are `<random>` or `<random>.<tag>`; the tag puts the
    /// reservation in the slot of the counters it holds.
    pub(super) fn reservation_key(&self, id: &str) -> String {
        match id.split_once('.') {
            Some((random, tag)) => format!("{}r:{{{tag}}}{random}", self.prefix),
            None => format!("{}r:{{{id}}}", self.prefix),
        }
    }

    pub(super) fn replay_key(&self, tag: &str, request_id: Option<&str>) -> String {
        let hash = request_id
            .map(|r| hex(&Sha256::digest(r.as_bytes())[..16]))
            .unwrap_or_default();
        format!("{}q:{{{tag}}}{hash}", self.prefix)
    }
}

/// `<prefix>c:{<tag>}<key>`: a counter's full Redis key.
pub(super) fn full_counter_key(prefix: &str, key: &str) -> String {
    format!("{prefix}c:{{{}}}{key}", slot_tag(key))
}

/// The counter key inside a full one, if it is a counter under `prefix`.
pub(super) fn counter_name<'a>(prefix: &str, full: &'a str) -> Option<&'a str> {
    let tagged = full.strip_prefix(prefix)?.strip_prefix("c:")?;
    Some(tagged.split_once('}').map_or(tagged, |(_, k)| k))
}

/// The hash tag of a counter: its scope hash (`rule|unit|scope|window`), so
/// that counters of one scope share a cluster slot.
pub(super) fn slot_tag(key: &str) -> &str {
    key.split('|').nth(2).unwrap_or(key)
}

/// Indices of `keys` grouped by hash tag, in a stable order.
pub(super) fn by_tag<'a>(keys: impl Iterator<Item = &'a str>) -> BTreeMap<String, Vec<usize>> {
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, key) in keys.enumerate() {
        groups.entry(slot_tag(key).to_string()).or_default().push(i);
    }
    groups
}
