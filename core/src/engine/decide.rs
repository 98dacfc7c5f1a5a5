//! From request to counter operations ([`plan`]), and from the store's
//! answer to a decision ([`decide`]).

use rust_decimal::Decimal;
use sha2::{Digest, Sha256};

use super::charge::{counter_amount, from_counter, to_counter, Basis, LearnedOutput, Usage};
use super::request::{Attributes, Estimate};
use super::window::{self, format_in, seconds_until, Millis};
use super::RequestError;
use crate::policy::{hex, CompiledPolicy, Enforcement, Limit, OnExceed, Rule, Unit, Window};
use crate::store::{
    fit, Candidate, CounterKind, CounterOp, CounterState, Expiry, Fit, GrantRef, ReserveOutcome,
};

/// Counters of a calendar window outlive it by this much, so a late settle
/// still finds them; the window id in the key keeps them from being reused.
pub const EXPIRY_GRACE: Millis = 3_600_000;

/// How long a client should wait before retrying a concurrency denial.
pub const CONCURRENCY_RETRY_SECS: u64 = 1;

/// A budget that resets within this many seconds is worth a retry, by
/// default (`--retry-within`).
pub const DEFAULT_RETRY_WITHIN_SECS: u64 = 60;

/// The longest wait ever paired with "retry": the OpenAI SDKs give up on a
/// Retry-After above 120 s before they read `x-should-retry`.
pub const MAX_RETRY_WITHIN_SECS: u64 = 120;

/// Longest downgrade chain followed (the model asked for, then two more).
const MAX_CANDIDATES: usize = 3;

/// The counters one rule uses for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleCounter {
    pub rule: usize,
    pub key: String,
    /// `team=growth,key=checkout-prod`, or `all` for a shared counter.
    pub scope: String,
    /// What the scope is keyed by: counters and grants use this.
    pub scope_hash: String,
    pub limit: i64,
    pub window_start: Option<Millis>,
    pub window_end: Option<Millis>,
}

/// What the store is asked to do, plus what is needed to explain it.
#[derive(Debug, Clone)]
pub struct Plan {
    pub candidates: Vec<Candidate>,
    /// Parallel to each candidate's ops: which rule and scope each op is.
    pub counters: Vec<Vec<RuleCounter>>,
    /// Every rule the request as asked matches, charged or not.
    pub matched: Vec<usize>,
    /// The caller cannot switch models, so the downgrade candidates were
    /// dropped: a request over a downgrading budget is refused, naming
    /// the model it may ask for instead.
    pub downgrades_withheld: bool,
}

impl Plan {
    /// Keeps only the model asked for. A downgrade that nobody puts into
    /// effect would charge the cheap price for the expensive call.
    pub fn withhold_downgrades(&mut self) {
        if self.candidates.len() > 1 {
            self.candidates.truncate(1);
            self.counters.truncate(1);
            self.downgrades_withheld = true;
        }
    }

    /// True when no counter needs touching: the decision needs no store.
    pub fn is_free(&self) -> bool {
        self.candidates.iter().all(|c| c.ops.is_empty())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
    Downgrade,
}

impl Verdict {
    /// The name metrics and the decision log use.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Downgrade => "downgrade",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Allowed,
    Downgraded,
    BudgetExceeded,
    ConcurrencyLimit,
    ApprovalRequired,
    /// The store could not be reached and every matched rule fails open.
    StoreUnavailableFailOpen,
    /// The API key is not registered and the policy denies unknown keys.
    UnknownKey,
    /// A rule with a limit of zero: the model or route is blocked.
    Blocked,
}

impl Reason {
    pub fn code(self) -> &'static str {
        match self {
            Reason::Allowed => "allowed",
            Reason::Downgraded => "downgraded",
            Reason::BudgetExceeded => "budget_exceeded",
            Reason::ConcurrencyLimit => "concurrency_limit",
            Reason::ApprovalRequired => "approval_required",
            Reason::StoreUnavailableFailOpen => "store_unavailable_fail_open",
            Reason::UnknownKey => "unknown_key",
            Reason::Blocked => "blocked",
        }
    }
}

