//! Reading the counters of scopes known only by rule id and display scope
//! (`team=growth,key=checkout-prod`), as the tracked set of scopes and the
//! `usage` command know them.

use super::{Gate, GateError};
use crate::engine::decide::{rule_counter, RuleCounter};
use crate::engine::{Attributes, CounterReport};
use crate::policy::{Attr, Rule};

impl Gate {
    /// The current counters of (rule id, scope) pairs, read in one store
    /// call. Pairs whose rule is no longer in the policy are left out.
    pub async fn read_scopes(
        &self,
        scopes: &[(String, String)],
    ) -> Result<Vec<CounterReport>, GateError> {
        self.read_scopes_within(scopes, self.config.store_timeout)
            .await
    }

    /// [`Gate::read_scopes`] with the store calls bounded by `limit`
    /// rather than the decisions' store timeout: for readers that are not
    /// deciding and can wait (the dashboard).
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
