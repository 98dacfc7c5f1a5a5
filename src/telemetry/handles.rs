//! Metric handles found by one hash of their labels, so that a decision
//! updates its metrics without building a registry key (which allocates
//! its labels and hashes them again) for each one.
//!
//! A map here is keyed by a hash computed once with a random seed, so
//! that labels chosen by clients (a customer id in a scope) cannot aim at
//! one bucket; entries whose hashes collide share a short list.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::RwLock;

use metrics::Counter;

/// Hashes a key that already is a hash: the `u64` itself.
#[derive(Debug, Default)]
pub struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is ever called; fold anything else in anyway.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A map from a precomputed hash to the entries that have it.
pub type ByHash<V> = HashMap<u64, Vec<V>, BuildHasherDefault<Prehashed>>;

/// `tollgate_decisions_total`'s handle for each (result, reason, rule).
/// Results and reasons are fixed names and rules are bounded by the
/// policies loaded, so the set stays small.
#[derive(Debug, Default)]
pub struct DecisionCounters {
    seed: std::collections::hash_map::RandomState,
    known: RwLock<ByHash<(&'static str, &'static str, String, Counter)>>,
}

impl DecisionCounters {
    pub fn increment(&self, result: &'static str, reason: &'static str, rule: &str) {
        let hash = self.seed.hash_one((result, reason, rule));
        let same =
            |e: &&(&str, &str, String, Counter)| e.0 == result && e.1 == reason && e.2 == rule;
        {
            let known = self.known.read().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = known.get(&hash).and_then(|list| list.iter().find(same)) {
                e.3.increment(1);
                return;
            }
        }
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        let list = known.entry(hash).or_default();
        match list.iter().find(same) {
            // Another decision registered it between the two locks.
            Some(e) => e.3.increment(1),
            None => {
                let counter = metrics::counter!(super::names::DECISIONS, "result" => result, "reason" => reason, "rule" => rule.to_string());
                counter.increment(1);
                list.push((result, reason, rule.to_string(), counter));
            }
        }
    }
}
