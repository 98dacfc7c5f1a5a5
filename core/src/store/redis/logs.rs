//! Append-only logs (the approvals audit trail, the alert feed) as Redis
//! streams, trimmed to about `MAX_LOG_ENTRIES` entries each.

use super::{RedisStore, MAX_LOG_ENTRIES};
use crate::store::StoreError;

impl RedisStore {
    pub(super) async fn append_entry(&self, log: &str, entry: &str) -> Result<(), StoreError> {
        self.query::<String>(
            ::redis::cmd("XADD")
                .arg(self.log_key(log))
                .arg("MAXLEN")
                .arg("~")
                .arg(MAX_LOG_ENTRIES)
                .arg("*")
                .arg("entry")
                .arg(entry),
        )
        .await
        .map(|_| ())
    }

    pub(super) async fn last_entries(
        &self,
        log: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let reply: Vec<(String, Vec<(String, String)>)> = self
            .query(
                ::redis::cmd("XREVRANGE")
                    .arg(self.log_key(log))
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(limit),
            )
            .await?;
        Ok(reply
            .into_iter()
            .rev()
            .filter_map(|(_, fields)| {
                fields
                    .into_iter()
                    .find(|(name, _)| name == "entry")
                    .map(|(_, v)| v)
            })
            .collect())
    }
}
