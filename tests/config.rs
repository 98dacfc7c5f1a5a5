//! The `serve` configuration as a user sets it: a YAML file, environment
//! variables and flags, in that order of strength; `--print-config`; logs;
//! and the documentation of every option.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{eventually, free_port, http_get};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

fn shipped_policies() -> String {
    format!("{}/policies", env!("CARGO_MANIFEST_DIR"))
}

/// A `tollgate` command with no `TOLLGATE_*` variable inherited from the
/// test's own environment.
fn tollgate() -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("TOLLGATE_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Runs `cmd` (ending in `serve ...`) with `--print-config`.
fn print_config(cmd: &mut Command) -> String {
    let out = cmd.arg("--print-config").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The line for `key` in `--print-config` output, trimmed.
fn line<'a>(config: &'a str, key: &str) -> &'a str {
    config
        .lines()
        .find(|l| l.starts_with(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in:\n{config}"))
}

fn value_and_source(config: &str, key: &str) -> (String, String) {
    let l = line(config, key);
    let (value, source) = l.split_once('#').unwrap();
    (
        value[key.len() + 1..].trim().to_string(),
        source.trim().to_string(),
    )
}

#[test]
fn flag_beats_env_beats_file_beats_default() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tollgate.yaml");
    std::fs::write(
        &file,
        "listen: 127.0.0.1:1001\nredis_prefix: file-prefix\nrescan-every: 42s\nstore-timeout-ms: 70\nallow_empty: true\n",
    )
    .unwrap();
    let config = print_config(
        tollgate()
            .env("TOLLGATE_LISTEN", "127.0.0.1:2002")
            .env("TOLLGATE_REDIS_PREFIX", "env-prefix")
            .env("TOLLGATE_STORE_TIMEOUT_MS", "80")
            .env("TOLLGATE_CONFIG", &file)
            .args(["serve", "--listen", "127.0.0.1:3003"])
            .args(["--store-timeout-ms", "90"]),
    );
    let expect = |key: &str, value: &str, source: &str| {
        assert_eq!(
            value_and_source(&config, key),
            (value.to_string(), source.to_string()),
            "{key} in:\n{config}"
        );
    };
    expect("listen", "\"127.0.0.1:3003\"", "flag");
    expect("store-timeout-ms", "\"90\"", "flag");
    expect("redis-prefix", "\"env-prefix\"", "env");
    expect("rescan-every", "\"42s\"", "file");
    expect("allow-empty", "true", "file");
    expect("http-listen", "\"127.0.0.1:8080\"", "default");
    expect("drain-timeout", "\"10s\"", "default");
}

#[test]
fn print_config_is_a_config_file_and_hides_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let config = print_config(
        tollgate()
            .env("TOLLGATE_REDIS_URL", "redis://admin:hunter2@redis:6379/0")
            .args(["serve", "--policies", "/a", "--policies", "/b"]),
    );
    assert!(!config.contains("hunter2"), "{config}");
    assert_eq!(
        value_and_source(&config, "redis"),
        (
            "\"redis://admin:<redacted>@redis:6379/0\"".to_string(),
            "env".to_string()
        )
    );
    assert_eq!(value_and_source(&config, "policies").0, "[\"/a\", \"/b\"]");
    assert!(!config.contains("print-config"), "{config}");

    // Fed back as a file, it gives the same configuration (all from the file).
    let file = dir.path().join("printed.yaml");
    let without_secret = print_config(tollgate().args(["serve", "--policies", "/a,/b"]));
    assert!(without_secret.contains("# redis:"), "{without_secret}");
    std::fs::write(&file, &without_secret).unwrap();
    let again = print_config(tollgate().arg("serve").arg("--config").arg(&file));
    assert!(
        again.contains(&format!("# Configuration file: {}", file.display())),
        "{again}"
    );
    let strip = |c: &str| -> Vec<String> {
        c.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split('#').next().unwrap().trim().to_string())
            .collect()
    };
    assert_eq!(strip(&without_secret), strip(&again));
    assert!(
        again
            .lines()
            .filter(|l| !l.starts_with('#'))
            .all(|l| l.ends_with("# file")),
        "{again}"
    );
}

