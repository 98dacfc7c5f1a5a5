//! Merges the files of a policy set and checks what only the whole set can
//! tell: duplicate ids, undefined families, spend rules without prices.

use std::collections::HashMap;

use super::model::*;
use super::parse::FilePolicy;
use super::Diagnostic;

pub fn merge(
    parts: Vec<FilePolicy>,
    imported: Vec<(String, ModelPrice, Origin)>,
    diags: &mut Vec<Diagnostic>,
) -> PolicySet {
    let mut set = PolicySet::default();
    set.pricing.imported = imported;
    let mut refs = Vec::new();
    let mut rule_ids = Vec::new();
    let mut defaults_at: Option<Origin> = None;
    let mut attributes_at: Option<Origin> = None;
    let mut unpriced_at: Option<Origin> = None;
    for part in parts {
        set.pricing.models.extend(part.pricing_models);
        for (name, patterns, origin) in part.families {
            if let Some((_, first)) = set.pricing.families.get(&name) {
                push(
                    diags,
                    &origin,
                    format!("model family `{name}` is already defined at {first}"),
                );
            } else {
                set.pricing.families.insert(name, (patterns, origin));
            }
        }
        if let Some((mode, origin)) = part.unpriced_models {
            if let Some(first) = &unpriced_at {
                push(
                    diags,
                    &origin,
                    format!("`pricing.unpriced_models` is already set at {first}"),
                );
            } else {
                set.pricing.unpriced_models = mode;
                unpriced_at = Some(origin);
            }
        }
        if let Some((mapping, origin)) = part.attributes {
            if let Some(first) = &attributes_at {
                push(
                    diags,
                    &origin,
                    format!("`attributes` is already given at {first}"),
                );
            } else {
                set.attributes = mapping;
                attributes_at = Some(origin);
            }
        }
        if let Some((defaults, origin)) = part.defaults {
            if let Some(first) = &defaults_at {
                push(
                    diags,
                    &origin,
                    format!("`defaults` is already given at {first}"),
                );
            } else {
                set.defaults = defaults;
                defaults_at = Some(origin);
            }
        }
        set.keys.extend(part.keys);
        set.notifiers.extend(part.notifiers);
        set.rules.extend(part.rules);
        rule_ids.extend(part.rule_ids);
        refs.extend(part.family_refs);
    }

    first_seen(
        diags,
        set.pricing
            .models
            .iter()
            .map(|(p, _, o)| (p.as_str().to_string(), o)),
        |name, first| format!("model `{name}` is already priced at {first}"),
    );
    first_seen(
        diags,
        set.keys.iter().map(|k| (k.id.clone(), &k.origin)),
        |id, first| format!("key id `{id}` is already registered at {first}"),
    );
    first_seen(
        diags,
        set.keys.iter().map(|k| (super::hex(&k.sha256), &k.origin)),
        |_, first| format!("this key hash is already registered at {first}"),
    );
    first_seen(
        diags,
        rule_ids.iter().map(|(id, o)| (id.clone(), o)),
        |id, first| format!("duplicate rule id `{id}`: first defined at {first}"),
    );

    first_seen(
        diags,
        set.notifiers.iter().map(|n| (n.id.clone(), &n.origin)),
        |id, first| format!("notifier `{id}` is already defined at {first}"),
    );
    for rule in &set.rules {
        for id in &rule.notify {
            if set.notifier(id).is_none() {
                let known: Vec<&str> = std::iter::once(LOG_NOTIFIER)
                    .chain(set.notifiers.iter().map(|n| n.id.as_str()))
                    .collect();
                push(
                    diags,
                    &rule.origin,
                    format!(
                        "rule `{}` notifies `{id}`, which is not defined (notifiers: {})",
                        rule.id,
                        known.join(", ")
                    ),
                );
            }
        }
    }

    for (family, origin) in refs {
        if !set.pricing.families.contains_key(&family) {
            let known: Vec<&str> = set.pricing.families.keys().map(String::as_str).collect();
            let hint = if known.is_empty() {
                "no families are defined under pricing.families".to_string()
            } else {
                format!("defined families: {}", known.join(", "))
            };
            push(
                diags,
                &origin,
                format!("model family `{family}` is not defined ({hint})"),
            );
        }
    }

    if set.pricing.unpriced_models == UnpricedModels::Error {
        for rule in set.rules.iter().filter(|r| r.limit.unit == Unit::Spend) {
            if let Some(problem) = unpriced_reach(&set.pricing, rule) {
                push(
                    diags,
                    &rule.origin,
                    format!(
                        "rule `{}` limits spend but {problem}; price them, add a catch-all \
                         price `\"*\"`, or set `pricing.unpriced_models: reject` to refuse such \
                         requests at check time",
                        rule.id
                    ),
                );
            }
        }
    }
    set.warnings = client_escapable(&set);
    set
}

