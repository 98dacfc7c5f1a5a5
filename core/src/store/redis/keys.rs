//! Key layout. Every key starts with the configured prefix:
//!
//! - `c:{<scope>}<rule>|<unit>|<scope>|<window>`: a counter (a plain
//!   integer; a hash of value `v` and logical end `e` for rolling windows;
//!   a sorted set of reservation ids for concurrency gauges).
//! - `r:{..}<id>`: a reservation, in the slot of the counters it holds.
//! - `q:{..}<shard>.<span>.<bucket>`: request ids' outcomes, for replays:
//!   a hash of the id's hash to its outcome (see `replays.rs`).
//! - `g:{<scope>}<rule>|<scope>`: an approval grant in force, in the slot
//!   of the counters it opens.
//! - `a:{<scope>}<counter>|<threshold>|<window end>`: an alert marker, set
//!   once when its threshold fires, living until its window ends.
//! - `grants`: a hash listing every grant's full record, pruned of expired
//!   grants, capped at `MAX_GRANTS`, expiring with its longest grant.
//! - `log:<name>`: an append-only stream (the approvals audit trail, the
//!   alert feed), capped at about `LogBounds::max_entries` entries and
//!   deleted `LogBounds::retention` after its last entry.
//!
//! Every key carries a TTL or a cap, so counters of removed rules and old
//! windows disappear by themselves; only the counters and markers of
//! lifetime rules live for ever, one per rule and scope. The `{..}` part is the hash tag
//! that picks a cluster slot.

use std::collections::BTreeMap;

use super::RedisStore;

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

    /// An alert marker (`<counter key>|<threshold>|<end>`), in its
    /// counter's slot.
    pub(super) fn alert_marker_key(&self, marker: &str) -> String {
        format!("{}a:{{{}}}{marker}", self.prefix, slot_tag(marker))
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

    /// Where `flush.lua` marks batch `id` applied, in the slot `tag`.
    pub(super) fn batch_key(&self, tag: &str, id: &str) -> String {
        format!("{}fb:{{{tag}}}{id}", self.prefix)
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
