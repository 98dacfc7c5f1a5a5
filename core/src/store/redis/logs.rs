//! Append-only logs (the approvals audit trail, the alert feed) as Redis
//! streams, each trimmed to about [`RedisConfig::log_max_entries`] entries
//! and gone once nothing was appended for [`RedisConfig::log_retention`].

use super::RedisStore;
use crate::store::StoreError;

impl RedisStore {
    pub(super) async fn append_entry(&self, log: &str, entry: &str) -> Result<(), StoreError> {
        let key = self.log_key(log);
        self.query::<String>(
            ::redis::cmd("XADD")
                .arg(&key)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.logs.max_entries)
                .arg("*")
                .arg("entry")
                .arg(entry),
        )
        .await?;
        self.query::<()>(
            ::redis::cmd("PEXPIRE")
                .arg(&key)
                .arg(self.logs.retention.as_millis() as u64),
        )
        .await
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
