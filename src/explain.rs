//! `tollgate explain`: which rules a request meets, why, what each would
//! charge, and the decision on an empty store, as a table for people.

use std::fmt::Write;
use std::sync::Arc;

use tollgate_core::engine::charge::{from_counter, Basis, InputSource, OutputSource, Usage};
use tollgate_core::engine::decide::scope_counters;
use tollgate_core::engine::tokens::EXACT_MAX_BYTES;
use tollgate_core::engine::window::format_in;
use tollgate_core::engine::{Attributes, Decision, Estimate, RequestError, Verdict};
use tollgate_core::gate::{CheckInput, Gate, GateConfig, LearnedRow, ManualClock};
use tollgate_core::policy::{
    Attr, CompiledPolicy, Condition, Enforcement, OnExceed, Tokenizer, Unit,
};
use tollgate_core::store::MemoryStore;

pub fn explain(
    policy: CompiledPolicy,
    input: CheckInput,
    now: i64,
) -> Result<String, RequestError> {
    explain_learned(policy, input, now, None)
}

/// The output tokens a running server learned (`GET /v1/dashboard`'s
/// `learned_output`), and which server.
pub struct Learned {
    pub server: String,
    pub rows: Vec<LearnedRow>,
}

/// [`explain`], with the output tokens `learned` lists reserved where the
/// policy learns them, as that server would reserve them.
pub fn explain_learned(
    policy: CompiledPolicy,
    mut input: CheckInput,
    now: i64,
    learned: Option<Learned>,
) -> Result<String, RequestError> {
    // What a client may not set is dropped here as the HTTP front ends
    // drop it, and shown as ignored.
    let mut ignored = Vec::new();
    for attr in Attr::WELL_KNOWN.iter().cloned().chain(
        input
            .client_attributes
            .labels
            .keys()
            .map(|l| Attr::Label(l.clone()))
            .collect::<Vec<_>>(),
    ) {
        if input.client_attributes.get(&attr).is_some()
            && !policy.set.attributes.client_may_set(&attr)
        {
            ignored.push(attr.to_string());
            match &attr {
                Attr::Label(l) => {
                    input.client_attributes.labels.remove(l);
                }
                other => {
                    if let Some(slot) = input.client_attributes.slot(other) {
                        *slot = None;
                    }
                }
            }
        }
    }
    let gate = Gate::new(
        policy,
        Arc::new(MemoryStore::default()),
        Arc::new(ManualClock::new(now)),
        GateConfig::default(),
    );
    let policy = gate.policy();
    let rows = learned.as_ref().map(|l| l.rows.as_slice());
    let (plan, decision) = gate
        .explain_with(input.clone(), rows)
        .map_err(|e| match e {
            tollgate_core::gate::GateError::Request(r) => r,
            other => RequestError::invalid(other.to_string()),
        })?;

    let resolved = tollgate_core::gate::resolve(&policy, &input);
    let mut attrs = resolved.attributes;
    attrs.families = attrs
        .model
        .as_deref()
        .map(|m| policy.families_of(m))
        .unwrap_or_default();
    let counters = scope_counters(&policy, &attrs, now)?;

    let mut out = String::new();
    let _ = writeln!(
        out,
        "policy {} ({} rules)",
        policy.version,
        policy.rules().len()
    );
    let _ = writeln!(out, "request: {}", describe_attrs(&attrs));
    let sources: Vec<String> = resolved
        .sources
        .iter()
        .map(|(a, s)| format!("{a}={}", s.name()))
        .collect();
    if !sources.is_empty() {
        let _ = writeln!(out, "from: {}", sources.join(" "));
    }
    if let Some(model) = attrs.model.as_deref() {
        let _ = match policy.priced(model) {
            Some((_, origin, source)) => writeln!(
                out,
                "price of {model}: {origin} ({})",
                match source {
                    tollgate_core::policy::PriceSource::Policy => "pricing.models",
                    tollgate_core::policy::PriceSource::PolicyGlob => "a glob in pricing.models",
                    tollgate_core::policy::PriceSource::Catalog => "an imported catalog",
                }
            ),
            None => writeln!(out, "price of {model}: none"),
        };
    }
    estimate_lines(
        &mut out,
        &policy,
        &attrs,
        &input.estimate,
        decision.learned_output_tokens,
        learned.as_ref(),
    );
    if !ignored.is_empty() {
        let _ = writeln!(
            out,
            "ignored: {} (clients may not set them; see attributes.client_attributes)",
            ignored.join(", ")
        );
    }
    let _ = writeln!(out);
    if counters.is_empty() {
        let _ = writeln!(out, "no rule matches this request");
    } else {
        let charges = &plan
            .candidates
            .first()
            .map(|c| c.ops.as_slice())
            .unwrap_or(&[]);
        let mut rows = vec![[
            "RULE".to_string(),
            "KIND".to_string(),
            "SCOPE".to_string(),
            "LIMIT".to_string(),
            "CHARGE".to_string(),
            "MATCHED BECAUSE".to_string(),
        ]];
        for c in &counters {
            let rule = &policy.rules()[c.rule];
            let unit = rule.limit.unit;
            let charge = charges
                .iter()
                .find(|op| op.key == c.key)
                .map(|op| amount_text(from_counter(op.amount, unit), unit))
                .unwrap_or_else(|| "0".to_string());
            let kind = match (&rule.enforcement, &rule.on_exceed) {
                (Enforcement::Soft, _) => "soft".to_string(),
                (Enforcement::Approval, _) => "approval gate".to_string(),
                (Enforcement::Hard, OnExceed::Deny) => "hard".to_string(),
                (Enforcement::Hard, OnExceed::Approval) => "hard, then approval".to_string(),
                (Enforcement::Hard, OnExceed::Downgrade(m)) => {
                    format!("hard, then downgrade to {m}")
                }
            };
            let retry_budget = rule.per.contains(&Attr::Action)
                || rule.conditions.iter().any(|c| c.attr == Attr::AttemptKind);
            rows.push([
                if retry_budget {
                    format!("{} (retry/fallback budget)", rule.id)
                } else {
                    rule.id.clone()
                },
                kind,
                c.scope.clone(),
                format!(
                    "{} / {}",
                    amount_text(rule.limit.amount, unit),
                    rule.limit.window
                ),
                charge,
                why(&rule.conditions, &attrs),
            ]);
        }
        out.push_str(&table(&rows));
    }
    retry_budgets(&mut out, &policy, &attrs, &counters);
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "decision on an empty store: {}",
        verdict_line(&decision)
    );
    if decision.verdict != Verdict::Allow || decision.model.is_some() {
        let _ = writeln!(out, "  {}", decision.message);
    }
    for c in decision
        .counters
        .iter()
        .filter(|c| c.resets_at.is_some())
        .take(1)
    {
        let _ = writeln!(
            out,
            "most constrained: {} ({}) resets at {}",
            c.rule,
            c.scope,
            format_in(c.window, c.resets_at.unwrap_or_default())
        );
    }
    Ok(out)
}

