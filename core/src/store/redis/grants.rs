//! Approval grants: the record in force (`g:` key, read by `reserve.lua`
//! in the slot of the counters it opens) and the listing (`grants` hash).
//!
//! The listing is bounded: expired grants leave it whenever a grant is made
//! or listed, at most `MAX_GRANTS` are in force at once, and the hash
//! itself expires with the last grant in it.

use super::codec::{decode_grant, decode_grant_in_force, encode_grant, encode_grant_in_force};
use super::{RedisStore, CLEANUP_GRACE};
use crate::store::*;

/// Grants in force at once. Grants are made by people, so this is far
/// above any real use; it bounds what a leaked admin token could write.
pub const MAX_GRANTS: usize = 10_000;

impl RedisStore {
    pub(super) async fn store_grant(&self, grant: &Grant, now: Millis) -> Result<(), StoreError> {
        let record = encode_grant(grant)
            .map_err(|e| StoreError::Unavailable(format!("cannot encode a grant: {e}")))?;
        // Listing prunes what has expired, which also counts what is left.
        let live = self.live_grants(now).await?;
        if live.len() >= MAX_GRANTS && !live.iter().any(|g| g.key == grant.key) {
            return Err(StoreError::Full(MAX_GRANTS));
        }
        // The index first: a grant that is listed but not yet in force is
        // visible to the approver; one in force but unlisted would not be.
        self.query::<()>(
            ::redis::cmd("HSET")
                .arg(self.grant_index_key())
                .arg(&grant.key)
                .arg(record),
        )
        .await?;
        let ttl = (grant.expires_at - now).max(1) + CLEANUP_GRACE;
        // The listing lives as long as its longest grant.
        let index_ttl: i64 = self
            .query(::redis::cmd("PTTL").arg(self.grant_index_key()))
            .await?;
        if index_ttl < ttl {
            self.query::<()>(::redis::cmd("PEXPIRE").arg(self.grant_index_key()).arg(ttl))
                .await?;
        }
        let in_force = self
            .query::<()>(
                ::redis::cmd("SET")
                    .arg(self.grant_key(&grant.key))
                    .arg(encode_grant_in_force(grant))
                    .arg("PX")
                    .arg(ttl),
            )
            .await;
        if in_force.is_err() {
            // Listed but not in force would mislead; best effort.
            let _ = self
                .query::<()>(
                    ::redis::cmd("HDEL")
                        .arg(self.grant_index_key())
                        .arg(&grant.key),
                )
                .await;
        }
        in_force
    }

    /// The extra of the grant in force at each grant key (`rule|scope`), as
    /// `reserve.lua` would read it at `now`: none when there is no active
    /// one. One GET a key, since the keys may sit in different slots.
    pub(super) async fn grants_in_force(
        &self,
        keys: &[&str],
        now: Millis,
    ) -> Result<Vec<Option<i64>>, StoreError> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let record: Option<String> = self
                .query(::redis::cmd("GET").arg(self.grant_key(key)))
                .await?;
            out.push(record.and_then(|r| decode_grant_in_force(&r, now)));
        }
        Ok(out)
    }

    pub(super) async fn drop_grant(
        &self,
        key: &str,
        now: Millis,
    ) -> Result<Option<Grant>, StoreError> {
        // Out of force first, then out of the listing.
        self.query::<()>(::redis::cmd("DEL").arg(self.grant_key(key)))
            .await?;
        let record: Option<String> = self
            .query(::redis::cmd("HGET").arg(self.grant_index_key()).arg(key))
            .await?;
        self.query::<()>(::redis::cmd("HDEL").arg(self.grant_index_key()).arg(key))
            .await?;
        let grant = record.and_then(|r| match decode_grant(&r) {
            Ok(g) => Some(g),
            Err(e) => {
                tracing::warn!(error = %e, "removed a grant whose record does not read");
                None
            }
        });
        Ok(grant.filter(|g| g.active(now)))
    }

    pub(super) async fn live_grants(&self, now: Millis) -> Result<Vec<Grant>, StoreError> {
        let records: Vec<(String, String)> = self
            .query(::redis::cmd("HGETALL").arg(self.grant_index_key()))
            .await?;
        let mut grants = Vec::new();
        for (key, record) in records {
            let grant = decode_grant(&record);
            if let Err(e) = &grant {
                tracing::warn!(error = %e, "dropping a grant record that does not read from the listing");
            }
            match grant {
                Ok(g) if g.active(now) => grants.push(g),
                _ => {
                    let mut inv = self.forget_grant.prepare_invoke();
                    inv.key(self.grant_index_key()).arg(&key).arg(&record);
                    self.invoke::<i64>(&inv).await?;
                }
            }
        }
        grants.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(grants)
    }
}
