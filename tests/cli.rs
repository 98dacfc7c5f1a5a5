//! The `tollgate` binary: validate, explain and serve as a user runs them.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

fn shipped_policies() -> String {
    format!("{}/policies", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn validate_accepts_the_shipped_policies_and_lists_every_error() {
    let ok = Command::new(BIN)
        .args(["validate", &shipped_policies()])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("ok: 10 rules"));

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.yaml"),
        "rules:\n  - id: x\n    limit: { requests: 1, window: yearly }\n  - id: y\n    limit: { requests: 1 }\n  - id: y\n    limit: { requests: 1, window: daily }\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.yml"),
        "rules: [ {id: z, limit: {spend: 1, window: daily}, bogus: 1} ]\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a policy: ignored").unwrap();
    let bad = Command::new(BIN)
        .args(["validate", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    for needle in [
        "a.yaml:3:35: bad window \"yearly\"",
        "a.yaml:5:12: `limit` needs a `window`",
        "a.yaml:6:5: duplicate rule id `y`",
        "b.yml:1:52: unknown field `bogus`",
        "b.yml:1:10: rule `z` limits spend but it matches every model",
        "5 error(s)",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from:\n{err}");
    }
}

#[test]
fn explain_shows_matches_charges_and_the_decision() {
    let out = Command::new(BIN)
        .args(["explain", &shipped_policies()])
        .args(["--api-key", "sk-example-checkout-prod"])
        .args([
            "--attr",
            "model=gpt-5",
            "--attr",
            "action=a1",
            "--attr",
            "attempt_kind=fallback",
        ])
        .args([
            "--estimate",
            "input_tokens=2000",
            "--estimate",
            "output_tokens=1000",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("sk-example-checkout-prod"),
        "the raw key must never be printed"
    );
    // 2000 * 1.25e-6 + 1000 * 1e-5 = 0.0125
    for needle in [
        "key=checkout-prod",
        "prod-key-monthly",
        "environment=production ~ production",
        "$0.0125",
        "attempts-per-action (retry/fallback budget)",
        "fallback-spend-monthly (retry/fallback budget)",
        "hard, then downgrade to gpt-4o-mini",
        "decision on an empty store: ALLOW",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }

    let over = Command::new(BIN)
        .args([
            "explain",
            &shipped_policies(),
            "--attr",
            "environment=staging",
            "--attr",
            "model=gpt-4o",
        ])
        .args(["--estimate", "output_tokens=5000000"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&over.stdout);
    assert!(text.contains("DENY (budget_exceeded)"), "{text}");
    assert!(text.contains("staging-daily"), "{text}");
}

#[test]
fn serve_refuses_to_start_on_broken_policies_and_serves_good_ones() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        "rules:\n  - id: a\n    limit: { requests: ten, window: daily }\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--policies",
            dir.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("p.yaml:3:24: `requests` must be a number"),
        "{err}"
    );
    assert!(err.contains("refusing to start"), "{err}");

    // A good directory: the server comes up and logs where it listens.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--http-listen",
            "127.0.0.1:0",
            "--policies",
            &shipped_policies(),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut serving = false;
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        if line.contains("serving gRPC") {
            serving = true;
            break;
        }
        if Instant::now() > deadline {
            break;
        }
    }
    assert!(serving, "server did not report serving");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    child.kill().unwrap();
    let _ = child.wait();
}
