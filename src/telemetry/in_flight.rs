//! Reservations made and not yet settled or expired, as this process knows
//! them, without a lock on the decision path.
//!
//! Each reservation is counted in the slot of the time bucket it expires
//! in. A slot packs its bucket number and its count into one atomic word,
//! so a stale slot (a bucket long past) is reclaimed by the same
//! compare-and-swap that counts into it. The ring spans more than the
//! reservation TTL, so a slot is only ever reused once its bucket expired.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tollgate_core::engine::window::Millis;

const SLOTS: usize = 1024;
const COUNT_BITS: u32 = 24;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

#[derive(Debug)]
pub struct InFlight {
    slots: Vec<AtomicU64>,
    /// Milliseconds per bucket.
    width: Millis,
}

impl InFlight {
    pub fn new(ttl: Duration) -> InFlight {
        // Half the ring covers the TTL, so that buckets alive now never
        // share a slot.
        let ttl = ttl.as_millis().max(1) as Millis;
        let width = (ttl / (SLOTS as Millis / 2) + 1).max(100);
        InFlight {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            width,
        }
    }

    fn bucket(&self, expires_at: Millis) -> u64 {
        (expires_at.max(0) / self.width) as u64
    }

    /// A reservation that will expire at `expires_at` unless settled.
    pub fn reserved(&self, expires_at: Millis) {
        let b = self.bucket(expires_at);
        let slot = &self.slots[b as usize % SLOTS];
        let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            Some(if v >> COUNT_BITS == b {
                if v & COUNT_MASK == COUNT_MASK {
                    v
                } else {
                    v + 1
                }
            } else {
                (b << COUNT_BITS) | 1
            })
        });
    }

    /// A reservation expiring at `expires_at` was settled. One settled
    /// here but made by another replica finds nothing to take away.
    pub fn settled(&self, expires_at: Millis) {
        let b = self.bucket(expires_at);
        let slot = &self.slots[b as usize % SLOTS];
        let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            (v >> COUNT_BITS == b && v & COUNT_MASK > 0).then(|| v - 1)
        });
    }

    /// Reservations whose bucket has not ended by `now`. Counting whole
    /// buckets, an expired reservation may linger for one bucket width.
    pub fn count(&self, now: Millis) -> u64 {
        let current = self.bucket(now);
        self.slots
            .iter()
            .map(|s| s.load(Ordering::Acquire))
            .filter(|v| v >> COUNT_BITS >= current)
            .map(|v| v & COUNT_MASK)
            .sum()
    }

    #[cfg(test)]
    pub(crate) fn width(&self) -> Millis {
        self.width
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_reservations_until_settled_or_expired() {
        let f = InFlight::new(Duration::from_secs(600));
        let now = 1_700_000_000_000;
        let ttl = 600_000;
        for i in 0..5 {
            f.reserved(now + i + ttl);
        }
        assert_eq!(f.count(now), 5);
        f.settled(now + ttl);
        f.settled(now + 1 + ttl);
        assert_eq!(f.count(now), 3);
        // Settling something this process never counted changes nothing.
        f.settled(now + 3 * ttl);
        assert_eq!(f.count(now), 3);
        assert_eq!(f.count(now + ttl + f.width() + 10), 0);
        // A later bucket that lands on the same slot replaces the stale one.
        let later = now + ttl + f.width() * SLOTS as Millis;
        f.reserved(later);
        assert_eq!(f.count(later - ttl), 1);
    }
}
