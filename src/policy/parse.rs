//! Turns one file's YAML tree into policy data, collecting every problem
//! with its position instead of stopping at the first.

use std::collections::BTreeMap;
use std::str::FromStr;

use rust_decimal::Decimal;

use super::glob::Pattern;
use super::model::*;
use super::yaml::{Node, Pos, Value};
use super::Diagnostic;

/// What one file contributes to the policy set.
/// The most unregistered keys a policy may count apart.
const MAX_UNKNOWN_KEYS_BOUND: u64 = 1_000_000;

#[derive(Debug, Default)]
pub struct FilePolicy {
    pub pricing_models: Vec<(Pattern, ModelPrice, Origin)>,
    pub families: Vec<(String, Vec<Pattern>, Origin)>,
    pub unpriced_models: Option<(UnpricedModels, Origin)>,
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

    /// Reads a mapping whose keys must come from `allowed`. Unknown and
    /// repeated keys are reported; the known ones are returned in order.
    fn map<'n>(
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
    fn open_map<'n>(&mut self, node: &'n Node, what: &str) -> Vec<(&'n str, &'n Node, Pos)> {
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

    fn key_name<'n>(&mut self, key: &'n Node) -> Option<&'n str> {
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

    fn seq<'n>(&mut self, node: &'n Node, what: &str) -> &'n [Node] {
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

    fn string(&mut self, node: &Node, what: &str) -> Option<String> {
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
    fn ident(&mut self, node: &Node, what: &str) -> Option<String> {
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
    fn amount(&mut self, node: &Node, what: &str) -> Option<Decimal> {
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

    fn count(&mut self, node: &Node, what: &str) -> Option<u64> {
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

    fn patterns(&mut self, node: &Node, what: &str) -> Vec<Pattern> {
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

    fn pricing(&mut self, node: &Node, out: &mut FilePolicy) {
        let Some(fields) = self.map(node, "pricing", &["models", "families", "unpriced_models"])
        else {
            return;
        };
        for (key, value) in fields {
            match key {
                "models" => {
                    for (name, price, pos) in self.open_map(value, "pricing.models") {
                        if let Some(p) = self.model_price(price, name) {
                            out.pricing_models
                                .push((Pattern::new(name), p, self.origin(pos)));
                        }
                    }
                }
                "families" => {
                    for (name, patterns, pos) in self.open_map(value, "pricing.families") {
                        let what = format!("pricing.families.{name}");
                        let p = self.patterns(patterns, &what);
                        out.families.push((name.to_string(), p, self.origin(pos)));
                    }
                }
                "unpriced_models" => {
                    let mode = match self.string(value, "pricing.unpriced_models").as_deref() {
                        Some("error") => UnpricedModels::Error,
                        Some("reject") => UnpricedModels::Reject,
                        Some(other) => {
                            self.error(
                                value.pos,
                                format!("`pricing.unpriced_models` is `error` or `reject`, found {other:?}"),
                            );
                            continue;
                        }
                        None => continue,
                    };
                    out.unpriced_models = Some((mode, self.origin(value.pos)));
                }
                _ => unreachable!(),
            }
        }
    }

    fn model_price(&mut self, node: &Node, model: &str) -> Option<ModelPrice> {
        let what = format!("the price of {model}");
        let fields = self.map(
            node,
            &what,
            &[
                "input_per_mtok",
                "cached_input_per_mtok",
                "output_per_mtok",
                "per_request",
                "per_image",
                "per_video_second",
                "per_audio_minute",
                "default_output_tokens",
            ],
        )?;
        let mut p = ModelPrice::default();
        for (key, value) in fields {
            let name = format!("{model}.{key}");
            match key {
                "input_per_mtok" => p.input_per_mtok = self.amount(value, &name),
                "cached_input_per_mtok" => p.cached_input_per_mtok = self.amount(value, &name),
                "output_per_mtok" => p.output_per_mtok = self.amount(value, &name),
                "per_request" => p.per_request = self.amount(value, &name),
                "per_video_second" => p.per_video_second = self.amount(value, &name),
                "per_audio_minute" => p.per_audio_minute = self.amount(value, &name),
                "default_output_tokens" => p.default_output_tokens = self.count(value, &name),
                "per_image" => {
                    p.per_image = if let Value::Map(_) = value.value {
                        let mut by_quality = BTreeMap::new();
                        for (quality, price, _) in self.open_map(value, &name) {
                            if let Some(d) = self.amount(price, &format!("{name}.{quality}")) {
                                by_quality.insert(quality.to_string(), d);
                            }
                        }
                        Some(ImagePrice::ByQuality(by_quality))
                    } else {
                        self.amount(value, &name).map(ImagePrice::Flat)
                    }
                }
                _ => unreachable!(),
            }
        }
        if p == ModelPrice::default() {
            self.error(node.pos, format!("{what} names no price"));
            return None;
        }
        Some(p)
    }

    fn key_entry(&mut self, node: &Node) -> Option<KeyEntry> {
        let fields = self.map(
            node,
            "a key entry",
            &[
                "id",
                "sha256",
                "owner",
                "team",
                "workflow",
                "environment",
                "customer",
                "user",
                "labels",
            ],
        )?;
        let mut id = None;
        let mut sha = None;
        let mut owner = None;
        let mut attributes = Vec::new();
        for required in ["id", "sha256"] {
            if !fields.iter().any(|(k, _)| *k == required) {
                self.error(node.pos, format!("a key entry needs `{required}`"));
            }
        }
        for (key, value) in fields {
            match key {
                "id" => id = self.ident(value, "keys[].id"),
                "sha256" => sha = self.sha256(value),
                "owner" => owner = self.string(value, "keys[].owner"),
                "labels" => {
                    for (label, v, _) in self.open_map(value, "keys[].labels") {
                        if let Some(s) = self.string(v, label) {
                            attributes.push((Attr::Label(label.to_string()), s));
                        }
                    }
                }
                attr => {
                    if let Some(s) = self.string(value, attr) {
                        attributes.push((Attr::parse(attr).expect("listed attribute"), s));
                    }
                }
            }
        }
        Some(KeyEntry {
            id: id?,
            sha256: sha?,
            attributes,
            owner,
            origin: self.origin(node.pos),
        })
    }

    fn sha256(&mut self, node: &Node) -> Option<[u8; 32]> {
        let text = self.string(node, "sha256")?;
        let text = text.trim().to_ascii_lowercase();
        let mut out = [0u8; 32];
        let valid = text.len() == 64
            && text.is_char_boundary(0)
            && out.iter_mut().enumerate().all(|(i, byte)| {
                match u8::from_str_radix(text.get(2 * i..2 * i + 2).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        *byte = b;
                        true
                    }
                    Err(_) => false,
                }
            });
        if !valid {
            self.error(
                node.pos,
                "`sha256` must be the 64 hex digits of the SHA-256 of the raw key (for example \
                 from `printf %s \"$KEY\" | sha256sum`); never put the raw key here",
            );
            return None;
        }
        Some(out)
    }

    fn attribute_mapping(&mut self, node: &Node) -> Option<AttributeMapping> {
        let fields = self.map(
            node,
            "attributes",
            &[
                "unknown_keys",
                "max_unknown_keys",
                "client_attributes",
                "trusted_headers",
                "headers",
                "modality_paths",
                "model_header",
            ],
        )?;
        let mut m = AttributeMapping::default();
        for (key, value) in fields {
            match key {
                "unknown_keys" => match self.string(value, "unknown_keys").as_deref() {
                    Some("allow") => m.unknown_keys = Some(UnknownKeys::Allow),
                    Some("deny") => m.unknown_keys = Some(UnknownKeys::Deny),
                    Some(other) => self.error(
                        value.pos,
                        format!("`unknown_keys` is allow or deny, found {other:?}"),
                    ),
                    None => {}
                },
                "max_unknown_keys" => {
                    if let Some(n) = self.count(value, "max_unknown_keys") {
                        m.max_unknown_keys = n.min(MAX_UNKNOWN_KEYS_BOUND) as usize;
                    }
                }
                "client_attributes" => {
                    m.client_attributes.clear();
                    for item in self.seq(value, "client_attributes") {
                        let Some(name) = self.string(item, "client_attributes") else {
                            continue;
                        };
                        match Attr::parse(&name) {
                            Some(Attr::Key | Attr::ModelFamily) => self.error(
                                item.pos,
                                format!("`{name}` cannot be set by a client: the key comes from the credential and the family from the model"),
                            ),
                            Some(attr) if m.client_attributes.contains(&attr) => self.error(
                                item.pos,
                                format!("`{name}` appears twice in `client_attributes`"),
                            ),
                            Some(attr) => m.client_attributes.push(attr),
                            None => self.error(
                                item.pos,
                                format!("unknown attribute `{name}` in `client_attributes`"),
                            ),
                        }
                    }
                }
                "trusted_headers" => {
                    for (name, header, pos) in self.open_map(value, "attributes.trusted_headers") {
                        let Some(h) = self.string(header, name) else {
                            continue;
                        };
                        let h = h.to_ascii_lowercase();
                        if name == "request_id" {
                            m.request_id_header = Some(h);
                            continue;
                        }
                        match Attr::parse(name).filter(|a| *a != Attr::ModelFamily && *a != Attr::Key) {
                            Some(attr) => m.trusted_headers.push((attr, h)),
                            None => self.error(pos, format!("`{name}` is not an attribute a header can carry (nor `request_id`); the key always comes from authorization or x-api-key")),
                        }
                    }
                }
                "headers" => self.error(
                    value.pos,
                    "`attributes.headers` is gone: a header the edge proxy sets (and strips from \
                     clients) goes under `trusted_headers`; an attribute clients may set \
                     themselves goes under `client_attributes`",
                ),
                "modality_paths" => {
                    for (prefix, modality, _) in self.open_map(value, "attributes.modality_paths") {
                        let Some(mo) = self.string(modality, prefix) else {
                            continue;
                        };
                        if !MODALITIES.contains(&mo.as_str()) {
                            self.error(
                                modality.pos,
                                format!(
                                    "modality is one of {}, found {mo:?}",
                                    MODALITIES.join(", ")
                                ),
                            );
                            continue;
                        }
                        m.modality_paths.push((prefix.to_string(), mo));
                    }
                }
                "model_header" => {
                    if let Some(h) = self.string(value, "model_header") {
                        m.model_header = h.to_ascii_lowercase();
                    }
                }
                _ => unreachable!(),
            }
        }
        Some(m)
    }

    fn defaults(&mut self, node: &Node) -> Option<Defaults> {
        let fields = self.map(
            node,
            "defaults",
            &[
                "input_tokens",
                "output_tokens",
                "images",
                "image_quality",
                "video_seconds",
                "audio_seconds",
            ],
        )?;
        let mut d = Defaults::default();
        for (key, value) in fields {
            let what = format!("defaults.{key}");
            match key {
                "input_tokens" => {
                    d.input_tokens = self.count(value, &what).unwrap_or(d.input_tokens)
                }
                "output_tokens" => {
                    d.output_tokens = self.count(value, &what).unwrap_or(d.output_tokens)
                }
                "images" => d.images = self.count(value, &what).unwrap_or(d.images),
                "image_quality" => {
                    d.image_quality = self.string(value, &what).unwrap_or(d.image_quality)
                }
                "video_seconds" => {
                    d.video_seconds = self.amount(value, &what).unwrap_or(d.video_seconds)
                }
                "audio_seconds" => {
                    d.audio_seconds = self.amount(value, &what).unwrap_or(d.audio_seconds)
                }
                _ => unreachable!(),
            }
        }
        Some(d)
    }

    fn rule(
        &mut self,
        node: &Node,
        family_refs: &mut Vec<(String, Origin)>,
        rule_ids: &mut Vec<(String, Origin)>,
    ) -> Option<Rule> {
        let fields = self.map(
            node,
            "a rule",
            &[
                "id",
                "description",
                "owner",
                "match",
                "per",
                "limit",
                "enforcement",
                "on_exceed",
                "alerts",
                "notify",
                "on_store_error",
            ],
        )?;
        let errors_before = self.diags.len();
        let fields_given: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
        let mut id = None;
        let mut description = None;
        let mut owner = None;
        let mut conditions = Vec::new();
        let mut per = Vec::new();
        let mut limit = None;
        let mut enforcement = Enforcement::Hard;
        let mut on_exceed = OnExceed::Deny;
        let mut on_exceed_pos = None;
        let mut alerts = Vec::new();
        let mut alerts_pos = None;
        let mut notify = Vec::new();
        let mut on_store_error = None;
        for (key, value) in fields {
            match key {
                "id" => id = self.ident(value, "id"),
                "description" => description = self.string(value, "description"),
                "owner" => owner = self.string(value, "owner"),
                "match" => conditions = self.conditions(value, family_refs),
                "per" => per = self.per(value),
                "limit" => limit = self.limit(value),
                "enforcement" => {
                    enforcement = match self.string(value, "enforcement").as_deref() {
                        Some("hard") => Enforcement::Hard,
                        Some("soft") => Enforcement::Soft,
                        Some("approval") => Enforcement::Approval,
                        Some(other) => {
                            self.error(
                                value.pos,
                                format!("`enforcement` is hard, soft or approval, found {other:?}"),
                            );
                            Enforcement::Hard
                        }
                        None => Enforcement::Hard,
                    }
                }
                "on_exceed" => {
                    on_exceed_pos = Some(value.pos);
                    on_exceed = self.on_exceed(value).unwrap_or(OnExceed::Deny);
                }
                "alerts" => {
                    alerts_pos = Some(value.pos);
                    alerts = self.alerts(value);
                }
                "notify" => {
                    for item in self.seq(value, "notify") {
                        if let Some(id) = self.ident(item, "notify") {
                            if notify.contains(&id) {
                                self.error(
                                    item.pos,
                                    format!("notifier `{id}` is listed twice; each alert would go to it twice"),
                                );
                            } else {
                                notify.push(id);
                            }
                        }
                    }
                }
                "on_store_error" => {
                    on_store_error = match self.string(value, "on_store_error").as_deref() {
                        Some("fail_closed") => Some(StoreFailure::FailClosed),
                        Some("fail_open") => Some(StoreFailure::FailOpen),
                        Some(other) => {
                            self.error(
                                value.pos,
                                format!(
                                    "`on_store_error` is fail_closed or fail_open, found {other:?}"
                                ),
                            );
                            None
                        }
                        None => None,
                    }
                }
                _ => unreachable!(),
            }
        }
        if let Some(id) = &id {
            rule_ids.push((id.clone(), self.origin(node.pos)));
        }
        for required in ["id", "limit"] {
            if !fields_given.contains(&required) {
                self.error(node.pos, format!("a rule needs `{required}`"));
            }
        }
        if let Some(pos) = on_exceed_pos {
            match (&enforcement, &on_exceed) {
                (Enforcement::Soft, OnExceed::Downgrade(_) | OnExceed::Approval) => self.error(
                    pos,
                    "a soft rule never blocks, so `on_exceed` cannot downgrade or ask for approval",
                ),
                (Enforcement::Approval, OnExceed::Downgrade(_)) => self.error(
                    pos,
                    "an approval rule denies until approved; it cannot downgrade",
                ),
                _ => {}
            }
        }
        if let (
            Some(Limit {
                unit: Unit::Concurrent,
                ..
            }),
            Some(pos),
        ) = (&limit, alerts_pos)
        {
            self.error(
                pos,
                "a concurrency limit goes up and down all the time, so its alerts would fire again at every climb; alert on a counted unit instead",
            );
        }
        if let Some(Limit {
            unit: Unit::Concurrent,
            ..
        }) = &limit
        {
            if matches!(on_exceed, OnExceed::Approval) {
                self.error(
                    on_exceed_pos.unwrap_or(node.pos),
                    "a concurrency limit frees up by itself; `on_exceed: approval` does not apply",
                );
            }
        }
        if self.diags.len() > errors_before {
            return None;
        }
        Some(Rule {
            id: id?,
            description,
            owner,
            conditions,
            per,
            limit: limit?,
            on_store_error: on_store_error.unwrap_or(match enforcement {
                Enforcement::Soft => StoreFailure::FailOpen,
                _ => StoreFailure::FailClosed,
            }),
            enforcement,
            on_exceed,
            alerts,
            notify,
            origin: self.origin(node.pos),
        })
    }

    fn notifier(&mut self, node: &Node) -> Option<Notifier> {
        let fields = self.map(
            node,
            "a notifier",
            &["id", "default", "log", "webhook", "redis_stream"],
        )?;
        let errors_before = self.diags.len();
        let mut id = None;
        let mut default = false;
        let mut kinds = Vec::new();
        for (key, value) in fields {
            match key {
                "id" => id = self.ident(value, "id"),
                "default" => match self.string(value, "default").as_deref() {
                    Some("true") => default = true,
                    Some("false") => default = false,
                    Some(other) => self.error(
                        value.pos,
                        format!("`default` is true or false, found {other:?}"),
                    ),
                    None => {}
                },
                "log" => kinds.push(Some(NotifierKind::Log)),
                "webhook" => kinds.push(self.webhook(value)),
                "redis_stream" => kinds.push(self.stream(value)),
                _ => unreachable!("map() rejects unknown keys"),
            }
        }
        match id.as_deref() {
            Some(LOG_NOTIFIER) => self.error(
                node.pos,
                format!("notifier id `{LOG_NOTIFIER}` is built in; choose another id"),
            ),
            None if self.diags.len() == errors_before => {
                self.error(node.pos, "a notifier needs `id`")
            }
            _ => {}
        }
        if kinds.len() != 1 {
            self.error(
                node.pos,
                "a notifier needs exactly one of `log`, `webhook` or `redis_stream`",
            );
        }
        if self.diags.len() > errors_before {
            return None;
        }
        Some(Notifier {
            id: id?,
            kind: kinds.pop()??,
            default,
            origin: self.origin(node.pos),
        })
    }

    fn webhook(&mut self, node: &Node) -> Option<NotifierKind> {
        let fields = self.map(
            node,
            "webhook",
            &["url", "secret_env", "timeout", "max_attempts"],
        )?;
        let mut url = None;
        let mut secret_env = None;
        let mut timeout_ms = 5_000;
        let mut max_attempts = 8;
        let given: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
        for (key, value) in fields {
            match key {
                "url" => {
                    url = self.string(value, "url").filter(|u| {
                        let ok = (u.starts_with("http://") || u.starts_with("https://"))
                            && u.len() > "https://".len();
                        if !ok {
                            self.error(
                                value.pos,
                                format!(
                                    "webhook `url` must be an http:// or https:// URL, found {u:?}"
                                ),
                            );
                        }
                        ok
                    })
                }
                "secret_env" => {
                    secret_env = self.string(value, "secret_env").filter(|v| {
                        let ok = v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                        if !ok {
                            self.error(
                                value.pos,
                                format!("`secret_env` names an environment variable, found {v:?}"),
                            );
                        }
                        ok
                    })
                }
                "timeout" => {
                    let text = self.string(value, "timeout");
                    match text.as_deref().and_then(parse_duration) {
                        Some(secs) if secs <= 60 => timeout_ms = secs * 1000,
                        _ => self.error(
                            value.pos,
                            "webhook `timeout` is a duration from 1s to 60s, such as 5s",
                        ),
                    }
                }
                "max_attempts" => match self.count(value, "max_attempts") {
                    Some(n) if (1..=20).contains(&n) => max_attempts = n as u32,
                    Some(_) => self.error(value.pos, "`max_attempts` is from 1 to 20"),
                    None => {}
                },
                _ => unreachable!("map() rejects unknown keys"),
            }
        }
        for required in ["url", "secret_env"] {
            if !given.contains(&required) {
                self.error(
                    node.pos,
                    format!("a webhook needs `{required}` (deliveries are always signed)"),
                );
            }
        }
        Some(NotifierKind::Webhook {
            url: url?,
            secret_env: secret_env?,
            timeout_ms,
            max_attempts,
        })
    }

    fn stream(&mut self, node: &Node) -> Option<NotifierKind> {
        let fields = self.map(node, "redis_stream", &["stream"])?;
        let Some((_, value)) = fields.first() else {
            self.error(node.pos, "a redis_stream needs `stream`");
            return None;
        };
        let name = self.ident(value, "stream")?;
        if name == APPROVALS_LOG {
            self.error(
                value.pos,
                format!("stream `{name}` is the approvals audit trail; choose another name"),
            );
            return None;
        }
        Some(NotifierKind::Stream { name })
    }

    fn conditions(
        &mut self,
        node: &Node,
        family_refs: &mut Vec<(String, Origin)>,
    ) -> Vec<Condition> {
        let mut out: Vec<Condition> = Vec::new();
        for (name, value, pos) in self.open_map(node, "match") {
            if name == "labels" {
                // `labels: { tier: gold }` reads the same as `labels.tier: gold`.
                for (label, v, _) in self.open_map(value, "match.labels") {
                    let patterns = self.patterns(v, label);
                    out.push(Condition {
                        attr: Attr::Label(label.to_string()),
                        patterns,
                    });
                }
                continue;
            }
            let Some(attr) = Attr::parse(name) else {
                self.error(
                    pos,
                    format!(
                        "unknown attribute `{name}` in match; expected key, team, workflow, \
                         environment, model, model_family, modality, customer, user, action, \
                         attempt_kind or labels.<name>"
                    ),
                );
                continue;
            };
            let patterns = self.patterns(value, name);
            let allowed: Option<&[&str]> = match attr {
                Attr::Modality => Some(&MODALITIES),
                Attr::AttemptKind => Some(&ATTEMPT_KINDS),
                _ => None,
            };
            if let Some(allowed) = allowed {
                for p in patterns.iter().filter_map(Pattern::exact) {
                    if !allowed.contains(&p) {
                        self.error(
                            value.pos,
                            format!("`{name}` is one of {}, found {p:?}", allowed.join(", ")),
                        );
                    }
                }
            }
            if attr == Attr::ModelFamily {
                for p in patterns.iter().filter_map(Pattern::exact) {
                    family_refs.push((p.to_string(), self.origin(value.pos)));
                }
            }
            out.push(Condition { attr, patterns });
        }
        out
    }

    fn per(&mut self, node: &Node) -> Vec<Attr> {
        let mut out = Vec::new();
        for item in self.seq(node, "per") {
            let Some(name) = self.string(item, "per") else {
                continue;
            };
            match Attr::parse(&name) {
                Some(attr) if out.contains(&attr) => {
                    self.error(item.pos, format!("`{name}` appears twice in `per`"))
                }
                Some(attr) => out.push(attr),
                None => self.error(item.pos, format!("unknown attribute `{name}` in `per`")),
            }
        }
        out
    }

    fn limit(&mut self, node: &Node) -> Option<Limit> {
        let Value::Map(entries) = &node.value else {
            self.error(
                node.pos,
                format!("`limit` must be a mapping, found {}", node.kind()),
            );
            return None;
        };
        let mut unit: Option<(Unit, Decimal)> = None;
        // A unit whose amount was invalid still counts as named.
        let mut unit_seen: Option<Unit> = None;
        let mut window = None;
        let mut window_pos = node.pos;
        let mut ok = true;
        for (k, v) in entries {
            let Some(name) = self.key_name(k) else {
                ok = false;
                continue;
            };
            if name == "window" {
                window_pos = v.pos;
                window = self.window(v);
                ok &= window.is_some();
                continue;
            }
            let Some(u) = Unit::parse(name) else {
                self.error(
                    k.pos,
                    format!(
                        "unknown field `{name}` in limit; expected `window` and one unit of: {}",
                        Unit::ALL.map(Unit::name).join(", ")
                    ),
                );
                ok = false;
                continue;
            };
            let Some(amount) = self.amount(v, name) else {
                ok = false;
                unit_seen.get_or_insert(u);
                continue;
            };
            if u != Unit::Spend && amount.fract() != Decimal::ZERO {
                self.error(v.pos, format!("a `{name}` limit must be a whole number"));
                ok = false;
            }
            if amount > Decimal::from(1_000_000_000_000i64) {
                self.error(
                    v.pos,
                    format!("a `{name}` limit above 10^12 is not supported"),
                );
                ok = false;
            }
            if let Some(first) = unit.map(|(u, _)| u).or(unit_seen) {
                self.error(
                    k.pos,
                    format!("a limit counts exactly one unit; found both `{first}` and `{name}`"),
                );
                ok = false;
            }
            unit = Some((u, amount));
        }
        let Some((unit, amount)) = unit else {
            if unit_seen.is_some() {
                return None;
            }
            self.error(
                node.pos,
                format!(
                    "`limit` names no unit; give one of: {}",
                    Unit::ALL.map(Unit::name).join(", ")
                ),
            );
            return None;
        };
        let window = match (unit, window) {
            (Unit::Concurrent, None | Some(Window::Lifetime)) => Window::Lifetime,
            (Unit::Concurrent, Some(_)) => {
                self.error(
                    window_pos,
                    "a `concurrent` limit counts requests in flight and takes no window",
                );
                return None;
            }
            (_, Some(w)) => w,
            (_, None) if ok => {
                self.error(node.pos, "`limit` needs a `window`");
                return None;
            }
            (_, None) => return None,
        };
        ok.then_some(Limit {
            unit,
            amount,
            window,
        })
    }

    fn window(&mut self, node: &Node) -> Option<Window> {
        let text = self.string(node, "window")?;
        let w = match text.as_str() {
            "minute" => Window::Calendar(CalendarPeriod::Minute),
            "hour" | "hourly" => Window::Calendar(CalendarPeriod::Hour),
            "daily" | "day" => Window::Calendar(CalendarPeriod::Day),
            "weekly" | "week" => Window::Calendar(CalendarPeriod::Week),
            "monthly" | "month" => Window::Calendar(CalendarPeriod::Month),
            "none" => Window::Lifetime,
            other => match parse_duration(other) {
                Some(secs) => Window::Rolling(secs),
                None => {
                    self.error(
                        node.pos,
                        format!(
                            "bad window {other:?}: use minute, hour, daily, weekly, monthly, none, \
                             or a duration such as 30s, 10m, 24h or 7d"
                        ),
                    );
                    return None;
                }
            },
        };
        Some(w)
    }

    fn on_exceed(&mut self, node: &Node) -> Option<OnExceed> {
        match &node.value {
            Value::Scalar { text, .. } => match text.as_str() {
                "deny" => Some(OnExceed::Deny),
                "approval" => Some(OnExceed::Approval),
                other => {
                    self.error(
                        node.pos,
                        format!("`on_exceed` is deny, approval or {{ downgrade: MODEL }}, found {other:?}"),
                    );
                    None
                }
            },
            Value::Map(_) => {
                let fields = self.map(node, "on_exceed", &["downgrade"])?;
                let (_, model) = fields.first()?;
                self.string(model, "downgrade").map(OnExceed::Downgrade)
            }
            _ => {
                self.error(
                    node.pos,
                    "`on_exceed` is deny, approval or { downgrade: MODEL }",
                );
                None
            }
        }
    }

    fn alerts(&mut self, node: &Node) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        for item in self.seq(node, "alerts") {
            let Some(n) = self.count(item, "alerts") else {
                continue;
            };
            if n == 0 || n > 1000 {
                self.error(
                    item.pos,
                    format!("an alert threshold is a percentage from 1 to 1000, found {n}"),
                );
            } else if out.last().is_some_and(|&last| last >= n as u32) {
                self.error(
                    item.pos,
                    "alert thresholds must be listed in ascending order, each once",
                );
            } else {
                out.push(n as u32);
            }
        }
        out
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
