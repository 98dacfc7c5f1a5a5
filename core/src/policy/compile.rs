//! The compiled, immutable form of a policy set: an index that finds the
//! rules matching a request without scanning all of them.
//!
//! Each rule is filed under one *anchor*: a condition whose values are all
//! exact strings, preferring attributes that split traffic finely (key,
//! customer, ...). A request probes one hash bucket per anchored attribute it
//! carries, so the work depends on how many rules share its values, not on
//! how many rules exist. Rules with no exact condition (only globs, or no
//! conditions at all) are checked on every request; they are few in
//! practice and their count is reported by [`CompiledPolicy::unanchored`].

use std::collections::HashMap;

use super::glob::Pattern;
use super::model::*;

/// What the index needs to know about a request.
pub trait AttrLookup {
    /// The single value of an attribute. Never called for `ModelFamily`.
    fn value(&self, attr: &Attr) -> Option<&str>;
    /// Every family the request's model belongs to.
    fn families(&self) -> &[String];
}

#[derive(Debug)]
pub struct CompiledPolicy {
    pub set: PolicySet,
    /// Content hash of the files this set came from.
    pub version: std::sync::Arc<str>,
    anchored: Vec<(Attr, HashMap<String, Vec<u32>>)>,
    unanchored: Vec<u32>,
    keys_by_hash: HashMap<[u8; 32], u32>,
    exact_prices: HashMap<String, u32>,
    glob_prices: Vec<u32>,
    imported_prices: HashMap<String, u32>,
    rules_by_id: HashMap<String, u32>,
    uses_action: bool,
}

impl CompiledPolicy {
    pub fn new(set: PolicySet, version: String) -> CompiledPolicy {
        let mut buckets: HashMap<Attr, HashMap<String, Vec<u32>>> = HashMap::new();
        let mut unanchored = Vec::new();
        for (i, rule) in set.rules.iter().enumerate() {
            let i = i as u32;
            match anchor(rule) {
                Some(cond) => {
                    let bucket = buckets.entry(cond.attr.clone()).or_default();
                    for value in cond.patterns.iter().filter_map(Pattern::exact) {
                        let rules = bucket.entry(value.to_string()).or_default();
                        if rules.last() != Some(&i) {
                            rules.push(i);
                        }
                    }
                }
                None => unanchored.push(i),
            }
        }
        let mut anchored: Vec<_> = buckets.into_iter().collect();
        anchored.sort_by(|a, b| a.0.cmp(&b.0));

        let keys_by_hash = set
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.sha256, i as u32))
            .collect();
        let mut exact_prices = HashMap::new();
        let mut glob_prices = Vec::new();
        for (i, (pattern, _, _)) in set.pricing.models.iter().enumerate() {
            match pattern.exact() {
                Some(name) => {
                    exact_prices.insert(name.to_string(), i as u32);
                }
                None => glob_prices.push(i as u32),
            }
        }
        // The most specific glob wins: a catch-all `*` never hides
        // `gpt-4o*`, wherever each was written.
        glob_prices.sort_by_key(|&i| {
            let text = set.pricing.models[i as usize].0.as_str();
            std::cmp::Reverse(text.chars().filter(|&c| c != '*').count())
        });
        let mut imported_prices = HashMap::new();
        for (i, (name, _, _)) in set.pricing.imported.iter().enumerate() {
            imported_prices.entry(name.clone()).or_insert(i as u32);
        }
        let rules_by_id = set
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| (r.id.clone(), i as u32))
            .collect();
        let uses_action = set.rules.iter().any(|r| {
            r.per.contains(&Attr::Action) || r.conditions.iter().any(|c| c.attr == Attr::Action)
        });
        CompiledPolicy {
            set,
            version: version.into(),
            anchored,
            unanchored,
            keys_by_hash,
            exact_prices,
            glob_prices,
            imported_prices,
            rules_by_id,
            uses_action,
        }
    }

    /// Whether any rule matches or counts by `action`: only then does a
    /// request without one need an action id made up for it.
    pub fn uses_action(&self) -> bool {
        self.uses_action
    }

    /// An empty policy: nothing matches, so everything is allowed.
    pub fn empty() -> CompiledPolicy {
        CompiledPolicy::new(PolicySet::default(), "empty".to_string())
    }

    pub fn rules(&self) -> &[Rule] {
        &self.set.rules
    }

    /// How many rules are checked on every request because they have no
    /// exact-valued condition to be indexed by.
    pub fn unanchored(&self) -> usize {
        self.unanchored.len()
    }

    /// Indices of the rules that match, in declaration order.
    pub fn matching_rules(&self, req: &impl AttrLookup) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::new();
        for (attr, bucket) in &self.anchored {
            if *attr == Attr::ModelFamily {
                for family in req.families() {
                    if let Some(rules) = bucket.get(family.as_str()) {
                        out.extend(rules.iter().map(|&i| i as usize));
                    }
                }
            } else if let Some(value) = req.value(attr) {
                if let Some(rules) = bucket.get(value) {
                    out.extend(rules.iter().map(|&i| i as usize));
                }
            }
        }
        out.extend(self.unanchored.iter().map(|&i| i as usize));
        out.sort_unstable();
        out.dedup();
        out.retain(|&i| {
            self.set.rules[i]
                .conditions
                .iter()
                .all(|c| condition_holds(c, req))
        });
        out
    }

    /// A rule's position in [`rules`](Self::rules), by id.
    pub fn rule_index(&self, id: &str) -> Option<usize> {
        self.rules_by_id.get(id).map(|&i| i as usize)
    }

    /// A rule by id.
    pub fn rule(&self, id: &str) -> Option<&Rule> {
        self.rule_index(id).map(|i| &self.set.rules[i])
    }

    /// The registered key with this SHA-256, if any.
    pub fn key_by_hash(&self, sha256: &[u8; 32]) -> Option<&KeyEntry> {
        self.keys_by_hash
            .get(sha256)
            .map(|&i| &self.set.keys[i as usize])
    }

    /// The price of a model: an exact entry, else the matching glob with the
    /// most literal characters, else an imported catalog's entry, else the
    /// catch-all `"*"`.
    pub fn price(&self, model: &str) -> Option<&ModelPrice> {
        self.priced(model).map(|(p, _, _)| p)
    }

    /// The price of a model, with where it was written and how it was found.
    pub fn priced(&self, model: &str) -> Option<(&ModelPrice, &Origin, PriceSource)> {
        let policy = |i: u32, source| {
            let (_, price, origin) = &self.set.pricing.models[i as usize];
            (price, origin, source)
        };
        if let Some(&i) = self.exact_prices.get(model) {
            return Some(policy(i, PriceSource::Policy));
        }
        let glob = self
            .glob_prices
            .iter()
            .copied()
            .find(|&i| self.set.pricing.models[i as usize].0.matches(model));
        let catch_all = |i: u32| self.set.pricing.models[i as usize].0.as_str() == "*";
        match glob {
            Some(i) if !catch_all(i) => return Some(policy(i, PriceSource::PolicyGlob)),
            _ => {}
        }
        if let Some(&i) = self.imported_prices.get(model) {
            let (_, price, origin) = &self.set.pricing.imported[i as usize];
            return Some((price, origin, PriceSource::Catalog));
        }
        glob.map(|i| policy(i, PriceSource::PolicyGlob))
    }

    /// Every family whose patterns match the model.
    pub fn families_of(&self, model: &str) -> Vec<String> {
        self.set
            .pricing
            .families
            .iter()
            .filter(|(_, (patterns, _))| patterns.iter().any(|p| p.matches(model)))
            .map(|(name, _)| name.clone())
            .collect()
    }
}

