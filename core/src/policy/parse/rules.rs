//! The `rules` section: one budget rule, with the requests it `match`es, the
//! attributes it counts `per`, what happens `on_exceed` (and `on_overrun`)
//! and its `alerts`.
//! The `limit` itself is read in `limit.rs`.

use super::Reader;
use crate::policy::glob::Pattern;
use crate::policy::model::*;
use crate::policy::yaml::{Node, Value};

impl Reader<'_> {
    pub(super) fn rule(
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
                "on_overrun",
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
        let mut on_overrun = OnOverrun::Finish;
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
                "on_overrun" => {
                    on_overrun = match self.string(value, "on_overrun").as_deref() {
                        Some("finish") => OnOverrun::Finish,
                        Some("cut") => OnOverrun::Cut,
                        Some(other) => {
                            self.error(
                                value.pos,
                                format!("`on_overrun` is finish or cut, found {other:?}"),
                            );
                            OnOverrun::Finish
                        }
                        None => OnOverrun::Finish,
                    }
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
            on_overrun,
            alerts,
            notify,
            origin: self.origin(node.pos),
        })
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
