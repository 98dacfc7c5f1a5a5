//! The embedded store, kept across restarts in a data directory.
//!
//! [`DurableStore`] wraps a [`MemoryStore`]: every decision is made in
//! memory as before, and every call that changes the store (reserve,
//! settle, withdraw, alert markers, spend-account changes, grants, log
//! appends) is also written, as the call itself, to a log of changes. A
//! background thread writes the log and syncs it to disk every
//! `sync_every` (group commit: a decision never waits for a disk); now and
//! then, and at a graceful shutdown, it writes a snapshot of the whole
//! state and empties the log.
//!
//! *Invariant: the log holds the calls in exactly the order the memory
//! store applied them.* One lock (`journal`) is held across applying a
//! call and appending it to the pending bytes, so replaying the log into
//! the snapshot it follows gives the same state, and the same outcome
//! for every call, as the store had: near a cap, the order decides which
//! reserve fits. A snapshot is taken under the same lock, and carries the
//! sequence number of the last call it holds, so a call is never applied
//! twice nor skipped, wherever a crash falls between the snapshot and
//! the emptying of the log. (Reads also let lapsed concurrency slots go;
//! that depends only on the time, and the next logged call with a later
//! time does the same on replay.)
//!
//! What may be lost: after [`DurableStore::close`] (the server's graceful
//! shutdown), nothing; after a crash, the calls of at most the last
//! `sync_every` (plus the one write and sync under way). A damaged file
//! (a torn write, a full disk, a flipped bit) is never read as empty: it
//! fails [`DurableStore::open`] with the file and offset. A write that fails
//! at run time is logged and reported to `on_disk_error`; the store keeps
//! deciding in memory and retries with a full snapshot at every interval
//! until one succeeds, so the files never hold a gap.

mod codec;
mod disk;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;

use super::*;
use crate::store::memory::MemoryStore;

pub use codec::Damage;

/// The default of `sync_every`: at most this much is lost in a crash.
pub const DEFAULT_SYNC_EVERY: Duration = Duration::from_millis(1_000);
/// A snapshot is taken when the log has grown past this many bytes (and
/// past the last snapshot's size)...
pub const SNAPSHOT_LOG_BYTES: u64 = 64 << 20;
/// ...or this long after the last one, if anything changed since.
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(300);
/// Bytes waiting for the writer at most; past it (a disk that hangs) they
/// are dropped and the next snapshot, which holds them, replaces the log.
const MAX_PENDING: usize = 256 << 20;

/// Which write failed, for the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskWrite {
    Log,
    Snapshot,
}

impl DiskWrite {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskWrite::Log => "log",
            DiskWrite::Snapshot => "snapshot",
        }
    }
}

/// Called on the writer thread after each failed write.
pub type DiskErrorHook = Arc<dyn Fn(DiskWrite) + Send + Sync>;

#[derive(Clone)]
pub struct DurableConfig {
    pub dir: PathBuf,
    pub max_counters: usize,
    pub sync_every: Duration,
    pub snapshot_log_bytes: u64,
    pub snapshot_every: Duration,
    pub on_disk_error: Option<DiskErrorHook>,
}

impl DurableConfig {
    pub fn new(dir: impl Into<PathBuf>) -> DurableConfig {
        DurableConfig {
            dir: dir.into(),
            max_counters: super::memory::DEFAULT_MAX_COUNTERS,
            sync_every: DEFAULT_SYNC_EVERY,
            snapshot_log_bytes: SNAPSHOT_LOG_BYTES,
            snapshot_every: SNAPSHOT_EVERY,
            on_disk_error: None,
        }
    }
}

impl fmt::Debug for DurableConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableConfig")
            .field("dir", &self.dir)
            .field("max_counters", &self.max_counters)
            .field("sync_every", &self.sync_every)
            .finish_non_exhaustive()
    }
}

