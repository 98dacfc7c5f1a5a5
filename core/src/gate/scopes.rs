//! Reading the counters of scopes known only by rule id and display scope
//! (`team=growth,key=checkout-prod`), as the tracked set of scopes and the
//! `usage` command know them.

use super::{Gate, GateError};
use crate::engine::decide::{rule_counter, RuleCounter};
use crate::engine::{Attributes, CounterReport};
use crate::policy::{Attr, Rule};

/// Scopes read in one store call by a reader of many (a usage report, the
/// dashboard): one call over thousands holds Redis for longer than a
/// decision waits.
pub const SCOPES_PER_READ: usize = 100;

/// How long a reader that is not deciding waits for each such call: a
/// busy store that a decision would give up on (the decisions' store
/// timeout, 50 ms by default) still answers it.
pub const READER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl Gate {
    /// Every scope's counters, [`SCOPES_PER_READ`] a store call, each call
    /// bounded by [`READER_TIMEOUT`]: all of them or the first error, so
    /// that a report never sums a part as if it were the whole.
    pub async fn read_all_scopes(
        &self,
        scopes: &[(String, String)],
    ) -> Result<Vec<CounterReport>, GateError> {
        let mut counters = Vec::with_capacity(scopes.len());
        for slice in scopes.chunks(SCOPES_PER_READ) {
            counters.extend(self.read_scopes_within(slice, READER_TIMEOUT).await?);
        }
        Ok(counters)
    }

    /// The current counters of (rule id, scope) pairs, read in one store
    /// call bounded by `limit`. Pairs whose rule is no longer in the
    /// policy are left out.
    pub async fn read_scopes_within(
        &self,
        scopes: &[(String, String)],
        limit: std::time::Duration,
    ) -> Result<Vec<CounterReport>, GateError> {
        let policy = self.policy.load_full();
        let now = self.clock.now();
        let counters: Vec<RuleCounter> = scopes
            .iter()
            .filter_map(|(rule_id, scope)| {
                let i = policy.rule_index(rule_id)?;
                let attrs = scope_attributes(&policy.rules()[i], scope)?;
                let counter = rule_counter(&policy, i, &attrs, now).ok()?;
                // A value holding the separator itself cannot be parsed
                // back; such a scope is left out rather than misread.
                (&counter.scope == scope).then_some(counter)
            })
            .collect();
        self.report_within(&policy, &counters, now, limit).await
    }
}

/// The attributes a display scope was made from: `per` names in order,
/// each as `name=value`, joined by commas.
fn scope_attributes(rule: &Rule, scope: &str) -> Option<Attributes> {
    let mut attrs = Attributes::default();
    if rule.per.is_empty() {
        return (scope == "all").then_some(attrs);
    }
    let mut rest = scope;
    for (i, attr) in rule.per.iter().enumerate() {
        rest = rest.strip_prefix(&attr.to_string())?.strip_prefix('=')?;
        let end = match rule.per.get(i + 1) {
            Some(next) => rest.find(&format!(",{next}="))?,
            None => rest.len(),
        };
        let value = rest[..end].to_string();
        match attr {
            Attr::ModelFamily => attrs.families = vec![value],
            other => attrs.set(other, value),
        }
        rest = rest.get(end + 1..).unwrap_or("");
    }
    Some(attrs)
}
