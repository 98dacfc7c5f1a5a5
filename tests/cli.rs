//! The `tollgate` binary: validate, explain and serve as a user runs them.

mod common;

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
        "retry and fallback budgets (attempt_kind=fallback):",
        "  attempts-per-action: hit, 2 requests / 3600s from first use per action",
        "  fallback-spend-monthly: hit, $100 / monthly",
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
            "--ephemeral",
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

/// The status of the policy in force, over HTTP and gRPC, from a real
/// server process whose directory is edited while it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_served_over_http_and_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    std::fs::write(
        &file,
        "rules:\n  - id: a\n    limit: { requests: 1, window: daily }\n",
    )
    .unwrap();
    let server = common::TollgateProcess::start(&["--policies", dir.path().to_str().unwrap()]);

    let get_status = || async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", server.http_port))
            .await
            .unwrap();
        s.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
        serde_json::from_str::<serde_json::Value>(body).unwrap_or_else(|e| panic!("{e}: {body}"))
    };
    let first = get_status().await;
    assert_eq!(first["rules"], 1);
    assert!(first["last_error"].is_null());

    std::fs::write(
        &file,
        "rules:\n  - id: a\n    limit: { requests: 1, window: sometimes }\n",
    )
    .unwrap();
    // Poll until the reloader has read and refused the edit.
    let deadline = Instant::now() + Duration::from_secs(20);
    let broken = loop {
        let s = get_status().await;
        if !s["last_error"].is_null() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the rejected edit was not reported within 20 s: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let error = broken["last_error"]
        .as_str()
        .expect("the rejected edit is reported");
    assert!(error.contains("p.yaml:3:35: bad window"), "{error}");
    assert_eq!(
        broken["version"], first["version"],
        "the bad edit is not in force"
    );

    let channel = tonic::transport::Channel::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = tollgate::proto::v1::tollgate_client::TollgateClient::new(channel);
    let rpc = client
        .status(tollgate::proto::v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rpc.policy_version, first["version"].as_str().unwrap());
    assert_eq!(rpc.rules, 1);
    assert!(rpc.last_error.contains("bad window"));
}

#[test]
fn allow_empty_and_several_policy_directories() {
    let empty = tempfile::tempdir().unwrap();
    let refused = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--policies",
        ])
        .arg(empty.path())
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--allow-empty"));
    let server = common::TollgateProcess::start(&[
        "--allow-empty",
        "--policies",
        empty.path().to_str().unwrap(),
    ]);
    drop(server);

    // Several directories form one set; a rule id in two of them is an error.
    let one = common::policy_dir(&[(
        "a.yaml",
        "rules:\n  - id: same\n    limit: { requests: 1, window: daily }\n",
    )]);
    let two = common::policy_dir(&[(
        "b.yaml",
        "rules:\n  - id: same\n    limit: { requests: 2, window: daily }\n",
    )]);
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .arg("--policies")
        .arg(one.path())
        .arg("--policies")
        .arg(two.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("b.yaml:2:5: duplicate rule id `same`: first defined at"),
        "{err}"
    );
}

#[test]
fn explain_says_which_retry_budgets_an_attempt_would_not_hit() {
    let out = Command::new(BIN)
        .args(["explain", &shipped_policies()])
        .args(["--attr", "team=growth", "--attr", "attempt_kind=retry"])
        .args(["--attr", "model=gpt-4o-mini"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "retry and fallback budgets (attempt_kind=retry):",
        "no action id given: the server makes up a fresh one",
        "attempts-per-action: not hit (2 requests / 3600s from first use; needs action=*)",
        "fallback-spend-monthly: not hit ($100 / monthly; needs attempt_kind=fallback)",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
}

#[test]
fn an_approval_without_anyone_to_name_is_refused_before_it_is_sent() {
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "a-token-long-enough-0123").unwrap();
    let out = Command::new(BIN)
        .args(["approve", "--rule", "r", "--reason", "why"])
        .args(["--token-file", token.path().to_str().unwrap()])
        // Nothing listens here: the refusal must come before any call.
        .args(["--server", "http://127.0.0.1:9"])
        .env_remove("USER")
        .env_remove("LOGNAME")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("give --approver NAME"), "{err}");
}

/// A stand-in for a server behind a unix socket (a local proxy, say):
/// answers each connection with `body` and reports the request line.
fn unix_stub(socket: &std::path::Path, body: &'static str) -> std::sync::mpsc::Receiver<String> {
    use std::io::{Read, Write};
    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().map_while(Result::ok) {
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                request.push(byte[0]);
            }
            let text = String::from_utf8_lossy(&request);
            let _ = tx.send(text.lines().next().unwrap_or("").to_string());
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    rx
}

#[test]
fn health_and_usage_reach_a_server_on_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("http.sock");
    let requests = unix_stub(
        &socket,
        r#"{"ready":true,"policy_version":"v1","counters":[]}"#,
    );
    let url = format!("unix:{}", socket.display());
    let health = Command::new(BIN)
        .args(["health", "--server", &url])
        .output()
        .unwrap();
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );
    assert!(String::from_utf8_lossy(&health.stdout).contains("\"ready\":true"));
    assert_eq!(requests.recv().unwrap(), "GET /readyz HTTP/1.1");

    let usage = Command::new(BIN)
        .args(["usage", "--server", &url])
        .env_remove("TOLLGATE_REDIS_URL")
        .output()
        .unwrap();
    assert!(
        usage.status.success(),
        "{}",
        String::from_utf8_lossy(&usage.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&usage.stdout), "no counters\n");
    assert_eq!(requests.recv().unwrap(), "GET /v1/usage HTTP/1.1");
}

#[test]
fn explain_counts_a_bodys_prompt_with_the_models_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        "\
pricing:
  models:
    gpt-4o: { input_per_mtok: 2.5, output_per_mtok: 10 }
    gpt-4: { input_per_mtok: 30, output_per_mtok: 60 }
    claude-sonnet-4: { input_per_mtok: 3, output_per_mtok: 15 }
    house-model: { input_per_mtok: 1, output_per_mtok: 1, tokenizer: cl100k_base }
rules:
  - id: tokens
    limit: { input_tokens: 1000000, window: daily }
",
    )
    .unwrap();
    // One user message of 34 characters: 7 tokens in o200k_base and 12 in
    // cl100k_base, plus 1 for the role, 3 for the message and 3 for the
    // reply; 9 by the approximation.
    let body = dir.path().join("body.json");
    std::fs::write(
        &body,
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"I'm we'll they've she'd IT'S DON'T"}],"max_tokens":50}"#,
    )
    .unwrap();
    let run = |model: Option<&str>| {
        let mut cmd = Command::new(BIN);
        cmd.args(["explain", dir.path().to_str().unwrap()]);
        cmd.args(["--body", body.to_str().unwrap()]);
        if let Some(m) = model {
            cmd.args(["--attr", &format!("model={m}")]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let text = run(None);
    assert!(
        text.contains("input tokens: 14 (counted from the prompt with o200k_base (exact))"),
        "{text}"
    );
    assert!(
        text.contains("output tokens: 50 (the request's maximum)"),
        "{text}"
    );
    let text = run(Some("gpt-4"));
    assert!(
        text.contains("input tokens: 19 (counted from the prompt with cl100k_base"),
        "{text}"
    );
    let text = run(Some("house-model"));
    assert!(
        text.contains("input tokens: 19 (counted from the prompt with cl100k_base"),
        "{text}"
    );
    let text = run(Some("claude-sonnet-4"));
    assert!(
        text.contains("input tokens: 9 (approximated from the prompt at 4 characters a token)"),
        "{text}"
    );
}