/// A counter's standing after (or, for a denial, without) this request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterReport {
    pub rule: String,
    pub scope: String,
    pub unit: Unit,
    pub window: Window,
    pub limit: Decimal,
    pub used: Decimal,
    /// Counted in the store but held unspent in replicas' leases: neither
    /// used nor remaining (see the store's leases).
    pub leased: Decimal,
    pub remaining: Decimal,
    pub resets_at: Option<Millis>,
    pub enforced: bool,
}

/// An alert threshold a counter has reached, with this request's
/// reservation counted. The gate fires it once per counter and window (see
/// [`AlertCrossing::marker`]), at the first decision that finds it reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertCrossing {
    /// The counter's store key: what the threshold's marker is kept under.
    pub counter: String,
    pub rule: String,
    pub scope: String,
    pub threshold: u32,
    pub unit: Unit,
    pub used: Decimal,
    /// The rule's own limit: thresholds are percentages of it, granted
    /// extras aside.
    pub limit: Decimal,
    /// The counter's window, as far as it is known (a rolling window's
    /// start is known from its end; a lifetime has neither).
    pub window_start: Option<Millis>,
    pub window_end: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
    /// For people: names the rule, the scope, the limit and the reset.
    pub message: String,
    pub rule: Option<String>,
    pub scope: Option<String>,
    /// The model to call instead, on a downgrade.
    pub model: Option<String>,
    /// Whole seconds to wait, rounded up; `retry_after_ms` is exact.
    pub retry_after: Option<u64>,
    pub retry_after_ms: Option<u64>,
    /// Whether retrying the same request after `retry_after` can succeed:
    /// what clients are told in `x-should-retry`.
    pub retryable: bool,
    /// Most constrained first.
    pub counters: Vec<CounterReport>,
    pub alerts: Vec<AlertCrossing>,
    pub reservation_id: Option<String>,
    /// The action id tollgate made up for a request that had none; the
    /// caller should send it with the retries and fallbacks of this action.
    pub action_id: Option<String>,
    /// The version of the policy that made this decision, and the clock
    /// reading it was made at (both set by the gate).
    pub policy_version: std::sync::Arc<str>,
    pub decided_at: Millis,
    /// The output tokens learned from settled calls that the reservation
    /// assumed for the model decided, when it assumed any (set by the
    /// gate): what a stream's top-ups start from.
    pub learned_output_tokens: Option<u64>,
}

impl Decision {
    pub fn allow_unmetered() -> Decision {
        Decision {
            verdict: Verdict::Allow,
            reason: Reason::Allowed,
            message: "no budget applies to this request".to_string(),
            rule: None,
            scope: None,
            model: None,
            retry_after: None,
            retry_after_ms: None,
            retryable: false,
            counters: Vec::new(),
            alerts: Vec::new(),
            reservation_id: None,
            action_id: None,
            policy_version: std::sync::Arc::from(""),
            decided_at: 0,
            learned_output_tokens: None,
        }
    }
}

/// Finds the matching rules and the counter operations for the request as
/// asked and for each downgrade it may fall back to.
pub fn plan(
    policy: &CompiledPolicy,
    attrs: &Attributes,
    estimate: &Estimate,
    now: Millis,
) -> Result<Plan, RequestError> {
    plan_with(policy, attrs, estimate, &LearnedOutput::default(), now)
}

