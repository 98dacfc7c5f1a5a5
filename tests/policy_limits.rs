//! A policy file cannot exhaust the process that reads it: `tollgate
//! validate` refuses alias bombs, oversized files and deep nesting with a
//! positioned error, quickly and in little memory.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tollgate_core::policy::MAX_FILE_BYTES;

const GOOD: &str = "rules:\n  - id: a\n    limit: { requests: 1, window: daily }\n";

/// Nine anchors, each a list of nine aliases of the one before: 9^9 nodes
/// once expanded.
fn alias_bomb() -> String {
    let mut text = format!("a: &a [{}]\n", ["\"x\""; 9].join(","));
    for (prev, cur) in "abcdefgh".chars().zip("bcdefghi".chars()) {
        text += &format!(
            "{cur}: &{cur} [{}]\n",
            vec![format!("*{prev}"); 9].join(",")
        );
    }
    text
}

/// Runs `tollgate validate dir`; returns its stderr and how long it took.
/// The 2 GB address-space cap keeps a regression from taking the machine
/// down with it.
fn validate(dir: &Path) -> (String, Duration) {
    let started = Instant::now();
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 2000000 && exec \"$0\" validate \"$1\"")
        .arg(env!("CARGO_BIN_EXE_tollgate"))
        .arg(dir)
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    (stderr, elapsed)
}

fn assert_quick(what: &str, elapsed: Duration) {
    eprintln!("{what}: validate took {elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(2),
        "{what}: validate took {elapsed:?}"
    );
}

#[test]
fn validate_refuses_an_alias_bomb_at_its_first_anchor() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("good.yaml"), GOOD).unwrap();
    std::fs::write(dir.path().join("bomb.yaml"), alias_bomb()).unwrap();
    let (err, elapsed) = validate(dir.path());
    assert!(
        err.contains(
            "bomb.yaml:1:4: invalid YAML: YAML anchors and aliases are not accepted; write the value out"
        ),
        "{err}"
    );
    assert!(err.ends_with("1 error(s)\n"), "{err}");
    assert_quick("alias bomb", elapsed);
}

#[test]
fn validate_refuses_an_oversized_file_without_reading_it_whole() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("good.yaml"), GOOD).unwrap();
    // Sparse, so the test costs no disk; read whole it would cost 1 GiB.
    let huge = std::fs::File::create(dir.path().join("huge.yaml")).unwrap();
    huge.set_len(1 << 30).unwrap();
    let (err, elapsed) = validate(dir.path());
    assert!(
        err.contains(&format!(
            "huge.yaml: the file is 1073741824 bytes, over the limit of {MAX_FILE_BYTES} bytes (4 MiB)"
        )),
        "{err}"
    );
    assert_quick("oversized file", elapsed);
}

#[test]
fn a_file_at_the_size_limit_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = GOOD.to_string();
    let pad = "#".repeat(1023) + "\n";
    while text.len() + pad.len() <= MAX_FILE_BYTES as usize {
        text += &pad;
    }
    text += &"#".repeat(MAX_FILE_BYTES as usize - text.len() - 1);
    text += "\n";
    assert_eq!(text.len() as u64, MAX_FILE_BYTES);
    std::fs::write(dir.path().join("padded.yaml"), text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("validate")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn validate_refuses_deep_nesting_without_overflowing_its_stack() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("deep.yaml"),
        format!("{}x\n", "- ".repeat(100_000)),
    )
    .unwrap();
    let (err, elapsed) = validate(dir.path());
    assert!(
        err.contains("deep.yaml:1:129: invalid YAML: nested more than 64 levels deep"),
        "{err}"
    );
    assert_quick("deep nesting", elapsed);
}