/// Why the data directory could not be opened: the file, and where in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {what}", file.display(), offset.map(|o| format!(" at byte {o}")).unwrap_or_default())]
pub struct OpenError {
    pub file: PathBuf,
    pub offset: Option<u64>,
    pub what: String,
}

/// What [`DurableStore::open`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovered {
    /// Whether there was a snapshot.
    pub snapshot: bool,
    /// Calls replayed from the log on top of it.
    pub replayed: u64,
}

pub struct DurableStore {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<Result<(), String>>>>,
    recovered: Recovered,
}

struct Shared {
    memory: MemoryStore,
    /// Held across applying a call and queueing its record (see the top).
    journal: Mutex<Journal>,
    /// Wakes the writer early: to close.
    wake: Condvar,
}

struct Journal {
    /// Whole records (checksums not yet filled in) the writer has not
    /// taken yet.
    pending: Vec<u8>,
    next_seq: u64,
    /// Set by `close`: no call changes the store after it.
    closing: bool,
    /// Set when pending records were dropped: only a snapshot can make
    /// the files whole again.
    lost: bool,
    /// Tests only: the writer stops at once, writing nothing more, as if
    /// the process had been killed.
    crash: bool,
}

impl fmt::Debug for DurableStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableStore")
            .field("memory", &self.shared.memory)
            .finish_non_exhaustive()
    }
}

/// Runs a memory-store call to its end now. The memory store never waits
/// (its calls are `async` only for the trait), so the first poll is the
/// answer; that is what lets the journal lock be a plain mutex held
/// across the call.
fn now_or_fail<T>(call: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    let mut call = std::pin::pin!(call);
    match call.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => r,
        Poll::Pending => Err(StoreError::Unavailable(
            "the embedded store's call did not complete at once".to_string(),
        )),
    }
}

impl DurableStore {
    /// Locks the directory (made if missing), reads its snapshot and
    /// replays its log, writes a fresh snapshot of what it found, and
    /// starts the writer. Any file that does not read whole is an error.
    pub fn open(config: DurableConfig) -> Result<DurableStore, OpenError> {
        let (files, memory, next_seq, recovered) = disk::recover(&config)?;
        let shared = Arc::new(Shared {
            memory,
            journal: Mutex::new(Journal {
                pending: Vec::new(),
                next_seq,
                closing: false,
                lost: false,
                crash: false,
            }),
            wake: Condvar::new(),
        });
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("tollgate-store-writer".to_string())
                .spawn(move || disk::writer(&shared, files, &config))
                .map_err(|e| OpenError {
                    file: PathBuf::new(),
                    offset: None,
                    what: format!("cannot start the store's writer thread: {e}"),
                })?
        };
        Ok(DurableStore {
            shared,
            writer: Mutex::new(Some(writer)),
            recovered,
        })
    }

    pub fn recovered(&self) -> Recovered {
        self.recovered
    }

    /// Live counters right now.
    pub fn counter_count(&self) -> usize {
        self.shared.memory.counter_count()
    }

    /// Stops taking changes, writes what is pending and a final snapshot,
    /// and stops the writer. After it, every call that would change the
    /// store fails as unavailable. Err says what could not be written.
    pub async fn close(&self) -> Result<(), String> {
        let handle = self.take_writer();
        let Some(handle) = handle else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || handle.join())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|_| "the store's writer thread panicked".to_string())?
    }

    /// Stops the writer where it is, as a killed process would: what it
    /// has not written stays unwritten, and the directory's lock goes.
    #[cfg(test)]
    fn crash(self) {
        self.shared.journal().crash = true;
        self.shared.wake.notify_all();
        let handle = self.writer.lock().unwrap().take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }

    fn take_writer(&self) -> Option<JoinHandle<Result<(), String>>> {
        self.shared.journal().closing = true;
        self.shared.wake.notify_all();
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Applies `call` to memory and queues its record, under the journal
    /// lock: the log's order is the order of application.
    fn logged<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
        record: impl FnOnce(&mut Vec<u8>),
    ) -> Result<T, StoreError> {
        let mut journal = self.shared.journal();
        if journal.closing {
            return Err(StoreError::Unavailable(
                "the embedded store is closed: the server is shutting down".to_string(),
            ));
        }
        // Logged whatever it answers: a refused call may still have swept.
        let result = now_or_fail(call);
        let seq = journal.next_seq;
        journal.next_seq += 1;
        codec::frame(&mut journal.pending, seq, record);
        if journal.pending.len() > MAX_PENDING {
            journal.pending = Vec::new();
            journal.lost = true;
        }
        result
    }
}