/// [`plan`], with the output tokens learned for the request's workflow
/// (the gate's table, as data), used where the policy learns them and the
/// request names no maximum.
pub fn plan_with(
    policy: &CompiledPolicy,
    attrs: &Attributes,
    estimate: &Estimate,
    learned: &LearnedOutput,
    now: Millis,
) -> Result<Plan, RequestError> {
    estimate.validate()?;
    attrs.validate()?;
    let mut plan = Plan {
        candidates: Vec::new(),
        counters: Vec::new(),
        matched: Vec::new(),
        downgrades_withheld: false,
    };
    let mut attrs = attrs.clone();
    loop {
        attrs.families = attrs
            .model
            .as_deref()
            .map(|m| policy.families_of(m))
            .unwrap_or_default();
        let matched = policy.matching_rules(&attrs);
        if plan.candidates.is_empty() {
            plan.matched.clone_from(&matched);
        }
        let price = attrs.model.as_deref().and_then(|m| policy.price(m));
        let usage = Usage::from_estimate(
            estimate,
            &Basis {
                model: attrs.model.as_deref(),
                modality: attrs.modality.as_deref(),
                price,
                defaults: &policy.set.defaults,
                learned_output: learned.get(policy, attrs.model.as_deref()),
            },
        );
        let mut ops = Vec::with_capacity(matched.len());
        let mut counters = Vec::with_capacity(matched.len());
        let mut downgrade_to = None;
        for &i in &matched {
            let rule = &policy.rules()[i];
            let amount = counter_amount(rule.limit.unit, &usage, price, attrs.model.as_deref())?;
            let gate = rule.enforcement == Enforcement::Approval;
            // An approval gate must be asked even when it charges nothing.
            if amount == 0 && !gate {
                continue;
            }
            let counter = rule_counter(policy, i, &attrs, now)?;
            let grant = (gate || rule.on_exceed == OnExceed::Approval).then(|| GrantRef {
                key: grant_key(&rule.id, &counter.scope_hash),
                required: gate,
            });
            let downgradable = matches!(&rule.on_exceed, OnExceed::Downgrade(_));
            if let (OnExceed::Downgrade(target), None) = (&rule.on_exceed, &downgrade_to) {
                downgrade_to = Some(target.clone());
            }
            ops.push(CounterOp {
                key: counter.key.clone(),
                unit: rule.limit.unit,
                amount,
                limit: counter.limit,
                enforced: rule.enforcement != Enforcement::Soft,
                downgradable,
                expiry: expiry(rule.limit.window, counter.window_end),
                kind: counter_kind(&rule.limit),
                grant,
                alert_at: alert_values(&rule.alerts, counter.limit),
            });
            counters.push(counter);
        }
        plan.candidates.push(Candidate {
            model: attrs.model.clone(),
            ops,
        });
        plan.counters.push(counters);
        let next = downgrade_to.filter(|m| {
            plan.candidates.len() < MAX_CANDIDATES
                && !plan
                    .candidates
                    .iter()
                    .any(|c| c.model.as_deref() == Some(m.as_str()))
        });
        match next {
            Some(model) => attrs.model = Some(model),
            None => return Ok(plan),
        }
    }
}

/// The counters of every rule matching `attrs`, charged or not: what a
/// usage report reads. A rule counted `per` an attribute that `attrs` lack
/// has no one counter to report, so it is left out rather than fail the
/// whole report.
pub fn scope_counters(
    policy: &CompiledPolicy,
    attrs: &Attributes,
    now: Millis,
) -> Result<Vec<RuleCounter>, RequestError> {
    attrs.validate()?;
    let mut attrs = attrs.clone();
    attrs.families = attrs
        .model
        .as_deref()
        .map(|m| policy.families_of(m))
        .unwrap_or_default();
    policy
        .matching_rules(&attrs)
        .into_iter()
        .map(|i| rule_counter(policy, i, &attrs, now))
        .filter(|c| !matches!(c, Err(RequestError::MissingAttribute { .. })))
        .collect()
}

/// The counter one rule uses for these attributes.
pub fn rule_counter(
    policy: &CompiledPolicy,
    i: usize,
    attrs: &Attributes,
    now: Millis,
) -> Result<RuleCounter, RequestError> {
    let rule = &policy.rules()[i];
    let (scope, scope_hash) = scope_of(rule, attrs)?;
    let span = window::span(rule.limit.window, now);
    let limit = to_counter(rule.limit.amount, rule.limit.unit.scale(), rule.limit.unit)?;
    // `rule|unit|scope hash|window`, pushed rather than formatted: every
    // counter of every decision has one.
    let unit = rule.limit.unit.name();
    let mut key =
        String::with_capacity(rule.id.len() + unit.len() + scope_hash.len() + span.id.len() + 3);
    for (sep, part) in [
        ("", rule.id.as_str()),
        ("|", unit),
        ("|", &scope_hash),
        ("|", &span.id),
    ] {
        key.push_str(sep);
        key.push_str(part);
    }
    Ok(RuleCounter {
        rule: i,
        key,
        scope,
        scope_hash,
        limit,
        window_start: span.start,
        window_end: span.end,
    })
}

/// Where the grant for a rule and scope lives: one per pair, across
/// windows, so that an approval outlives a window edge until it expires.
pub fn grant_key(rule_id: &str, scope_hash: &str) -> String {
    format!("{rule_id}|{scope_hash}")
}

