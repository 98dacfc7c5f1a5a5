//! The data directory's files, and the writer thread.
//!
//! ```text
//! LOCK              held (flock) while a process uses the directory
//! store.snapshot    the state after call `seq`, replaced atomically
//! store.log         the calls since, each a checksummed record
//! ```
//!
//! A snapshot is written to `store.snapshot.tmp`, synced, renamed over
//! `store.snapshot`, and the directory synced; only then is the log cut
//! back to its header. A crash at any step leaves a snapshot and a log
//! whose records it does not hold, or holds by `seq` (those are skipped).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::codec::{self, Call, Damage, HEADER, LOG_MAGIC, SNAPSHOT_MAGIC};
use super::{now_or_fail, DiskWrite, DurableConfig, OpenError, Recovered, Shared};
use crate::store::memory::{MemoryImage, MemoryStore};
use crate::store::CounterStore;

const LOCK: &str = "LOCK";
const SNAPSHOT: &str = "store.snapshot";
const LOG: &str = "store.log";
const MAGIC_LEN: u64 = 8;

pub(super) struct Files {
    dir: PathBuf,
    log: File,
    /// Bytes of the log that hold whole records, its magic included.
    log_len: u64,
    /// Bytes of the last snapshot written.
    snapshot_len: u64,
    /// Held for the life of the store: the lock goes with it.
    _lock: File,
}

fn open_error(file: &Path, offset: Option<u64>, what: impl Into<String>) -> OpenError {
    OpenError {
        file: file.to_path_buf(),
        offset,
        what: what.into(),
    }
}

fn damaged(file: &Path, d: Damage) -> OpenError {
    open_error(
        file,
        Some(d.offset),
        format!(
            "{}; refusing to start rather than lose or guess its counters \
             (move the data directory aside to start empty)",
            d.what
        ),
    )
}

