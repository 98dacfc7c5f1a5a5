//! The `keys` section: each API key, known only by its SHA-256, and the
//! attributes it carries.

use super::Reader;
use crate::policy::model::*;
use crate::policy::yaml::Node;

impl Reader<'_> {
    pub(super) fn key_entry(&mut self, node: &Node) -> Option<KeyEntry> {
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
}
