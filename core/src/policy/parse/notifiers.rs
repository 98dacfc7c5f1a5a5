//! The `notifiers` section: where alerts go (the log, a signed webhook or a
//! Redis stream).

use super::{parse_duration, Reader};
use crate::policy::model::*;
use crate::policy::yaml::Node;

impl Reader<'_> {
    pub(super) fn notifier(&mut self, node: &Node) -> Option<Notifier> {
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
}
