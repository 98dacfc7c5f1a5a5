//! Approvals end to end: a real server on a real Redis, the `tollgate`
//! CLI as the approver uses it, requests through the HTTP forward-auth
//! endpoint and the gRPC admin service.

mod common;

use std::process::Command;
use std::time::Duration;

use axum::http::Method;
use common::{policy_dir, RedisServer, TollgateProcess};
use hyper::body::Bytes;
use tollgate::http_client::{self, Target};
use tollgate::proto::v1 as pb;

const TOKEN: &str = "admin-token-for-tests-0123456789";

const POLICY: &str = "
# The edge proxy sets these headers (and strips them from clients).
attributes:
  trusted_headers: { team: x-tollgate-team, workflow: x-tollgate-workflow }
rules:
  - id: launch-renders
    owner: creative@example.com
    match: { workflow: render }
    per: [team]
    limit: { requests: 1, window: daily }
    on_exceed: approval
  - id: production-fine-tuning
    owner: ml-platform@example.com
    match: { workflow: fine-tune }
    per: [team]
    limit: { requests: 100, window: daily }
    enforcement: approval
";

struct Setup {
    _redis: RedisServer,
    _policies: tempfile::TempDir,
    token_file: tempfile::NamedTempFile,
    server: TollgateProcess,
}

fn setup(extra_args: &[&str]) -> Setup {
    let redis = RedisServer::start();
    let policies = policy_dir(&[("approvals.yaml", POLICY)]);
    let token_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token_file.path(), format!("{TOKEN}\n")).unwrap();
    let url = redis.url();
    let mut args = vec![
        "--policies",
        policies.path().to_str().unwrap(),
        "--redis",
        &url,
        "--admin-token-file",
        token_file.path().to_str().unwrap(),
    ];
    args.extend_from_slice(extra_args);
    let server = TollgateProcess::start(&args);
    Setup {
        _redis: redis,
        _policies: policies,
        token_file,
        server,
    }
}

