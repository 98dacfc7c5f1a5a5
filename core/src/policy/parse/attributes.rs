//! The `attributes` section: where a request's attributes come from, and
//! which of them a client may set itself.

use super::Reader;
use crate::policy::model::*;
use crate::policy::yaml::Node;

/// The most unregistered keys a policy may count apart.
const MAX_UNKNOWN_KEYS_BOUND: u64 = 1_000_000;

impl Reader<'_> {
    pub(super) fn attribute_mapping(&mut self, node: &Node) -> Option<AttributeMapping> {
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
                "settle",
                "on_upstream_error",
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
                "settle" => match self.string(value, "settle").as_deref() {
                    Some("always") => m.settle = Settle::Always,
                    Some("never") => m.settle = Settle::Never,
                    Some(other) => self.error(
                        value.pos,
                        format!("`settle` is always or never, found {other:?}"),
                    ),
                    None => {}
                },
                "on_upstream_error" => {
                    match self.string(value, "on_upstream_error").as_deref() {
                        Some("charge_reported") => {
                            m.on_upstream_error = OnUpstreamError::ChargeReported
                        }
                        Some("keep_estimate") => m.on_upstream_error = OnUpstreamError::KeepEstimate,
                        Some(other) => self.error(
                            value.pos,
                            format!(
                                "`on_upstream_error` is charge_reported or keep_estimate, found {other:?}"
                            ),
                        ),
                        None => {}
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
}