#[test]
fn unknown_keys_and_bad_values_are_refused_with_their_position() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tollgate.yaml");
    std::fs::write(
        &file,
        "listen: 127.0.0.1:0\nlisten_adress: 127.0.0.1:1\ndrain-timeout: soon\npolicies: {a: 1}\n",
    )
    .unwrap();
    let out = tollgate()
        .arg("serve")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let name = file.display().to_string();
    for needle in [
        format!("{name}:2:1: unknown option `listen_adress`"),
        format!("{name}:3:16: `drain-timeout`: invalid value 'soon'"),
        format!("{name}:4:11: `policies` must be a single value, not a mapping"),
        "3 error(s) in the configuration file".to_string(),
    ] {
        assert!(err.contains(&needle), "{needle:?} missing from:\n{err}");
    }

    let missing = tollgate()
        .args(["serve", "--config", "/nonexistent/tollgate.yaml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr)
        .contains("/nonexistent/tollgate.yaml: cannot read"));
}

#[test]
fn redis_connections_are_bounded() {
    for bad in ["0", "65"] {
        let out = tollgate()
            .args([
                "serve",
                "--policies",
                &shipped_policies(),
                "--redis-connections",
                bad,
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--redis-connections"), "{err}");
        assert!(err.contains("1..=64") || err.contains("not in"), "{err}");
    }
    let config = print_config(tollgate().env("TOLLGATE_REDIS_CONNECTIONS", "3").args([
        "serve",
        "--policies",
        &shipped_policies(),
    ]));
    assert_eq!(
        value_and_source(&config, "redis-connections"),
        ("\"3\"".to_string(), "env".to_string()),
        "{config}"
    );
}

/// Polls `/healthz` on `port` until it answers.
fn wait_http(port: u16) {
    assert!(
        eventually(Duration::from_secs(20), || http_get(port, "/healthz")
            .is_ok_and(|(code, _)| code == 200)),
        "the server did not come up on {port}"
    );
}

#[test]
fn a_server_runs_on_the_settings_of_its_file() {
    let (grpc, http) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tollgate.yaml");
    std::fs::write(
        &file,
        format!(
            "listen: 127.0.0.1:{grpc}\nhttp_listen: 127.0.0.1:{http}\npolicies:\n  - {}\nlog-level: warn\ndata-dir: {}\n",
            shipped_policies(),
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut child = tollgate()
        .arg("serve")
        .arg("--config")
        .arg(&file)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_http(http);
    let (code, body) = http_get(http, "/status").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("\"rules\":10"), "{body}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", grpc)).is_ok());
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success());
    assert!(
        dir.path().join("data/store.snapshot").exists(),
        "the embedded store is kept in the file's data-dir"
    );
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    // `log-level: warn` from the file hides the info lines.
    assert!(!err.contains("policies loaded"), "{err}");
}

#[test]
fn json_logs_are_one_object_a_line_and_the_level_filters() {
    let (grpc, http) = (free_port(), free_port());
    let mut child = tollgate()
        .env("TOLLGATE_LOG", "warn")
        .args(["serve", "--ephemeral"])
        .args(["--log-format", "json", "--log-level", "debug"])
        .args(["--listen", &format!("127.0.0.1:{grpc}")])
        .args(["--http-listen", &format!("127.0.0.1:{http}")])
        .args(["--policies", &shipped_policies()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_http(http);
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success());
    let lines: Vec<String> = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .collect();
    assert!(!lines.is_empty());
    let mut levels = std::collections::BTreeSet::new();
    let mut messages = Vec::new();
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        levels.insert(v["level"].as_str().unwrap().to_string());
        messages.push(v["fields"]["message"].as_str().unwrap_or("").to_string());
    }
    // The flag's `debug` beat the environment's `warn`.
    assert!(levels.contains("INFO"), "{lines:#?}");
    assert!(messages.iter().any(|m| m == "policies loaded"));
    assert!(messages.iter().any(|m| m == "SIGINT: shutting down"));
}

/// Every option `serve --help` lists, as (long flag, environment variable).
fn serve_options() -> Vec<(String, Option<String>)> {
    let out = tollgate().args(["serve", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let mut options = Vec::new();
    for l in help.lines() {
        let l = l.trim_start();
        let Some(rest) = l.strip_prefix("--") else {
            continue;
        };
        let long: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        if long == "help" {
            continue;
        }
        let env = l
            .split_once("[env: ")
            .map(|(_, e)| e.split(['=', ']']).next().unwrap().to_string());
        options.push((long, env));
    }
    options
}

#[test]
fn every_serve_option_is_documented() {
    let doc = std::fs::read_to_string(format!(
        "{}/docs/configuration.md",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let options = serve_options();
    assert!(options.len() >= 20, "{options:?}");
    let mut missing = Vec::new();
    for (long, env) in &options {
        if !doc.contains(&format!("`--{long}`")) {
            missing.push(format!("--{long}"));
        }
        if let Some(env) = env {
            if !doc.contains(&format!("`{env}`")) {
                missing.push(env.clone());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not document: {missing:?}"
    );
}
