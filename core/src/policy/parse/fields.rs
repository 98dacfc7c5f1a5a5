//! The field readers every section shares: each checks one node's shape,
//! reports what is wrong at that node's position and returns `None` (or an
//! empty list) so the caller can carry on and find the next problem.

use std::str::FromStr;

use rust_decimal::Decimal;

use super::Reader;
use crate::policy::glob::Pattern;
use crate::policy::yaml::{Node, Pos, Value};

impl Reader<'_> {
    /// Reads a mapping whose keys must come from `allowed`. Unknown and
    /// repeated keys are reported; the known ones are returned in order.
    pub(super) fn map<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
        allowed: &[&str],
    ) -> Option<Vec<(&'n str, &'n Node)>> {
        let Value::Map(entries) = &node.value else {
            self.error(
                node.pos,
                format!("{what} must be a mapping, found {}", node.kind()),
            );
            return None;
        };
        let mut out: Vec<(&str, &Node)> = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            let Some(name) = self.key_name(k) else {
                continue;
            };
            if !allowed.contains(&name) {
                self.error(
                    k.pos,
                    format!(
                        "unknown field `{name}` in {what}; expected one of: {}",
                        allowed.join(", ")
                    ),
                );
                continue;
            }
            if out.iter().any(|(seen, _)| *seen == name) {
                self.error(k.pos, format!("field `{name}` is given twice in {what}"));
                continue;
            }
            out.push((name, v));
        }
        Some(out)
    }

    /// Reads a mapping with free-form keys (model names, label names).
    pub(super) fn open_map<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
    ) -> Vec<(&'n str, &'n Node, Pos)> {
        let Value::Map(entries) = &node.value else {
            self.error(
                node.pos,
                format!("{what} must be a mapping, found {}", node.kind()),
            );
            return Vec::new();
        };
        let mut out: Vec<(&str, &Node, Pos)> = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            let Some(name) = self.key_name(k) else {
                continue;
            };
            if out.iter().any(|(seen, _, _)| *seen == name) {
                self.error(k.pos, format!("`{name}` is given twice in {what}"));
                continue;
            }
            out.push((name, v, k.pos));
        }
        out
    }

    pub(super) fn key_name<'n>(&mut self, key: &'n Node) -> Option<&'n str> {
        match &key.value {
            Value::Scalar { text, .. } => Some(text.as_str()),
            _ => {
                self.error(
                    key.pos,
                    format!("a mapping key must be a plain name, found {}", key.kind()),
                );
                None
            }
        }
    }

    pub(super) fn seq<'n>(&mut self, node: &'n Node, what: &str) -> &'n [Node] {
        match &node.value {
            Value::Seq(items) => items,
            Value::Null => &[],
            _ => {
                self.error(
                    node.pos,
                    format!("`{what}` must be a list, found {}", node.kind()),
                );
                &[]
            }
        }
    }

    pub(super) fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        match &node.value {
            Value::Scalar { text, .. } if !text.trim().is_empty() => Some(text.clone()),
            Value::Scalar { .. } | Value::Null => {
                self.error(node.pos, format!("`{what}` must not be empty"));
                None
            }
            _ => {
                self.error(
                    node.pos,
                    format!("`{what}` must be a string, found {}", node.kind()),
                );
                None
            }
        }
    }

    /// An identifier used in counter keys and messages: no spaces, no `|`.
    pub(super) fn ident(&mut self, node: &Node, what: &str) -> Option<String> {
        let s = self.string(node, what)?;
        let ok = s.len() <= 128
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ':'));
        if !ok {
            self.error(
                node.pos,
                format!("`{what}` {s:?} may only use letters, digits and - _ . / : (at most 128)"),
            );
            return None;
        }
        Some(s)
    }

    /// A non-negative exact decimal, read from the source text so that
    /// `0.1` is exactly one tenth.
    pub(super) fn amount(&mut self, node: &Node, what: &str) -> Option<Decimal> {
        let text = match &node.value {
            Value::Scalar { text, .. } => text.trim(),
            _ => {
                self.error(
                    node.pos,
                    format!("`{what}` must be a number, found {}", node.kind()),
                );
                return None;
            }
        };
        let parsed = Decimal::from_str(text).or_else(|_| Decimal::from_scientific(text));
        match parsed {
            Ok(d) if d.is_sign_negative() && !d.is_zero() => {
                self.error(
                    node.pos,
                    format!("`{what}` must not be negative, found {text}"),
                );
                None
            }
            Ok(d) => Some(d.normalize()),
            Err(_) => {
                self.error(
                    node.pos,
                    format!("`{what}` must be a number, found {text:?}"),
                );
                None
            }
        }
    }

    pub(super) fn count(&mut self, node: &Node, what: &str) -> Option<u64> {
        let d = self.amount(node, what)?;
        if d.fract() != Decimal::ZERO || d > Decimal::from(u32::MAX) {
            self.error(
                node.pos,
                format!("`{what}` must be a whole number up to {}", u32::MAX),
            );
            return None;
        }
        u64::try_from(d).ok()
    }

    pub(super) fn patterns(&mut self, node: &Node, what: &str) -> Vec<Pattern> {
        let items: Vec<&Node> = match &node.value {
            Value::Seq(items) => items.iter().collect(),
            _ => vec![node],
        };
        if items.is_empty() {
            self.error(node.pos, format!("`{what}` must list at least one value"));
        }
        items
            .into_iter()
            .filter_map(|n| self.string(n, what))
            .map(|s| Pattern::new(&s))
            .collect()
    }
}

/// `30s`, `10m`, `24h`, `7d`; at least one second.
pub fn parse_duration(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (digits, suffix) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let factor = match suffix {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return None,
    };
    let secs = n.checked_mul(factor)?;
    (secs > 0 && secs <= 366 * 86_400).then_some(secs)
}