/// Hard rules that a client can step out of, because every attribute
/// their match depends on is one the client sets itself.
fn client_escapable(set: &PolicySet) -> Vec<(Origin, String)> {
    let client = &set.attributes;
    set.rules
        .iter()
        .filter(|r| r.enforcement != Enforcement::Soft && !r.conditions.is_empty())
        .filter(|r| r.conditions.iter().all(|c| client.client_may_set(&c.attr)))
        .map(|r| {
            let attrs: Vec<String> = r.conditions.iter().map(|c| c.attr.to_string()).collect();
            (
                r.origin.clone(),
                format!(
                    "rule `{}` is enforced but matches only on {}, which clients set \
                     themselves (`attributes.client_attributes`): a client can step out of it \
                     by changing those headers; match on a route, registry or trusted-header \
                     attribute as well",
                    r.id,
                    attrs.join(", ")
                ),
            )
        })
        .collect()
}

/// Describes the models a spend rule can match that have no price, if any.
fn unpriced_reach(pricing: &Pricing, rule: &Rule) -> Option<String> {
    let priced = |model: &str| {
        pricing.models.iter().any(|(p, _, _)| p.matches(model))
            || pricing.imported.iter().any(|(n, _, _)| n == model)
    };
    let catch_all = pricing.models.iter().any(|(p, _, _)| p.as_str() == "*");
    if catch_all {
        return None;
    }
    let models = rule.conditions.iter().find(|c| c.attr == Attr::Model);
    let families = rule.conditions.iter().find(|c| c.attr == Attr::ModelFamily);
    let mut patterns: Vec<&super::glob::Pattern> = Vec::new();
    if let Some(c) = models {
        patterns.extend(&c.patterns);
    } else if let Some(c) = families {
        for f in &c.patterns {
            // Undefined families are reported elsewhere.
            for (name, (members, _)) in &pricing.families {
                if f.matches(name) {
                    patterns.extend(members);
                }
            }
        }
    } else {
        return Some("it matches every model".to_string());
    }
    let unpriced: Vec<String> = patterns
        .iter()
        .filter(|p| match p.exact() {
            Some(model) => !priced(model),
            // A glob is covered only by the very same glob in pricing.
            None => !pricing.models.iter().any(|(q, _, _)| q == **p),
        })
        .map(|p| format!("`{p}`"))
        .collect();
    (!unpriced.is_empty())
        .then(|| format!("it can match models with no price: {}", unpriced.join(", ")))
}

fn first_seen<'a>(
    diags: &mut Vec<Diagnostic>,
    items: impl Iterator<Item = (String, &'a Origin)>,
    message: impl Fn(&str, &Origin) -> String,
) {
    let mut seen: HashMap<String, &Origin> = HashMap::new();
    for (name, origin) in items {
        match seen.get(&name) {
            Some(first) => push(diags, origin, message(&name, first)),
            None => {
                seen.insert(name, origin);
            }
        }
    }
}

fn push(diags: &mut Vec<Diagnostic>, origin: &Origin, message: String) {
    diags.push(Diagnostic {
        file: origin.file.clone(),
        pos: origin.pos,
        message,
    });
}