/// Reads what a file holds, or `None` when there is no such file.
fn read_if_there(path: &Path) -> Result<Option<Vec<u8>>, OpenError> {
    match fs::read(path) {
        Ok(data) => Ok(Some(data)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(open_error(path, None, format!("cannot read: {e}"))),
    }
}

fn check_magic(path: &Path, data: &[u8], magic: &[u8; 8]) -> Result<(), OpenError> {
    if data.len() < magic.len() {
        return Err(damaged(
            path,
            Damage {
                offset: 0,
                what: format!(
                    "cut short: {} bytes, less than the 8-byte header (a torn write?)",
                    data.len()
                ),
            },
        ));
    }
    if &data[..8] != magic {
        return Err(damaged(
            path,
            Damage {
                offset: 0,
                what: "not a tollgate store file (wrong header)".to_string(),
            },
        ));
    }
    Ok(())
}

/// Locks the directory, rebuilds the state from its snapshot and log,
/// and writes it back as a fresh snapshot and an empty log. Returns the
/// files, the store, the next call's seq and what was found.
pub(super) fn recover(
    config: &DurableConfig,
) -> Result<(Files, MemoryStore, u64, Recovered), OpenError> {
    let dir = config.dir.clone();
    fs::create_dir_all(&dir)
        .map_err(|e| open_error(&dir, None, format!("cannot make the data directory: {e}")))?;
    let lock_path = dir.join(LOCK);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| open_error(&lock_path, None, format!("cannot open: {e}")))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            return Err(open_error(
                &lock_path,
                None,
                "the data directory is in use by another tollgate process; \
                 give each server its own --data-dir",
            ))
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(open_error(&lock_path, None, format!("cannot lock: {e}")))
        }
    }

    let snapshot_path = dir.join(SNAPSHOT);
    let mut recovered = Recovered::default();
    let (memory, snapshot_seq) = match read_if_there(&snapshot_path)? {
        None => (MemoryStore::new(config.max_counters), 0),
        Some(data) => {
            check_magic(&snapshot_path, &data, SNAPSHOT_MAGIC)?;
            let at = MAGIC_LEN as usize;
            let (seq, body, end) = match codec::record(&data, at) {
                Ok(Some(r)) => r,
                Ok(None) => {
                    return Err(damaged(
                        &snapshot_path,
                        Damage {
                            offset: MAGIC_LEN,
                            what: "cut short: no state after the header (a torn write?)".into(),
                        },
                    ))
                }
                Err(d) => return Err(damaged(&snapshot_path, d)),
            };
            if end != data.len() {
                return Err(damaged(
                    &snapshot_path,
                    Damage {
                        offset: end as u64,
                        what: "bytes after the snapshot's one record".into(),
                    },
                ));
            }
            let image = MemoryImage::from_json(body).map_err(|e| {
                damaged(
                    &snapshot_path,
                    Damage {
                        offset: (at + HEADER + 8) as u64,
                        what: format!("the state does not decode: {e}"),
                    },
                )
            })?;
            recovered.snapshot = true;
            (MemoryStore::from_image(config.max_counters, image), seq)
        }
    };

    let log_path = dir.join(LOG);
    let mut last = snapshot_seq;
    if let Some(data) = read_if_there(&log_path)? {
        check_magic(&log_path, &data, LOG_MAGIC)?;
        let mut at = MAGIC_LEN as usize;
        let mut expect: Option<u64> = None;
        loop {
            let (seq, body, next) = match codec::record(&data, at) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(d) => return Err(damaged(&log_path, d)),
            };
            let gap = |what: String| {
                damaged(
                    &log_path,
                    Damage {
                        offset: at as u64,
                        what,
                    },
                )
            };
            if let Some(e) = expect.filter(|e| *e != seq) {
                return Err(gap(format!(
                    "call {seq} where call {e} was expected: calls are missing"
                )));
            }
            expect = Some(seq + 1);
            if seq > last {
                if seq != last + 1 {
                    return Err(gap(format!(
                        "the log goes on at call {seq} but the snapshot ends at call {last}: calls are missing"
                    )));
                }
                let call = codec::call(body, at + HEADER + 8).map_err(|d| damaged(&log_path, d))?;
                replay(&memory, call);
                recovered.replayed += 1;
                last = seq;
            }
            at = next;
        }
    }

    for leftover in [tmp(&dir, SNAPSHOT), tmp(&dir, LOG)] {
        // A snapshot or log that was never renamed into place replaced
        // nothing: the files it would have replaced are the record.
        let _ = fs::remove_file(leftover);
    }
    let snapshot_len = write_snapshot(&dir, &memory.export(), last).map_err(|e| {
        open_error(
            &snapshot_path,
            None,
            format!("cannot write a snapshot of the recovered state: {e}"),
        )
    })?;
    let log = fresh_log(&dir)
        .map_err(|e| open_error(&log_path, None, format!("cannot start a fresh log: {e}")))?;
    let files = Files {
        dir,
        log,
        log_len: MAGIC_LEN,
        snapshot_len,
        _lock: lock,
    };
    Ok((files, memory, last + 1, recovered))
}

/// Applies one logged call again; its answer was given before the crash.
fn replay(memory: &MemoryStore, call: Call) {
    let _ = match call {
        Call::Reserve(req) => now_or_fail(memory.reserve(&req)).map(drop),
        Call::Settle { id, actual, now } => now_or_fail(memory.settle(&id, &actual, now)).map(drop),
        Call::Withdraw {
            id,
            request_id,
            now,
        } => now_or_fail(memory.withdraw(&id, request_id.as_deref(), now)).map(drop),
        Call::MarkAlerts { markers, now } => {
            now_or_fail(memory.mark_alerts(&markers, now)).map(drop)
        }
        Call::PutGrant { grant, now } => now_or_fail(memory.put_grant(&grant, now)),
        Call::RemoveGrant { key, now } => now_or_fail(memory.remove_grant(&key, now)).map(drop),
        Call::Append { log, entry } => now_or_fail(memory.append(&log, &entry)),
        Call::RecordSpend {
            batch,
            deltas,
            bounds,
            now,
        } => now_or_fail(memory.record_spend(&batch, &deltas, bounds, now)),
    };
}