/// The HTTP status and reason code a request for `workflow`/`team` gets.
fn check(server: &TollgateProcess, workflow: &str, team: &str) -> (u16, String) {
    let target = Target::parse(&server.http_endpoint()).unwrap();
    let headers = [
        ("x-tollgate-workflow", workflow.to_string()),
        ("x-tollgate-team", team.to_string()),
    ];
    let answer = runtime()
        .block_on(http_client::send(
            &target,
            Method::POST,
            "/v1/authz/forward",
            &headers,
            Bytes::new(),
            Duration::from_secs(5),
        ))
        .unwrap();
    let code = serde_json::from_slice::<serde_json::Value>(&answer.body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
        .unwrap_or_default();
    (answer.status, code)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs the CLI; returns (success, stdout, stderr).
fn cli(args: &[&str], token_file: Option<&std::path::Path>) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.args(args).env_remove("TOLLGATE_ADMIN_TOKEN");
    if let Some(f) = token_file {
        cmd.args(["--token-file", f.to_str().unwrap()]);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn denied_then_approved_with_the_cli_then_used_up_revoked_and_expired() {
    let s = setup(&[]);
    let server = s.server.http_endpoint();
    let token = Some(s.token_file.path());

    assert_eq!(check(&s.server, "render", "growth"), (200, String::new()));
    assert_eq!(
        check(&s.server, "render", "growth"),
        (403, "approval_required".to_string())
    );

    let (ok, out, err) = cli(
        &[
            "approve",
            "--server",
            &server,
            "--rule",
            "launch-renders",
            "--scope",
            "team=growth",
            "--extra",
            "2",
            "--for",
            "7d",
            "--reason",
            "launch",
            "--approver",
            "ana",
        ],
        token,
    );
    assert!(ok, "approve failed: {err}");
    assert!(
        out.contains("launch-renders  team=growth  +2 requests") && out.contains("by ana: launch"),
        "{out}"
    );
    // Exactly the two extra requests, then denied again.
    assert_eq!(check(&s.server, "render", "growth").0, 200);
    assert_eq!(check(&s.server, "render", "growth").0, 200);
    assert_eq!(
        check(&s.server, "render", "growth"),
        (403, "approval_required".to_string())
    );

    // A fresh extension, then revoked: denied at once.
    let approve_more = [
        "approve",
        "--server",
        &server,
        "--rule",
        "launch-renders",
        "--scope",
        "team=growth",
        "--extra",
        "5",
        "--for",
        "1h",
        "--reason",
        "more",
        "--approver",
        "ana",
    ];
    assert!(cli(&approve_more, token).0);
    assert_eq!(check(&s.server, "render", "growth").0, 200);
    let (ok, out, _) = cli(&["approvals", "--server", &server, "--audit", "10"], token);
    assert!(ok);
    assert!(out.contains("+5 requests"), "{out}");
    assert_eq!(out.matches("approve  by ana").count(), 2, "{out}");
    assert!(
        out.contains("[launch-renders  team=growth  +2 requests  until 20"),
        "the audit trail shows the grant as approved: {out}"
    );
    let (ok, out, err) = cli(
        &[
            "revoke",
            "--server",
            &server,
            "--rule",
            "launch-renders",
            "--scope",
            "team=growth",
            "--by",
            "bo",
            "--reason",
            "done",
        ],
        token,
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("revoked: launch-renders"), "{out}");
    assert_eq!(
        check(&s.server, "render", "growth"),
        (403, "approval_required".to_string())
    );

    // A gate opened for three seconds is shut again once it expires.
    assert_eq!(
        check(&s.server, "fine-tune", "ml"),
        (403, "approval_required".to_string())
    );
    let (ok, _, err) = cli(
        &[
            "approve",
            "--server",
            &server,
            "--rule",
            "production-fine-tuning",
            "--scope",
            "team=ml",
            "--for",
            "3s",
            "--reason",
            "one job",
            "--approver",
            "ana",
        ],
        token,
    );
    assert!(ok, "{err}");
    assert_eq!(check(&s.server, "fine-tune", "ml").0, 200);
    // Expired by the server's own clock once its listing leaves it out;
    // asking with checks instead would charge them.
    let listed = || {
        let (ok, out, err) = cli(&["approvals", "--server", &server], token);
        assert!(ok, "{err}");
        out.contains("production-fine-tuning")
    };
    assert!(
        common::eventually(Duration::from_secs(20), || !listed()),
        "a grant for 3 s was still listed after 20 s"
    );
    assert_eq!(
        check(&s.server, "fine-tune", "ml"),
        (403, "approval_required".to_string())
    );

    // Mistakes come back as specific errors.
    let (ok, _, err) = cli(
        &[
            "approve",
            "--server",
            &server,
            "--rule",
            "launch-renders",
            "--scope",
            "team=growth",
            "--for",
            "1h",
            "--reason",
            "x",
            "--approver",
            "ana",
        ],
        token,
    );
    assert!(!ok);
    assert!(
        err.contains("invalid_grant") && err.contains("extra"),
        "{err}"
    );
}

#[test]
fn calls_without_the_token_are_refused_on_every_path() {
    let s = setup(&[]);
    let server = s.server.http_endpoint();
    let approve = [
        "approve",
        "--server",
        &server,
        "--rule",
        "production-fine-tuning",
        "--scope",
        "team=ml",
        "--for",
        "1h",
        "--reason",
        "r",
        "--approver",
        "eve",
    ];
    // No token at all: the CLI says how to give one.
    let (ok, _, err) = cli(&approve, None);
    assert!(!ok);
    assert!(err.contains("--token-file"), "{err}");
    // A wrong token: the server refuses.
    let wrong = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(wrong.path(), "not-the-admin-token-at-all").unwrap();
    let (ok, _, err) = cli(&approve, Some(wrong.path()));
    assert!(!ok);
    assert!(err.contains("refused"), "{err}");
    // Raw HTTP without credentials.
    let target = Target::parse(&server).unwrap();
    let answer = runtime()
        .block_on(http_client::send(
            &target,
            Method::GET,
            "/v1/admin/approvals",
            &[],
            Bytes::new(),
            Duration::from_secs(5),
        ))
        .unwrap();
    assert_eq!(answer.status, 401);
    // gRPC without credentials, then with them.
    runtime().block_on(async {
        let mut admin = pb::admin_client::AdminClient::connect(s.server.endpoint())
            .await
            .unwrap();
        let status = admin
            .list_approvals(pb::ListApprovalsRequest { audit_entries: 0 })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        let mut request = tonic::Request::new(pb::ApproveRequest {
            rule: "production-fine-tuning".to_string(),
            scope: "team=ml".to_string(),
            extra: String::new(),
            duration_seconds: 3600,
            approver: "ana".to_string(),
            reason: "grpc".to_string(),
        });
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        let grant = admin.approve(request).await.unwrap().into_inner();
        assert_eq!(grant.scope, "team=ml");
    });
    assert_eq!(check(&s.server, "fine-tune", "ml").0, 200);
    // Nothing was granted by the refused calls.
    let (ok, out, _) = cli(
        &["approvals", "--server", &server, "--json"],
        Some(s.token_file.path()),
    );
    assert!(ok);
    let listing: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listing["grants"].as_array().unwrap().len(), 1);
    assert_eq!(listing["grants"][0]["approver"], "ana");
}

#[test]
fn the_admin_api_can_live_on_a_unix_socket_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let address = format!("unix:{}", socket.display());
    let s = setup(&["--admin-listen", &address]);
    // Only the server's own user may connect, and the socket was staged
    // where nobody else could reach it: nothing but the socket is left.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("admin.sock")]);
    let approve = [
        "approve",
        "--server",
        &address,
        "--rule",
        "production-fine-tuning",
        "--scope",
        "team=ml",
        "--for",
        "1h",
        "--reason",
        "socket",
        "--approver",
        "ana",
    ];
    let (ok, _, err) = cli(&approve, Some(s.token_file.path()));
    assert!(ok, "{err}");
    assert_eq!(check(&s.server, "fine-tune", "ml").0, 200);
    // The public HTTP port no longer serves admin routes.
    let public = ["approvals", "--server", &s.server.http_endpoint()];
    let (ok, _, err) = cli(&public, Some(s.token_file.path()));
    assert!(!ok, "the HTTP port must not serve the admin API here");
    assert!(err.contains("404") || err.contains("unknown"), "{err}");
}