fn anchor(rule: &Rule) -> Option<&Condition> {
    let exact =
        |c: &&Condition| !c.patterns.is_empty() && c.patterns.iter().all(|p| p.exact().is_some());
    for attr in Attr::WELL_KNOWN {
        if let Some(c) = rule
            .conditions
            .iter()
            .filter(exact)
            .find(|c| c.attr == attr)
        {
            return Some(c);
        }
    }
    rule.conditions.iter().find(exact)
}

fn condition_holds(cond: &Condition, req: &impl AttrLookup) -> bool {
    if cond.attr == Attr::ModelFamily {
        return req
            .families()
            .iter()
            .any(|f| cond.patterns.iter().any(|p| p.matches(f)));
    }
    match req.value(&cond.attr) {
        Some(v) => cond.patterns.iter().any(|p| p.matches(v)),
        None => false,
    }
}

/// Whether the model a response names (`served`) is the model a request
/// asked for (`decided`): the same name, or a dated snapshot of it, as
/// providers answer (`gpt-4o` is served as `gpt-4o-2024-08-06`,
/// `claude-sonnet-4-5` as `claude-sonnet-4-5-20250929`, a `-latest` alias
/// as the snapshot it stands for, `gemini-1.5-pro` as `gemini-1.5-pro-002`).
/// A snapshot is priced as the model asked for, and is no mismatch.
pub fn same_model(decided: &str, served: &str) -> bool {
    if decided == served {
        return true;
    }
    let base = decided.strip_suffix("-latest").unwrap_or(decided);
    let Some(version) = served
        .strip_prefix(base)
        .and_then(|rest| rest.strip_prefix('-'))
    else {
        return false;
    };
    // A date (2024-08-06, 20250929), a month and day (gpt-4-0613) or a
    // version number (002); anything else names another model
    // (claude-sonnet-4 is not claude-sonnet-4-5).
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    let parts: Vec<&str> = version.split('-').collect();
    match parts[..] {
        [one] => digits(one, 8) || digits(one, 4) || digits(one, 3),
        [y, m, d] => digits(y, 4) && digits(m, 2) && digits(d, 2),
        _ => false,
    }
}

#[cfg(test)]
mod same_model_tests {
    use super::same_model;

    #[test]
    fn a_dated_snapshot_is_the_model_asked_for() {
        for (decided, served) in [
            ("gpt-4o", "gpt-4o"),
            ("gpt-4o", "gpt-4o-2024-08-06"),
            ("gpt-4o-mini", "gpt-4o-mini-2024-07-18"),
            ("gpt-5", "gpt-5-2025-08-07"),
            ("claude-sonnet-4-5", "claude-sonnet-4-5-20250929"),
            ("claude-3-5-sonnet-latest", "claude-3-5-sonnet-20241022"),
            ("gemini-1.5-pro", "gemini-1.5-pro-002"),
            ("gpt-4", "gpt-4-0613"),
        ] {
            assert!(same_model(decided, served), "{decided} served as {served}");
        }
    }

    #[test]
    fn another_model_is_not() {
        for (decided, served) in [
            ("gpt-4o-mini", "gpt-4o"),
            ("gpt-4o", "gpt-4o-mini"),
            ("gpt-4o", "gpt-4o-mini-2024-07-18"),
            ("gpt-4", "gpt-4o-2024-08-06"),
            ("gpt-4o", "gpt-4o-"),
            ("gpt-4o", "gpt-4o-2024--06"),
            ("o1", "o1-pro-2025-03-19"),
            ("claude-sonnet-4", "claude-sonnet-4-5-20250929"),
            ("claude-3-5-haiku-latest", "claude-3-5-sonnet-20241022"),
        ] {
            assert!(!same_model(decided, served), "{decided} served as {served}");
        }
    }
}
