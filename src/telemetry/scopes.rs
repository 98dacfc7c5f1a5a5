//! The bounded set of (rule, scope) pairs this process has seen, with the
//! metric handles of each, so that a decision updates its gauges without
//! a registry lookup.
//!
//! Scopes are what bounds metric cardinality: rule ids are bounded by the
//! policy, but a `per: [customer]` rule has as many scopes as customers.
//! Past `max` pairs, new ones are not tracked: their decisions are counted
//! under `scope="other"` and in an overflow counter.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::RwLock;

use metrics::{Counter, Gauge};
use rust_decimal::prelude::ToPrimitive;

use super::handles::ByHash;
use super::names;
use tollgate_core::engine::CounterReport;

const SHARDS: usize = 16;

#[derive(Debug)]
struct Tracked {
    rule: String,
    scope: String,
    used: Gauge,
    limit: Gauge,
    /// The limit last set, as `f64` bits: a limit changes only with the
    /// policy, so most decisions leave its gauge alone.
    limit_set: AtomicU64,
    decisions: Counter,
}

impl Tracked {
    fn is(&self, rule: &str, scope: &str) -> bool {
        self.scope == scope && self.rule == rule
    }
}

/// The pairs of one shard, by the hash of (rule, scope) that also chose
/// the shard: one hash per report.
type Shard = ByHash<Tracked>;

#[derive(Debug)]
pub struct ScopeTracker {
    shards: Vec<RwLock<Shard>>,
    hasher: std::collections::hash_map::RandomState,
    len: AtomicUsize,
    max: usize,
    overflowed: AtomicU64,
    /// Each rule's `scope="other"` decisions counter, and the overflow
    /// counter, taken from the registry at first use (after the recorder
    /// is installed), so that a scope past the set costs no registry
    /// lookup either. Rules are bounded by the policy.
    other: RwLock<HashMap<String, Counter>>,
    overflow_total: std::sync::OnceLock<Counter>,
}

impl ScopeTracker {
    pub fn new(max: usize) -> ScopeTracker {
        ScopeTracker {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            hasher: Default::default(),
            len: AtomicUsize::new(0),
            max,
            overflowed: AtomicU64::new(0),
            other: RwLock::new(HashMap::new()),
            overflow_total: std::sync::OnceLock::new(),
        }
    }

    fn hash(&self, rule: &str, scope: &str) -> u64 {
        let mut h = self.hasher.build_hasher();
        rule.hash(&mut h);
        scope.hash(&mut h);
        h.finish()
    }

    /// Records a counter's standing as a decision reported it; true when
    /// the pair is tracked from now on.
    pub fn observe(&self, report: &CounterReport) -> bool {
        let (rule, scope) = (report.rule.as_str(), report.scope.as_str());
        let hash = self.hash(rule, scope);
        let shard = &self.shards[hash as usize % SHARDS];
        {
            let map = shard.read().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = map
                .get(&hash)
                .and_then(|l| l.iter().find(|t| t.is(rule, scope)))
            {
                set(t, report);
                return false;
            }
        }
        // Once the set is full, untracked scopes never take the write lock.
        if self.len.load(Ordering::Acquire) >= self.max {
            self.overflow(report);
            return false;
        }
        let mut map = shard.write().unwrap_or_else(|e| e.into_inner());
        let same_hash = map.entry(hash).or_default();
        if let Some(t) = same_hash.iter().find(|t| t.is(rule, scope)) {
            set(t, report);
            return false;
        }
        if !self.take_slot() {
            drop(map);
            self.overflow(report);
            return false;
        }
        let labels = [
            ("rule", report.rule.clone()),
            ("scope", report.scope.clone()),
            ("unit", report.unit.name().to_string()),
        ];
        let t = Tracked {
            rule: report.rule.clone(),
            scope: report.scope.clone(),
            used: metrics::gauge!(names::USAGE_USED, &labels),
            limit: metrics::gauge!(names::USAGE_LIMIT, &labels),
            limit_set: AtomicU64::new(f64::NAN.to_bits()),
            decisions: metrics::counter!(names::USAGE_DECISIONS, &labels[..2]),
        };
        set(&t, report);
        same_hash.push(t);
        true
    }

    fn overflow(&self, report: &CounterReport) {
        self.overflowed.fetch_add(1, Ordering::Relaxed);
        self.overflow_total
            .get_or_init(|| metrics::counter!(names::USAGE_SCOPES_OVERFLOW))
            .increment(1);
        let known = self.other.read().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = known.get(&report.rule) {
            c.increment(1);
            return;
        }
        drop(known);
        self.other
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(report.rule.clone())
            .or_insert_with(|| {
                metrics::counter!(names::USAGE_DECISIONS, "rule" => report.rule.clone(), "scope" => "other")
            })
            .increment(1);
    }

    fn take_slot(&self) -> bool {
        self.len
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Every tracked (rule, scope), sorted.
    pub fn list(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .shards
            .iter()
            .flat_map(|s| {
                let map = s.read().unwrap_or_else(|e| e.into_inner());
                map.values()
                    .flatten()
                    .map(|t| (t.rule.clone(), t.scope.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort();
        out
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Reports about scopes that found the set full.
    pub fn overflowed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }
}

fn set(t: &Tracked, r: &CounterReport) {
    t.used.set(r.used.to_f64().unwrap_or(f64::MAX));
    let limit = r.limit.to_f64().unwrap_or(f64::MAX);
    // Two decisions racing across a reload can leave the gauge at the
    // older limit until the limit next changes; it never holds a limit
    // no policy had.
    if t.limit_set.swap(limit.to_bits(), Ordering::Relaxed) != limit.to_bits() {
        t.limit.set(limit);
    }
    t.decisions.increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::Decimal;
    use tollgate_core::policy::{Unit, Window};

    fn report(rule: &str, scope: &str) -> CounterReport {
        CounterReport {
            rule: rule.to_string(),
            scope: scope.to_string(),
            unit: Unit::Requests,
            window: Window::Lifetime,
            limit: Decimal::from(10),
            used: Decimal::from(1),
            leased: Decimal::ZERO,
            remaining: Decimal::from(9),
            resets_at: None,
            enforced: true,
        }
    }

    #[test]
    fn holds_at_most_max_pairs() {
        let t = ScopeTracker::new(2);
        t.observe(&report("a", "team=x"));
        t.observe(&report("a", "team=x"));
        t.observe(&report("b", "all"));
        t.observe(&report("a", "team=y"));
        t.observe(&report("a", "team=z"));
        assert_eq!(
            t.list(),
            vec![
                ("a".to_string(), "team=x".to_string()),
                ("b".to_string(), "all".to_string())
            ]
        );
        assert_eq!(t.len(), 2);
        assert_eq!(t.overflowed(), 2);
    }
}