impl Shared {
    fn journal(&self) -> MutexGuard<'_, Journal> {
        // Nothing under this lock panics halfway through an update.
        self.journal.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for DurableStore {
    fn drop(&mut self) {
        if let Some(handle) = self.take_writer() {
            let _ = handle.join();
        }
    }
}

#[async_trait]
impl CounterStore for DurableStore {
    async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveOutcome, StoreError> {
        self.logged(self.shared.memory.reserve(req), |b| {
            codec::put_reserve(b, req)
        })
    }

    async fn reservation(&self, id: &str, now: Millis) -> Result<Option<Reservation>, StoreError> {
        self.shared.memory.reservation(id, now).await
    }

    async fn settle(
        &self,
        id: &str,
        actual: &[i64],
        now: Millis,
    ) -> Result<SettleOutcome, StoreError> {
        self.logged(self.shared.memory.settle(id, actual, now), |b| {
            codec::put_settle(b, id, actual, now)
        })
    }

    async fn withdraw(
        &self,
        id: &str,
        request_id: Option<&str>,
        now: Millis,
    ) -> Result<SettleOutcome, StoreError> {
        self.logged(self.shared.memory.withdraw(id, request_id, now), |b| {
            codec::put_withdraw(b, id, request_id, now)
        })
    }

    async fn mark_alerts(
        &self,
        markers: &[AlertMarker],
        now: Millis,
    ) -> Result<Vec<bool>, StoreError> {
        self.logged(self.shared.memory.mark_alerts(markers, now), |b| {
            codec::put_mark_alerts(b, markers, now)
        })
    }

    fn can_stall(&self) -> bool {
        self.shared.memory.can_stall()
    }

    async fn read(
        &self,
        counters: &[CounterRef],
        now: Millis,
    ) -> Result<Vec<CounterState>, StoreError> {
        self.shared.memory.read(counters, now).await
    }

    async fn put_grant(&self, grant: &Grant, now: Millis) -> Result<(), StoreError> {
        self.logged(self.shared.memory.put_grant(grant, now), |b| {
            codec::put_grant(b, grant, now)
        })
    }

    async fn remove_grant(&self, key: &str, now: Millis) -> Result<Option<Grant>, StoreError> {
        self.logged(self.shared.memory.remove_grant(key, now), |b| {
            codec::put_remove_grant(b, key, now)
        })
    }

    async fn grants(&self, now: Millis) -> Result<Vec<Grant>, StoreError> {
        self.shared.memory.grants(now).await
    }

    async fn append(&self, log: &str, entry: &str) -> Result<(), StoreError> {
        self.logged(self.shared.memory.append(log, entry), |b| {
            codec::put_append(b, log, entry)
        })
    }

    async fn entries(&self, log: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        self.shared.memory.entries(log, limit).await
    }

    async fn record_spend(
        &self,
        batch: &str,
        deltas: &[SpendDelta],
        bounds: SpendBounds,
        now: Millis,
    ) -> Result<(), StoreError> {
        self.logged(
            self.shared.memory.record_spend(batch, deltas, bounds, now),
            |b| codec::put_record_spend(b, batch, deltas, bounds, now),
        )
    }

    async fn spend(
        &self,
        from: crate::store::spend::Day,
        to: crate::store::spend::Day,
    ) -> Result<Vec<SpendDay>, StoreError> {
        self.shared.memory.spend(from, to).await
    }
}

#[cfg(test)]
mod tests;