/// The request's input and output tokens at the model asked for, and where
/// each comes from: how the prompt was counted, or which default applied.
fn estimate_lines(
    out: &mut String,
    policy: &CompiledPolicy,
    attrs: &Attributes,
    est: &Estimate,
    learned_output: Option<u64>,
    learned: Option<&Learned>,
) {
    let model = attrs.model.as_deref();
    let basis = Basis {
        model,
        modality: attrs.modality.as_deref(),
        price: model.and_then(|m| policy.price(m)),
        defaults: &policy.set.defaults,
        learned_output,
    };
    let usage = Usage::from_estimate(est, &basis);
    let input = match basis.input_source(est) {
        InputSource::Prompt(Tokenizer::Approximate) => {
            "approximated from the prompt at 4 characters a token".to_string()
        }
        InputSource::Prompt(t) => format!("counted from the prompt with {t} (exact)"),
        InputSource::PromptTooLarge(t) => format!(
            "approximated from the prompt at 4 characters a token: its text is over {} KiB, \
             past which {t} is not used",
            EXACT_MAX_BYTES / 1024
        ),
        InputSource::Request => "as the request says".to_string(),
        InputSource::Default => "defaults.input_tokens".to_string(),
        InputSource::None => return,
    };
    let _ = writeln!(out, "input tokens: {} ({input})", usage.input_tokens);
    let workflow = attrs.workflow.as_deref().unwrap_or("");
    let row = learned.and_then(|l| {
        l.rows
            .iter()
            .find(|r| Some(r.model.as_str()) == model && r.workflow == workflow)
    });
    let learning = policy
        .set
        .defaults
        .learn_output
        .map(|l| match (learned, row) {
            (Some(from), Some(r)) => format!(
                "; {} has {} of the {} settled calls of this model and workflow that learning \
             needs (p{} so far: {})",
                from.server, r.samples, l.min_samples, l.percentile, r.output_tokens
            ),
            (Some(from), None) => format!(
                "; {} has settled no call of this model and workflow to learn from",
                from.server
            ),
            (None, _) => format!(
                "; learned p{} replaces it once {} calls of this model and workflow have settled \
             on a server (--server shows a running server's)",
                l.percentile, l.min_samples
            ),
        });
    let output = match basis.output_source(est) {
        OutputSource::Request => "the request's maximum".to_string(),
        OutputSource::Learned => match (learned, row) {
            (Some(from), Some(r)) => format!(
                "learned: the p{} of the last {} settled calls of {} in workflow {:?} on {} \
                 ({} settled in all)",
                r.percentile, r.samples, r.model, r.workflow, from.server, r.settled
            ),
            _ => "learned from settled calls".to_string(),
        },
        OutputSource::Model => format!(
            "the model's default_output_tokens{}",
            learning.unwrap_or_default()
        ),
        OutputSource::Default => {
            format!("defaults.output_tokens{}", learning.unwrap_or_default())
        }
        OutputSource::None => return,
    };
    let _ = writeln!(out, "output tokens: {} ({output})", usage.output_tokens);
}

