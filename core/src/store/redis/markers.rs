//! Alert markers: one `SET NX GET` a marker, so that of every replica and
//! every decision that finds a counter past a threshold, exactly one fires
//! it; the old value it returns tells an attempt whose answer was lost
//! whether it was the one. Markers are set only when a process first finds
//! a threshold reached, which is rare, so each is its own command (they may
//! sit in different slots).

use super::{RedisStore, CLEANUP_GRACE};
use crate::store::*;

impl RedisStore {
    pub(super) async fn set_markers(
        &self,
        markers: &[AlertMarker],
        now: Millis,
    ) -> Result<Vec<bool>, StoreError> {
        let mut out = Vec::with_capacity(markers.len());
        for marker in markers {
            let mut cmd = ::redis::cmd("SET");
            cmd.arg(self.alert_marker_key(&marker.key))
                .arg(&marker.token)
                .arg("NX")
                .arg("GET");
            if let Some(until) = marker.expires_at {
                cmd.arg("PX").arg((until - now).max(1) + CLEANUP_GRACE);
            }
            let before: Option<String> = self.query(&cmd).await?;
            out.push(before.is_none_or(|t| t == marker.token));
        }
        Ok(out)
    }
}
