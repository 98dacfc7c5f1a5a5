//! The durable store against its files: what a reopen finds, after a
//! close and after a crash, and what it refuses.

use super::*;
use crate::policy::Unit;

const NOW: Millis = 1_700_000_000_000;

fn config(dir: &std::path::Path) -> DurableConfig {
    DurableConfig {
        sync_every: Duration::from_millis(20),
        ..DurableConfig::new(dir)
    }
}

fn request(id: &str, now: Millis) -> ReserveRequest {
    ReserveRequest {
        now,
        candidates: vec![Candidate {
            model: Some("m".into()),
            ops: vec![CounterOp {
                key: "cap|requests|s|d1".into(),
                unit: Unit::Requests,
                amount: 1,
                limit: 2,
                enforced: true,
                downgradable: false,
                expiry: Expiry::At(now + 86_400_000),
                kind: CounterKind::Plain,
                grant: None,
                alert_at: Vec::new(),
            }],
        }],
        reservation_id: id.into(),
        reservation_ttl: 600_000,
        request_id: None,
        account: None,
        final_estimate: false,
    }
}

async fn used(store: &DurableStore) -> i64 {
    store
        .read(
            &[CounterRef {
                key: "cap|requests|s|d1".into(),
                kind: CounterKind::Plain,
            }],
            NOW,
        )
        .await
        .unwrap()[0]
        .used_before
}

#[tokio::test]
async fn a_closed_store_reopens_with_everything() {
    let dir = tempfile::tempdir().unwrap();
    let store = DurableStore::open(config(dir.path())).unwrap();
    for id in ["a", "b", "c"] {
        store.reserve(&request(id, NOW)).await.unwrap();
    }
    store.append("approvals", "{\"n\":1}").await.unwrap();
    store.close().await.unwrap();
    assert!(store.reserve(&request("d", NOW)).await.is_err(), "closed");
    drop(store);

    let store = DurableStore::open(config(dir.path())).unwrap();
    assert!(store.recovered().snapshot);
    assert_eq!(store.recovered().replayed, 0, "the close wrote a snapshot");
    assert_eq!(used(&store).await, 2, "two fitted under the cap of 2");
    let third = store.reserve(&request("e", NOW)).await.unwrap();
    assert_eq!(third.applied, None);
    assert_eq!(store.entries("approvals", 10).await.unwrap(), ["{\"n\":1}"]);
    assert!(store.reservation("a", NOW).await.unwrap().is_some());
}

#[tokio::test]
async fn a_crash_keeps_what_was_synced_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = DurableStore::open(config(dir.path())).unwrap();
    store.reserve(&request("a", NOW)).await.unwrap();
    store.settle("a", &[1], NOW + 1).await.unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // A crash: the writer stops where it is, without a last write.
    store.crash();

    let store = DurableStore::open(config(dir.path())).unwrap();
    assert_eq!(store.recovered().replayed, 2);
    assert_eq!(used(&store).await, 1);
    assert_eq!(
        store.settle("a", &[1], NOW + 2).await.unwrap(),
        SettleOutcome::AlreadySettled
    );
}

#[test]
fn a_second_process_on_the_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _store = DurableStore::open(config(dir.path())).unwrap();
    let err = DurableStore::open(config(dir.path())).unwrap_err();
    assert!(
        err.to_string().contains("in use by another tollgate"),
        "{err}"
    );
}