/// Rules that budget the attempts of one user action, and which of them
/// this attempt meets: the ones counted per action, and the ones that
/// match on the attempt kind.
fn retry_budgets(
    out: &mut String,
    policy: &CompiledPolicy,
    attrs: &tollgate_core::engine::Attributes,
    matched: &[tollgate_core::engine::decide::RuleCounter],
) {
    let budgets: Vec<(usize, &tollgate_core::policy::Rule)> = policy
        .rules()
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            r.per.contains(&Attr::Action)
                || r.conditions.iter().any(|c| c.attr == Attr::AttemptKind)
        })
        .collect();
    if budgets.is_empty() {
        return;
    }
    let kind = attrs.attempt_kind.as_deref().unwrap_or("(none)");
    let _ = writeln!(out);
    let _ = writeln!(out, "retry and fallback budgets (attempt_kind={kind}):");
    if attrs.action.is_none() {
        let _ = writeln!(
            out,
            "  no action id given: the server makes up a fresh one and returns it; \
             send it with this action's retries and fallbacks"
        );
    }
    for (i, rule) in budgets {
        let limit = format!(
            "{} / {}",
            amount_text(rule.limit.amount, rule.limit.unit),
            rule.limit.window
        );
        let line = if matched.iter().any(|c| c.rule == i) {
            let per_action = if rule.per.contains(&Attr::Action) {
                " per action"
            } else {
                ""
            };
            format!("  {}: hit, {limit}{per_action}", rule.id)
        } else {
            let wants: Vec<String> = rule
                .conditions
                .iter()
                .filter(|c| {
                    attrs
                        .get(&c.attr)
                        .is_none_or(|v| !c.patterns.iter().any(|p| p.matches(v)))
                })
                .map(|c| {
                    let p: Vec<&str> = c.patterns.iter().map(|p| p.as_str()).collect();
                    format!("{}={}", c.attr, p.join("|"))
                })
                .collect();
            format!(
                "  {}: not hit ({limit}; needs {})",
                rule.id,
                wants.join(", ")
            )
        };
        let _ = writeln!(out, "{line}");
    }
}

fn verdict_line(d: &Decision) -> String {
    match d.verdict {
        Verdict::Allow => "ALLOW".to_string(),
        Verdict::Downgrade => format!("DOWNGRADE to {}", d.model.as_deref().unwrap_or("?")),
        Verdict::Deny => format!("DENY ({})", d.reason.code()),
    }
}

fn amount_text(amount: rust_decimal::Decimal, unit: Unit) -> String {
    match unit {
        Unit::Spend => format!("${amount}"),
        other => format!("{amount} {other}"),
    }
}

fn describe_attrs(attrs: &tollgate_core::engine::Attributes) -> String {
    let mut parts: Vec<String> = Attr::WELL_KNOWN
        .iter()
        .filter(|a| **a != Attr::ModelFamily)
        .filter_map(|a| attrs.get(a).map(|v| format!("{a}={v}")))
        .collect();
    if !attrs.families.is_empty() {
        parts.push(format!("model_family={}", attrs.families.join("|")));
    }
    parts.extend(attrs.labels.iter().map(|(k, v)| format!("labels.{k}={v}")));
    if parts.is_empty() {
        "(no attributes)".to_string()
    } else {
        parts.join(" ")
    }
}

fn why(conditions: &[Condition], attrs: &tollgate_core::engine::Attributes) -> String {
    if conditions.is_empty() {
        return "no conditions: applies to every request".to_string();
    }
    conditions
        .iter()
        .map(|c| {
            let patterns: Vec<&str> = c.patterns.iter().map(|p| p.as_str()).collect();
            let value = if c.attr == Attr::ModelFamily {
                attrs.families.join("|")
            } else {
                attrs.get(&c.attr).unwrap_or("").to_string()
            };
            format!("{}={value} ~ {}", c.attr, patterns.join("|"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}