/// The scope a grant names (`team=growth,environment=prod`, or `all`),
/// checked against the rule's `per`, as its display form and hash. Each
/// attribute is given once, and values cannot hold `,` or `=`, so that a
/// scope text means exactly one scope. A key is named by its registry id or
/// the `sha256:` form that denials show, never by the raw key.
pub fn grant_scope(
    policy: &CompiledPolicy,
    rule: &Rule,
    text: &str,
) -> Result<(String, String), RequestError> {
    let invalid = |why: String| RequestError::invalid(format!("scope {text:?}: {why}"));
    let mut attrs = Attributes::default();
    let mut given: Vec<crate::policy::Attr> = Vec::new();
    let text = text.trim();
    if !(text.is_empty() || text == "all") {
        for pair in text.split(',') {
            let (name, value) = pair
                .split_once('=')
                .ok_or_else(|| invalid(format!("{pair:?} is not NAME=VALUE")))?;
            let (name, value) = (name.trim(), value.trim());
            let attr = crate::policy::Attr::parse(name)
                .ok_or_else(|| invalid(format!("unknown attribute {name:?}")))?;
            if !rule.per.contains(&attr) {
                return Err(invalid(format!(
                    "rule `{}` is not counted per {attr}",
                    rule.id
                )));
            }
            if given.contains(&attr) {
                return Err(invalid(format!("{attr} is given twice")));
            }
            if value.is_empty() || value.contains('=') {
                return Err(invalid(format!(
                    "the value of {attr} must be non-empty and hold no `=` or `,`"
                )));
            }
            if attr == crate::policy::Attr::Key {
                // Not echoed: the value may be a raw key pasted by mistake.
                check_key_scope(policy, value)
                    .map_err(|why| RequestError::invalid(format!("scope: the key value: {why}")))?;
            }
            given.push(attr.clone());
            if attr == crate::policy::Attr::ModelFamily {
                attrs.families = vec![value.to_string()];
            } else {
                attrs.set(&attr, value.to_string());
            }
        }
    }
    if let Some(missing) = rule.per.iter().find(|a| attrs.get(a).is_none()) {
        return Err(invalid(format!(
            "rule `{}` is counted per {}; give {missing}=VALUE",
            rule.id,
            rule.per
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    scope_of(rule, &attrs)
}

/// A key in a scope is a registry id or the `sha256:` prefix form of an
/// unregistered key. A raw key would be stored and logged with the grant,
/// and would match nothing anyway.
fn check_key_scope(policy: &CompiledPolicy, value: &str) -> Result<(), String> {
    if policy.set.keys.iter().any(|k| k.id == value) || value.starts_with("sha256:") {
        return Ok(());
    }
    if policy
        .key_by_hash(&super::request::hash_key(value))
        .is_some()
    {
        return Err(
            "that is a raw API key; name it by its registry id, never the key itself".to_string(),
        );
    }
    Err("it is neither a registry id nor the sha256: form shown in denials".to_string())
}

/// The display scope and the hash that goes into the counter key.
fn scope_of(rule: &Rule, attrs: &Attributes) -> Result<(String, String), RequestError> {
    if rule.per.is_empty() {
        return Ok(("all".to_string(), "all".to_string()));
    }
    let mut display = String::new();
    let mut hasher = Sha256::new();
    for attr in &rule.per {
        let value = attrs
            .get(attr)
            .ok_or_else(|| RequestError::MissingAttribute {
                rule: rule.id.clone(),
                attr: attr.to_string(),
            })?;
        if !display.is_empty() {
            display.push(',');
        }
        // The attribute's name as `Display` writes it (`labels.<name>` for
        // a label), without formatting a string for it.
        let (prefix, name) = match attr {
            crate::policy::Attr::Label(label) => ("labels.", label.as_str()),
            other => ("", other.name()),
        };
        display.push_str(prefix);
        display.push_str(name);
        display.push('=');
        display.push_str(value);
        hasher.update(prefix.as_bytes());
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update(value.as_bytes());
        hasher.update([0]);
    }
    Ok((display, hex(&hasher.finalize()[..12])))
}

/// How a rule's counter counts: the one place a kind is chosen.
pub fn counter_kind(limit: &Limit) -> CounterKind {
    match (limit.unit, limit.window) {
        (Unit::Concurrent, _) => CounterKind::Gauge,
        (_, Window::Rolling(_)) => CounterKind::Rolling,
        _ => CounterKind::Plain,
    }
}

fn expiry(window: Window, end: Option<Millis>) -> Expiry {
    match (window, end) {
        (Window::Calendar(_) | Window::Local(_), Some(end)) => Expiry::At(end + EXPIRY_GRACE),
        (Window::Rolling(secs), _) => Expiry::AfterFirstUse(secs as i64 * 1000),
        _ => Expiry::Never,
    }
}

/// How to get past an approval rule, for denial messages. The scope comes
/// from the request, so it is quoted for a shell unless it is plainly safe.
fn how_to_ask(rule: &Rule, scope: &str) -> String {
    let owner = rule.owner.as_deref().unwrap_or("the rule's owner");
    let plain = scope
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/' | '=' | ','));
    let scope = if plain {
        scope.to_string()
    } else {
        format!("'{}'", scope.replace('\'', r"'\''"))
    };
    format!(
        "ask {owner} to approve it (tollgate approve --rule {} --scope {scope})",
        rule.id
    )
}

/// Turns the store's answer into the decision.
pub fn decide(
    policy: &CompiledPolicy,
    plan: &Plan,
    outcome: &ReserveOutcome,
    now: Millis,
) -> Decision {
    let Some(last) = outcome.tried.len().checked_sub(1) else {
        return Decision::allow_unmetered();
    };
    if last >= plan.candidates.len() || outcome.applied.is_some_and(|i| i != last) {
        return store_disagreement();
    }
    let candidate = &plan.candidates[last];
    let counters = &plan.counters[last];
    let states = &outcome.tried[last];
    let applied = outcome.applied == Some(last);
    let rules = policy.rules();

    let mut reports: Vec<CounterReport> = candidate
        .ops
        .iter()
        .zip(counters)
        .zip(states)
        .map(|((op, c), s)| {
            let used = if applied {
                s.used_before.saturating_add(op.amount)
            } else {
                s.used_before
            };
            let rule = &rules[c.rule];
            let limit = op.effective_limit(s);
            CounterReport {
                rule: rule.id.clone(),
                scope: c.scope.clone(),
                unit: op.unit,
                window: rule.limit.window,
                limit: from_counter(limit, op.unit),
                used: from_counter(used, op.unit),
                leased: Decimal::ZERO,
                remaining: from_counter((limit - used).max(0), op.unit),
                resets_at: s.resets_at.or(c.window_end),
                enforced: op.enforced,
            }
        })
        .collect();

    if applied {
        let alerts = candidate
            .ops
            .iter()
            .zip(counters)
            .zip(states)
            .flat_map(|((op, c), s)| {
                let rule = &rules[c.rule];
                let window_end = s.resets_at.or(c.window_end);
                let window_start = c.window_start.or(match (rule.limit.window, window_end) {
                    (Window::Rolling(secs), Some(end)) => Some(end - secs as i64 * 1000),
                    _ => None,
                });
                reached(
                    &rule.alerts,
                    s.used_before.saturating_add(op.amount),
                    op.limit,
                )
                .map(move |threshold| AlertCrossing {
                    counter: op.key.clone(),
                    rule: rule.id.clone(),
                    scope: c.scope.clone(),
                    threshold,
                    unit: op.unit,
                    used: from_counter(s.used_before.saturating_add(op.amount), op.unit),
                    limit: from_counter(op.limit, op.unit),
                    window_start,
                    window_end,
                })
            })
            .collect();
        sort_most_constrained(&mut reports);
        let downgraded = last > 0;
        let message = if downgraded {
            let from = plan.candidates[0]
                .model
                .as_deref()
                .unwrap_or("the requested model");
            let to = candidate.model.as_deref().unwrap_or("another model");
            format!("{from} is over budget here; downgraded to {to}")
        } else {
            "within budget".to_string()
        };
        return Decision {
            verdict: if downgraded {
                Verdict::Downgrade
            } else {
                Verdict::Allow
            },
            reason: if downgraded {
                Reason::Downgraded
            } else {
                Reason::Allowed
            },
            message,
            rule: None,
            scope: None,
            model: downgraded.then(|| candidate.model.clone()).flatten(),
            retry_after: None,
            retry_after_ms: None,
            retryable: false,
            counters: reports,
            alerts,
            reservation_id: outcome.reservation_id.clone(),
            action_id: None,
            policy_version: std::sync::Arc::from(""),
            decided_at: 0,
            learned_output_tokens: None,
        };
    }

    // Denied: report the first enforced op that did not fit.
    let blocking = candidate
        .ops
        .iter()
        .zip(counters)
        .zip(states)
        .find(|((op, _), s)| op.blocks_at(s));
    let Some(((op, counter), state)) = blocking else {
        // The store found no fit but no op blocks: only possible if it
        // disagrees with the plan. Deny rather than guess.
        return store_disagreement();
    };
    let rule = &rules[counter.rule];
    let resets_at = state.resets_at.or(counter.window_end);
    let unit = op.unit;
    let gate_closed = op.grant.as_ref().is_some_and(|g| g.required) && state.grant.is_none();
    let effective_limit = op.effective_limit(state);
    let limit = from_counter(effective_limit, unit);
    let used = from_counter(state.used_before, unit);
    let needs = from_counter(op.amount, unit);
    let reset_text = match resets_at {
        Some(t) => format!("resets at {}", format_in(rule.limit.window, t)),
        None => "does not reset".to_string(),
    };
    let (reason, retry_after, retryable, message) = if gate_closed {
        (
            Reason::ApprovalRequired,
            None,
            false,
            format!(
                "rule `{}` requires approval for scope {}; {}",
                rule.id,
                counter.scope,
                how_to_ask(rule, &counter.scope)
            ),
        )
    } else if effective_limit == 0 {
        // A limit of zero is how a policy blocks a model or route outright.
        (
            Reason::Blocked,
            None,
            false,
            format!(
                "rule `{}` blocks this request for scope {} (its limit is 0)",
                rule.id, counter.scope
            ),
        )
    } else if unit == Unit::Concurrent {
        (
            Reason::ConcurrencyLimit,
            Some(CONCURRENCY_RETRY_SECS),
            true,
            format!(
                "rule `{}` allows {limit} concurrent requests for scope {}; {used} are in flight",
                rule.id, counter.scope
            ),
        )
    } else {
        let amount_text = if unit == Unit::Spend {
            format!("{limit} USD of spend")
        } else {
            format!("{limit} {unit}")
        };
        let base = format!(
            "rule `{}` allows {amount_text} per {} window for scope {}; {used} used, this request needs {needs}; {reset_text}",
            rule.id, rule.limit.window, counter.scope
        );
        match (&rule.on_exceed, rule.enforcement) {
            (OnExceed::Approval, _) => (
                Reason::ApprovalRequired,
                None,
                false,
                format!(
                    "{base}; going further needs an approved extension: {}",
                    how_to_ask(rule, &counter.scope)
                ),
            ),
            (_, Enforcement::Approval) => (
                Reason::ApprovalRequired,
                None,
                false,
                format!(
                    "{base}; the approval's budget is used up: {}",
                    how_to_ask(rule, &counter.scope)
                ),
            ),
            (OnExceed::Downgrade(cheaper), _) if plan.downgrades_withheld => (
                Reason::BudgetExceeded,
                resets_at.map(|t| seconds_until(now, t)),
                false,
                format!(
                    "{base}; this route cannot switch the request to {cheaper}, so it is \
                     refused: send it again with model {cheaper}"
                ),
            ),
            _ => (
                Reason::BudgetExceeded,
                resets_at.map(|t| seconds_until(now, t)),
                false,
                base,
            ),
        }
    };
    let retry_after_ms = match reason {
        Reason::ConcurrencyLimit => Some(CONCURRENCY_RETRY_SECS * 1000),
        _ => retry_after.and(resets_at).map(|t| (t - now).max(0) as u64),
    };
    sort_most_constrained(&mut reports);
    Decision {
        verdict: Verdict::Deny,
        reason,
        message,
        rule: Some(rule.id.clone()),
        scope: Some(counter.scope.clone()),
        model: None,
        retry_after,
        retry_after_ms,
        retryable,
        counters: reports,
        alerts: Vec::new(),
        reservation_id: None,
        action_id: None,
        policy_version: std::sync::Arc::from(""),
        decided_at: 0,
        learned_output_tokens: None,
    }
}

/// Marks a budget denial retryable when its window resets within
/// `within_ms`: only then does waiting for Retry-After and retrying work.
/// Longer resets, approval gates and blocks stay unretryable, so that no
/// SDK sleeps for the rest of a month.
pub fn with_retry_hint(mut d: Decision, within_ms: Millis) -> Decision {
    if d.verdict == Verdict::Deny && d.reason == Reason::BudgetExceeded && !d.retryable {
        if let Some(ms) = d.retry_after_ms {
            d.retryable = (ms as i64) <= within_ms;
        }
    }
    d
}

fn store_disagreement() -> Decision {
    Decision {
        verdict: Verdict::Deny,
        reason: Reason::BudgetExceeded,
        message: "the counter store refused the reservation".to_string(),
        retryable: true,
        retry_after: Some(CONCURRENCY_RETRY_SECS),
        retry_after_ms: Some(CONCURRENCY_RETRY_SECS * 1000),
        ..Decision::allow_unmetered()
    }
}

/// Thresholds (percent of `limit`) that usage `used` has reached. Judged on
/// the counter as the store holds it, this reservation's estimate
/// included: the same figure the cap denies on, so a threshold warns of
/// denials to come. A limit of zero has no thresholds.
pub fn reached(thresholds: &[u32], used: i64, limit: i64) -> impl Iterator<Item = u32> + '_ {
    thresholds
        .iter()
        .copied()
        .filter(move |&t| limit > 0 && i128::from(used) * 100 >= i128::from(limit) * i128::from(t))
}

/// The smallest counter value at which each threshold is [`reached`],
/// lowest first.
pub fn alert_values(thresholds: &[u32], limit: i64) -> Vec<i64> {
    if limit <= 0 {
        return Vec::new();
    }
    let mut values: Vec<i64> = thresholds
        .iter()
        .map(|&t| {
            let scaled = i128::from(limit) * i128::from(t);
            i64::try_from((scaled + 99) / 100).unwrap_or(i64::MAX)
        })
        .collect();
    values.sort_unstable();
    values
}

impl AlertCrossing {
    /// The marker that makes this threshold fire once per counter, limit
    /// and window. The counter key names a calendar window; the window's
    /// end tells a rolling window's successive lives apart; the limit
    /// makes a raised cap's thresholds new ones.
    pub fn marker(&self) -> crate::store::AlertMarker {
        let end = self.window_end.map_or("-".to_string(), |e| e.to_string());
        crate::store::AlertMarker {
            key: format!("{}|{}|{}|{end}", self.counter, self.limit, self.threshold),
            expires_at: self.window_end,
            token: String::new(),
        }
    }
}

fn sort_most_constrained(reports: &mut [CounterReport]) {
    // Each share is worked out once: a decimal division per comparison
    // was an eighth of a 20-rule decision.
    reports.sort_by_cached_key(|r| {
        let share = if r.limit.is_zero() {
            Decimal::ZERO
        } else {
            r.remaining / r.limit
        };
        (std::cmp::Reverse(r.enforced), share)
    });
}

/// The denial of a key the registry does not know, under
/// `attributes.unknown_keys: deny`.
pub fn unknown_key() -> Decision {
    Decision {
        verdict: Verdict::Deny,
        reason: Reason::UnknownKey,
        message: "this API key is not registered; ask the platform team to register it".to_string(),
        ..Decision::allow_unmetered()
    }
}

/// The decision when the store failed and every matched rule fails open.
pub fn fail_open() -> Decision {
    Decision {
        reason: Reason::StoreUnavailableFailOpen,
        message: "the counter store is unavailable; every matched rule fails open".to_string(),
        ..Decision::allow_unmetered()
    }
}

/// The outcome the plan would meet on an empty store, without a store:
/// what `explain` shows.
pub fn empty_store_outcome(plan: &Plan) -> ReserveOutcome {
    let mut tried = Vec::new();
    let mut applied = None;
    for (i, c) in plan.candidates.iter().enumerate() {
        tried.push(vec![CounterState::default(); c.ops.len()]);
        match fit(&c.ops, |_| CounterState::default()) {
            Fit::Fits => {
                applied = Some(i);
                break;
            }
            Fit::TryNext => {}
            Fit::Blocked => break,
        }
    }
    ReserveOutcome {
        applied,
        tried,
        reservation_id: None,
        replayed: false,
    }
}
