//! Turns one file's YAML tree into policy data, collecting every problem
//! with its position instead of stopping at the first.
//!
//! One `Reader` walks the tree; each section's readers live in their own
//! file as further `impl Reader` blocks, on top of the shared field readers
//! in `fields.rs`.

mod attributes;
mod defaults;
mod fields;
mod keys;
mod limit;
mod notifiers;
mod pricing;
mod rules;

pub use fields::parse_duration;

use super::glob::Pattern;
use super::model::*;
use super::yaml::{Node, Pos};
use super::Diagnostic;

/// What one file contributes to the policy set.
#[derive(Debug, Default)]
pub struct FilePolicy {
    pub pricing_models: Vec<(Pattern, ModelPrice, Origin)>,
    pub families: Vec<(String, Vec<Pattern>, Origin)>,
    pub unpriced_models: Option<(UnpricedModels, Origin)>,
    /// Price catalogs named by `pricing.import`, as written.
    pub imports: Vec<(String, Origin)>,
    pub keys: Vec<KeyEntry>,
    pub defaults: Option<(Defaults, Origin)>,
    pub attributes: Option<(AttributeMapping, Origin)>,
    pub notifiers: Vec<Notifier>,
    pub rules: Vec<Rule>,
    /// Where each family name was referenced, so undefined ones can be
    /// reported once the whole set is known.
    pub family_refs: Vec<(String, Origin)>,
    /// Every rule id written, valid rule or not, so that duplicates are
    /// reported even next to other mistakes.
    pub rule_ids: Vec<(String, Origin)>,
}

pub fn parse_file(file: &str, root: &Node, diags: &mut Vec<Diagnostic>) -> FilePolicy {
    let mut r = Reader { file, diags };
    let mut out = FilePolicy::default();
    let Some(top) = r.map(
        root,
        "a policy file",
        &[
            "pricing",
            "keys",
            "rules",
            "defaults",
            "attributes",
            "notifiers",
        ],
    ) else {
        return out;
    };
    for (key, value) in top {
        match key {
            "pricing" => r.pricing(value, &mut out),
            "keys" => {
                for item in r.seq(value, "keys") {
                    if let Some(k) = r.key_entry(item) {
                        out.keys.push(k);
                    }
                }
            }
            "attributes" => {
                if let Some(m) = r.attribute_mapping(value) {
                    out.attributes = Some((m, r.origin(value.pos)));
                }
            }
            "defaults" => {
                if let Some(d) = r.defaults(value) {
                    out.defaults = Some((d, r.origin(value.pos)));
                }
            }
            "notifiers" => {
                for item in r.seq(value, "notifiers") {
                    if let Some(n) = r.notifier(item) {
                        out.notifiers.push(n);
                    }
                }
            }
            "rules" => {
                for item in r.seq(value, "rules") {
                    if let Some(rule) = r.rule(item, &mut out.family_refs, &mut out.rule_ids) {
                        out.rules.push(rule);
                    }
                }
            }
            _ => unreachable!("map() rejects unknown keys"),
        }
    }
    out
}

struct Reader<'a> {
    file: &'a str,
    diags: &'a mut Vec<Diagnostic>,
}

impl Reader<'_> {
    fn error(&mut self, pos: Pos, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            file: self.file.to_string(),
            pos,
            message: message.into(),
        });
    }

    fn origin(&self, pos: Pos) -> Origin {
        Origin {
            file: self.file.to_string(),
            pos,
        }
    }
}