#[tokio::test]
async fn a_damaged_file_is_refused_with_its_name_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let store = DurableStore::open(config(dir.path())).unwrap();
    store.reserve(&request("a", NOW)).await.unwrap();
    store.close().await.unwrap();
    drop(store);
    let snapshot = dir.path().join("store.snapshot");
    let whole = std::fs::read(&snapshot).unwrap();

    std::fs::write(&snapshot, &whole[..whole.len() - 5]).unwrap();
    let err = DurableStore::open(config(dir.path())).unwrap_err();
    assert_eq!(err.file, snapshot);
    assert_eq!(err.offset, Some(8));
    assert!(err.to_string().contains("cut short"), "{err}");

    let mut flipped = whole.clone();
    let last = flipped.len() - 3;
    flipped[last] ^= 1;
    std::fs::write(&snapshot, &flipped).unwrap();
    let err = DurableStore::open(config(dir.path())).unwrap_err();
    assert!(err.to_string().contains("checksum mismatch"), "{err}");

    std::fs::write(&snapshot, b"").unwrap();
    let err = DurableStore::open(config(dir.path())).unwrap_err();
    assert_eq!(err.offset, Some(0));

    // The log: a record cut in two.
    std::fs::write(&snapshot, &whole).unwrap();
    let log = dir.path().join("store.log");
    let mut bytes = codec::LOG_MAGIC.to_vec();
    codec::frame(&mut bytes, 2, |b| codec::put_append(b, "x", "y"));
    codec::seal(&mut bytes[8..]);
    std::fs::write(&log, &bytes[..bytes.len() - 1]).unwrap();
    let err = DurableStore::open(config(dir.path())).unwrap_err();
    assert_eq!((err.file.clone(), err.offset), (log.clone(), Some(8)));
    assert!(err.to_string().contains("cut short"), "{err}");

    // A whole record that does not follow the snapshot's last call.
    let mut bytes = codec::LOG_MAGIC.to_vec();
    codec::frame(&mut bytes, 5, |b| codec::put_append(b, "x", "y"));
    codec::seal(&mut bytes[8..]);
    std::fs::write(&log, &bytes).unwrap();
    let err = DurableStore::open(config(dir.path())).unwrap_err();
    assert!(err.to_string().contains("calls are missing"), "{err}");

    // The call that does follow is replayed.
    let mut bytes = codec::LOG_MAGIC.to_vec();
    codec::frame(&mut bytes, 2, |b| codec::put_append(b, "x", "y"));
    codec::seal(&mut bytes[8..]);
    std::fs::write(&log, &bytes).unwrap();
    let store = DurableStore::open(config(dir.path())).unwrap();
    assert_eq!(store.recovered().replayed, 1);
    assert_eq!(store.entries("x", 1).await.unwrap(), ["y"]);
}

#[tokio::test]
async fn replay_near_the_cap_keeps_the_order_calls_were_applied_in() {
    // Many tasks race for a cap of 2; whichever won before the crash must
    // be the ones that hold reservations after it.
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DurableStore::open(config(dir.path())).unwrap());
    let mut tasks = Vec::new();
    for i in 0..32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("r{i}");
            let out = store.reserve(&request(&id, NOW + i)).await.unwrap();
            (id, out.applied.is_some())
        }));
    }
    let mut won = Vec::new();
    for t in tasks {
        let (id, applied) = t.await.unwrap();
        if applied {
            won.push(id);
        }
    }
    assert_eq!(won.len(), 2);
    std::thread::sleep(Duration::from_millis(200));
    Arc::try_unwrap(store).unwrap().crash();

    let store = DurableStore::open(config(dir.path())).unwrap();
    assert_eq!(store.recovered().replayed, 32);
    for i in 0..32 {
        let id = format!("r{i}");
        let kept = store.reservation(&id, NOW + 40).await.unwrap().is_some();
        assert_eq!(kept, won.contains(&id), "{id}");
    }
}

#[tokio::test]
async fn a_write_that_fails_is_reported_and_decisions_go_on() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let failed = Arc::new(AtomicUsize::new(0));
    let seen = failed.clone();
    let store = DurableStore::open(DurableConfig {
        on_disk_error: Some(Arc::new(move |what| {
            if what == DiskWrite::Snapshot {
                seen.fetch_add(1, Ordering::SeqCst);
            }
        })),
        ..config(dir.path())
    })
    .unwrap();
    // The directory goes away under the store: no snapshot can be
    // written into it any more.
    std::fs::remove_dir_all(dir.path()).unwrap();
    assert!(store
        .reserve(&request("a", NOW))
        .await
        .unwrap()
        .applied
        .is_some());
    let err = store.close().await.unwrap_err();
    assert!(err.contains("store.snapshot"), "{err}");
    assert_eq!(failed.load(Ordering::SeqCst), 1);
}
