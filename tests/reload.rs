//! Live reload with real files and a real watcher: every kind of edit is
//! picked up within a second, a bad edit is never applied, and decisions
//! never fail or mix two policy sets while the files churn.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::reload::{self, Reloader};
use tollgate_core::engine::{Attributes, Verdict};
use tollgate_core::gate::{CheckInput, Gate, GateConfig, SystemClock};
use tollgate_core::store::MemoryStore;

/// A policy whose two rules carry `cap` and `cap + 1`, so that a decision
/// mixing two sets would show.
fn policy(cap: u32) -> String {
    format!(
        "rules:\n  - id: a\n    match: {{ team: t }}\n    limit: {{ requests: {cap}, window: daily }}\n  - id: b\n    match: {{ team: t }}\n    limit: {{ requests: {}, window: daily }}\n",
        cap + 1
    )
}

fn extra_rule(id: &str) -> String {
    format!("rules:\n  - id: {id}\n    match: {{ team: t }}\n    limit: {{ requests: 1000000, window: daily }}\n")
}

struct Live {
    gate: Arc<Gate>,
    reloader: Arc<Reloader>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// A gate loaded from `dir`, with its watcher running.
fn watch(dir: &Path) -> Live {
    let policy = reload::load(&[dir.to_path_buf()], false).unwrap_or_else(|e| panic!("{e}"));
    let gate = Arc::new(Gate::new(
        policy,
        Arc::new(MemoryStore::default()),
        Arc::new(SystemClock),
        GateConfig::default(),
    ));
    let reloader = Reloader::new(gate.clone(), common::reload_config(&[dir]));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    reloader
        .spawn(async {
            let _ = stopped.await;
        })
        .unwrap();
    Live {
        gate,
        reloader,
        _stop: stop,
    }
}

fn rule_ids(gate: &Gate) -> Vec<String> {
    gate.policy().rules().iter().map(|r| r.id.clone()).collect()
}

/// Waits until `done` holds; returns how long it took. Fails after 1 s.
async fn within_a_second(what: &str, done: impl Fn() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{what}: not picked up within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

fn cap_of(gate: &Gate) -> String {
    gate.policy().rules()[0].limit.amount.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_edit_is_picked_up_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir_in(dir.path().parent().unwrap()).unwrap();
    let p = |name: &str| dir.path().join(name);
    std::fs::write(p("main.yaml"), policy(10)).unwrap();
    let live = watch(dir.path());
    let gate = &live.gate;
    assert_eq!(cap_of(gate), "10");

    // A write in place.
    std::fs::write(p("main.yaml"), policy(20)).unwrap();
    within_a_second("write in place", || cap_of(gate) == "20").await;

    // An editor's save: a temp file renamed over the target.
    std::fs::write(p("main.yaml.tmp"), policy(30)).unwrap();
    std::fs::rename(p("main.yaml.tmp"), p("main.yaml")).unwrap();
    within_a_second("rename over", || cap_of(gate) == "30").await;

    // A new file.
    std::fs::write(p("extra.yaml"), extra_rule("extra")).unwrap();
    within_a_second("new file", || rule_ids(gate).contains(&"extra".to_string())).await;

    // A deleted file.
    std::fs::remove_file(p("extra.yaml")).unwrap();
    within_a_second("deleted file", || {
        !rule_ids(gate).contains(&"extra".to_string())
    })
    .await;

    // A file renamed into the directory.
    let incoming = outside.path().join("incoming.yaml");
    std::fs::write(&incoming, extra_rule("moved-in")).unwrap();
    std::fs::rename(&incoming, p("moved.yaml")).unwrap();
    within_a_second("rename in", || {
        rule_ids(gate).contains(&"moved-in".to_string())
    })
    .await;

    // And renamed out of it.
    std::fs::rename(p("moved.yaml"), outside.path().join("gone.yaml")).unwrap();
    within_a_second("rename out", || {
        !rule_ids(gate).contains(&"moved-in".to_string())
    })
    .await;

    let status = live.reloader.status();
    assert_eq!(status.reloads, 6);
    assert_eq!(status.version, *gate.policy().version);
    assert!(status.last_error.is_none());
}

/// The layout the kubelet writes for a ConfigMap volume: the files are
/// symlinks through `..data`, which is swapped atomically to a new
/// timestamped directory on every update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_configmap_swap_is_picked_up() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let v1 = "..2026_11_21_10_00_00.000000001";
    std::fs::create_dir(p(v1)).unwrap();
    std::fs::write(p(v1).join("policy.yaml"), policy(100)).unwrap();
    symlink(v1, p("..data")).unwrap();
    symlink("..data/policy.yaml", p("policy.yaml")).unwrap();
    let live = watch(dir.path());
    assert_eq!(cap_of(&live.gate), "100");

    for (i, cap) in [(2, 200), (3, 300)] {
        let next = format!("..2026_11_21_10_00_0{i}.00000000{i}");
        std::fs::create_dir(p(&next)).unwrap();
        std::fs::write(p(&next).join("policy.yaml"), policy(cap)).unwrap();
        symlink(&next, p("..data_tmp")).unwrap();
        std::fs::rename(p("..data_tmp"), p("..data")).unwrap();
        let elapsed =
            within_a_second("configmap swap", || cap_of(&live.gate) == cap.to_string()).await;
        assert!(elapsed < Duration::from_secs(1));
    }
    assert_eq!(
        live.reloader.status().reloads,
        2,
        "each swap is one reload, not two"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_pointed_directory_symlink_is_followed() {
    use std::os::unix::fs::symlink;
    let root = tempfile::tempdir().unwrap();
    let p = |name: &str| root.path().join(name);
    for (name, cap) in [("v1", 1), ("v2", 2), ("v3", 3)] {
        std::fs::create_dir(p(name)).unwrap();
        std::fs::write(p(name).join("policy.yaml"), policy(cap)).unwrap();
    }
    symlink("v1", p("current")).unwrap();
    let live = watch(&p("current"));
    assert_eq!(cap_of(&live.gate), "1");

    for (target, cap) in [("v2", "2"), ("v3", "3")] {
        symlink(target, p("current.tmp")).unwrap();
        std::fs::rename(p("current.tmp"), p("current")).unwrap();
        within_a_second("re-pointed directory", || cap_of(&live.gate) == cap).await;
    }
    // Edits inside the new target are watched too.
    std::fs::write(p("v3").join("policy.yaml"), policy(33)).unwrap();
    within_a_second("edit inside the new target", || cap_of(&live.gate) == "33").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_edit_is_never_applied_and_is_reported_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("main.yaml");
    std::fs::write(&file, policy(10)).unwrap();
    let live = watch(dir.path());
    let good_version = live.gate.policy().version.clone();

    std::fs::write(
        &file,
        policy(20).replace("window: daily", "window: fortnightly"),
    )
    .unwrap();
    within_a_second("rejection", || live.reloader.status().last_error.is_some()).await;
    let status = live.reloader.status();
    let error = status.last_error.clone().unwrap();
    assert!(
        error.contains("main.yaml:4:36: bad window \"fortnightly\""),
        "{error}"
    );
    assert!(status.error_since.is_some());
    assert_eq!(
        live.gate.policy().version,
        good_version,
        "the bad edit must not be applied"
    );
    assert_eq!(*status.version, *good_version);
    assert_eq!(status.failed_reloads, 1);

    // A half-written file is just another bad edit.
    std::fs::write(&file, &policy(30)[..40]).unwrap();
    within_a_second("half-written", || {
        live.reloader.status().failed_reloads == 2
    })
    .await;
    assert_eq!(live.gate.policy().version, good_version);

    // Finishing the write applies it and clears the error.
    std::fs::write(&file, policy(30)).unwrap();
    within_a_second("fixed edit", || cap_of(&live.gate) == "30").await;
    assert!(live.reloader.status().last_error.is_none());

    // Deleting every file keeps the rules in force.
    std::fs::remove_file(&file).unwrap();
    within_a_second("empty directory", || {
        live.reloader.status().last_error.is_some()
    })
    .await;
    assert_eq!(cap_of(&live.gate), "30");
}

/// A few lines of nested aliases expand to billions of nodes; dropped into
/// the watched directory, they are refused before any expansion, and the
/// rules in force keep deciding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alias_bomb_is_refused_and_the_rules_in_force_keep_deciding() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("main.yaml"), policy(10)).unwrap();
    let live = watch(dir.path());
    let good_version = live.gate.policy().version.clone();

    let mut bomb = format!("a: &a [{}]\n", ["\"x\""; 9].join(","));
    for (prev, cur) in "abcdefgh".chars().zip("bcdefghi".chars()) {
        bomb += &format!(
            "{cur}: &{cur} [{}]\n",
            vec![format!("*{prev}"); 9].join(",")
        );
    }
    std::fs::write(dir.path().join("bomb.yaml"), bomb).unwrap();
    let took = within_a_second("rejection", || live.reloader.status().last_error.is_some()).await;
    eprintln!("alias bomb rejected {took:?} after it was written");
    let status = live.reloader.status();
    let error = status.last_error.unwrap();
    assert!(
        error.contains("bomb.yaml:1:4: invalid YAML: YAML anchors and aliases are not accepted"),
        "{error}"
    );
    assert_eq!(*status.version, *good_version);
    assert_eq!(live.gate.policy().version, good_version);
    let d = live.gate.check(check_t()).await.unwrap();
    assert_eq!(d.verdict, Verdict::Allow);
    let a = d.counters.iter().find(|c| c.rule == "a").unwrap();
    assert_eq!(a.limit.to_string(), "10");
}

fn check_t() -> CheckInput {
    CheckInput {
        attributes: Attributes {
            team: Some("t".to_string()),
            ..Default::default()
        },
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_cap_keeps_its_counter_and_a_removed_rule_stops_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("main.yaml");
    std::fs::write(&file, policy(3)).unwrap();
    let live = watch(dir.path());
    for _ in 0..3 {
        assert_eq!(
            live.gate.check(check_t()).await.unwrap().verdict,
            Verdict::Allow
        );
    }
    assert_eq!(
        live.gate.check(check_t()).await.unwrap().verdict,
        Verdict::Deny
    );

    std::fs::write(&file, policy(5)).unwrap();
    within_a_second("raised cap", || cap_of(&live.gate) == "5").await;
    let d = live.gate.check(check_t()).await.unwrap();
    let a = d.counters.iter().find(|c| c.rule == "a").unwrap();
    assert_eq!(
        (a.used.to_string(), a.limit.to_string()),
        ("4".to_string(), "5".to_string())
    );
    live.gate.check(check_t()).await.unwrap();
    assert_eq!(
        live.gate.check(check_t()).await.unwrap().verdict,
        Verdict::Deny
    );

    std::fs::write(&file, extra_rule("other")).unwrap();
    within_a_second("removed rules", || rule_ids(&live.gate) == ["other"]).await;
    let d = live.gate.check(check_t()).await.unwrap();
    assert_eq!(d.verdict, Verdict::Allow);
    assert!(d.counters.iter().all(|c| c.rule == "other"));
}

/// Thousands of checks a second while the policy is rewritten 100 times:
/// valid versions, invalid ones and half-written files, in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_never_fail_or_mix_sets_while_the_policy_churns() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("main.yaml");
    let tmp = dir.path().join("main.yaml.tmp");
    std::fs::write(&file, policy(1_000_000_000)).unwrap();
    let live = watch(dir.path());

    // The load runs on threads of its own, so it can never starve the
    // watcher (or this test) of a runtime worker.
    let stop = Arc::new(AtomicBool::new(false));
    let checks = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..2 {
        let (gate, stop, checks) = (live.gate.clone(), stop.clone(), checks.clone());
        load.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut seen = std::collections::BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                let d = rt
                    .block_on(gate.check(check_t()))
                    .expect("no check may fail during a reload");
                assert_eq!(d.verdict, Verdict::Allow, "{}", d.message);
                let limit = |id: &str| {
                    let c = d
                        .counters
                        .iter()
                        .find(|c| c.rule == id)
                        .expect("both rules apply");
                    u64::try_from(c.limit).unwrap()
                };
                let (a, b) = (limit("a"), limit("b"));
                assert_eq!(b, a + 1, "a decision mixed two policy sets");
                seen.insert(a);
                checks.fetch_add(1, Ordering::Relaxed);
            }
            seen
        }));
    }

    let started = Instant::now();
    let mut valid = vec![1_000_000_000u64];
    let mut last_valid = 1_000_000_000u64;
    for i in 0..100u64 {
        match i % 4 {
            // A valid version, written in place.
            0 => {
                last_valid = 2_000_000_000 + i;
                valid.push(last_valid);
                std::fs::write(&file, policy(last_valid as u32)).unwrap();
            }
            // A valid version, renamed over the file.
            1 => {
                last_valid = 2_000_000_000 + i;
                valid.push(last_valid);
                std::fs::write(&tmp, policy(last_valid as u32)).unwrap();
                std::fs::rename(&tmp, &file).unwrap();
            }
            // An invalid version, whose caps must never be seen.
            2 => {
                let bad =
                    policy(3_000_000_000 + i as u32).replace("window: daily", "window: sometimes");
                std::fs::write(&file, bad).unwrap();
            }
            // A half-written file, then its completion.
            _ => {
                last_valid = 2_000_000_000 + i;
                valid.push(last_valid);
                let text = policy(last_valid as u32);
                std::fs::write(&file, &text[..text.len() / 2]).unwrap();
                // Left half-written for a moment, as a slow writer would:
                // there is nothing to wait for, the pause is the test.
                tokio::time::sleep(Duration::from_millis(15)).await;
                std::fs::write(&file, text).unwrap();
            }
        }
        // The pace of the churn, not a wait: edits come faster than the
        // 100 ms debounce, so reloads land on whatever state the file is in,
        // valid, invalid or half-written, while the checks run.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // The last write was valid: it is in force within a second.
    within_a_second("final version", || {
        cap_of(&live.gate) == last_valid.to_string()
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    for thread in load {
        for cap in thread.join().unwrap() {
            assert!(
                valid.contains(&cap),
                "cap {cap} came from an invalid version"
            );
        }
    }
    let rate = checks.load(Ordering::Relaxed) as f64 / elapsed;
    assert!(rate > 1_000.0, "only {rate:.0} checks per second");
    assert!(
        live.reloader.status().failed_reloads > 0,
        "invalid versions were seen and rejected"
    );
}

/// A change no directory event reports (the target of a symlinked file,
/// edited in place elsewhere) is caught by the periodic rescan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_rescan_catches_what_no_event_reports() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let target = elsewhere.path().join("real.yaml");
    std::fs::write(&target, policy(1)).unwrap();
    std::os::unix::fs::symlink(&target, dir.path().join("policy.yaml")).unwrap();

    let policy_set = reload::load(&[dir.path().to_path_buf()], false).unwrap();
    let gate = Arc::new(Gate::new(
        policy_set,
        Arc::new(MemoryStore::default()),
        Arc::new(SystemClock),
        GateConfig::default(),
    ));
    let config = tollgate::reload::ReloadConfig {
        rescan_every: Duration::from_millis(300),
        ..common::reload_config(&[dir.path()])
    };
    let reloader = Reloader::new(gate.clone(), config);
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    reloader
        .spawn(async {
            let _ = stopped.await;
        })
        .unwrap();

    std::fs::write(&target, policy(2)).unwrap();
    within_a_second("rescan", || cap_of(&gate) == "2").await;
}

/// Bytes a process has read so far (`rchar` in `/proc/<pid>/io`).
fn bytes_read(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("/proc/<pid>/io (Linux)");
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("rchar")
}

/// The watcher's own reads of the policy files are not edits: once an
/// event has made it look, an idle server does not look again, and again,
/// at every debounce.
#[test]
fn an_idle_server_does_not_read_its_policies_again_and_again() {
    // Big enough that one more read of it shows.
    let padding = format!("# {}\n", "x".repeat(64 * 1024));
    // In a directory of its own, since the watch covers the parent too,
    // and other tests write beside it in the shared temporary directory.
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("policies");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("p.yaml"), format!("{padding}{}", policy(5))).unwrap();
    let tollgate = common::TollgateProcess::start(&[
        "--policies",
        dir.to_str().unwrap(),
        "--rescan-every",
        "1h",
    ]);
    // Something else changes beside the policies: one look, no more.
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(root.path().join("unrelated"), "x").unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let before = bytes_read(tollgate.pid());
    std::thread::sleep(Duration::from_secs(2));
    let read = bytes_read(tollgate.pid()) - before;
    assert!(read < 64 * 1024, "read {read} bytes in 2 s while idle");
}