fn tmp(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.tmp"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `name` atomically: a temporary file, synced, renamed
/// into place, the directory synced.
fn replace(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = tmp(dir, name);
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Returns the snapshot's size.
fn write_snapshot(dir: &Path, image: &MemoryImage, seq: u64) -> io::Result<u64> {
    let state = image.to_json().map_err(io::Error::other)?;
    let mut bytes = Vec::with_capacity(state.len() + 32);
    bytes.extend_from_slice(SNAPSHOT_MAGIC);
    codec::frame(&mut bytes, seq, |b| b.extend_from_slice(&state));
    codec::seal(&mut bytes[MAGIC_LEN as usize..]);
    replace(dir, SNAPSHOT, &bytes)?;
    Ok(bytes.len() as u64)
}

/// An empty log, put in place atomically, opened for appending.
fn fresh_log(dir: &Path) -> io::Result<File> {
    replace(dir, LOG, LOG_MAGIC)?;
    OpenOptions::new().append(true).open(dir.join(LOG))
}

impl Files {
    /// Appends whole, sealed records and syncs them. On failure the log is
    /// cut back to its last whole record, so that a later record never
    /// follows a torn one.
    fn append(&mut self, records: &[u8]) -> io::Result<()> {
        let written = self
            .log
            .write_all(records)
            .and_then(|()| self.log.sync_data());
        match written {
            Ok(()) => {
                self.log_len += records.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self.log.set_len(self.log_len);
                Err(e)
            }
        }
    }

    /// A snapshot at `seq`, then the log cut back to its header.
    fn snapshot(&mut self, image: &MemoryImage, seq: u64) -> io::Result<()> {
        self.snapshot_len = write_snapshot(&self.dir, image, seq)?;
        self.log.set_len(MAGIC_LEN)?;
        self.log.sync_data()?;
        self.log_len = MAGIC_LEN;
        Ok(())
    }
}

fn report(config: &DurableConfig, what: DiskWrite, file: &Path, e: &io::Error) {
    tracing::error!(
        file = %file.display(),
        error = %e,
        "cannot write the embedded store's {}: changes since the last sync are not yet on disk; \
         a snapshot is tried at every interval until one succeeds",
        what.as_str()
    );
    if let Some(hook) = &config.on_disk_error {
        hook(what);
    }
}

/// The writer thread: every `sync_every`, the pending records to the log
/// and a sync; a snapshot when the log is big or old, when records were
/// dropped or a write failed, and once more at close. Returns at close,
/// with what the final snapshot could not write.
pub(super) fn writer(
    shared: &Shared,
    mut files: Files,
    config: &DurableConfig,
) -> Result<(), String> {
    let mut last_snapshot = Instant::now();
    // The log missed records (a failed write, dropped records): until a
    // snapshot succeeds, write snapshots, never records after a gap.
    let mut broken = false;
    let mut spare = Vec::new();
    loop {
        let (mut batch, image, closing) = {
            let mut journal = shared.journal();
            if !journal.closing {
                journal = match shared.wake.wait_timeout(journal, config.sync_every) {
                    Ok((guard, _)) => guard,
                    Err(e) => e.into_inner().0,
                };
            }
            if journal.crash {
                return Ok(());
            }
            let closing = journal.closing;
            let batch = std::mem::replace(&mut journal.pending, std::mem::take(&mut spare));
            broken |= std::mem::take(&mut journal.lost);
            let logged = files.log_len - MAGIC_LEN + batch.len() as u64;
            let due = closing
                || broken
                // Past the snapshot's own size too, so that writing
                // snapshots costs at most what writing the log does.
                || logged > config.snapshot_log_bytes.max(files.snapshot_len)
                || (logged > 0 && last_snapshot.elapsed() >= config.snapshot_every);
            // Taken under the journal lock: it holds exactly the calls
            // up to `next_seq - 1`, the last one in `batch`.
            let image = due.then(|| (shared.memory.export(), journal.next_seq - 1));
            (batch, image, closing)
        };
        if !broken && !batch.is_empty() {
            codec::seal(&mut batch);
            if let Err(e) = files.append(&batch) {
                report(config, DiskWrite::Log, &files.dir.join(LOG), &e);
                broken = true;
            }
        }
        let mut result = Ok(());
        if let Some((image, seq)) = image {
            match files.snapshot(&image, seq) {
                Ok(()) => {
                    broken = false;
                    last_snapshot = Instant::now();
                }
                Err(e) => {
                    let file = files.dir.join(SNAPSHOT);
                    // The log, if not broken, still holds every call since
                    // the last snapshot: it goes on as it was.
                    report(config, DiskWrite::Snapshot, &file, &e);
                    result = Err(format!("{}: {e}", file.display()));
                }
            }
        }
        batch.clear();
        spare = batch;
        if closing {
            return result;
        }
    }
}
