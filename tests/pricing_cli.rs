//! `tollgate pricing` and what `validate` and `explain` say about imported
//! catalogs and windows in a time zone, as a user runs them.

mod common;

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

const CATALOG: &str = r#"{
  "sample_spec": { "input_cost_per_token": 0.0 },
  "gpt-4o": { "input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05 },
  "o3": { "input_cost_per_token": 2e-06, "output_cost_per_token": 8e-06 },
  "mystery-model": { "mode": "chat" }
}"#;

const POLICY: &str = "\
pricing:
  import: [catalog/litellm.json]
  models:
    gpt-4o: { input_per_mtok: 2.00, output_per_mtok: 8.00 }
rules:
  - id: eu-billing
    match: { model: [gpt-4o, o3] }
    limit: { spend: 100, window: monthly, timezone: Europe/Berlin, anchor: 15 }
";

fn policy_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("catalog")).unwrap();
    std::fs::write(dir.path().join("catalog/litellm.json"), CATALOG).unwrap();
    std::fs::write(dir.path().join("p.yaml"), POLICY).unwrap();
    dir
}

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn pricing_show_prints_the_price_and_where_it_was_written() {
    let dir = policy_dir();
    let policies = dir.path().to_str().unwrap();
    let (code, out, err) = run(&["pricing", "show", "o3", "--policies", policies]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("input_per_mtok: 2\n"), "{out}");
    assert!(out.contains("output_per_mtok: 8\n"), "{out}");
    assert!(
        out.contains("catalog/litellm.json:4:3 (an imported catalog)"),
        "{out}"
    );
    assert!(
        out.contains("tokens: o200k_base (exact, for prompts up to 64 KiB, by its name)"),
        "{out}"
    );
    // The policy's own price wins over the catalog's.
    let (code, out, _) = run(&[
        "pricing",
        "show",
        "gpt-4o",
        "--policies",
        policies,
        "--json",
    ]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["price"]["input_per_mtok"], "2");
    assert_eq!(v["source"], "policy");
    assert_eq!(v["tokenizer"], "o200k_base");
    assert!(v["origin"].as_str().unwrap().ends_with("p.yaml:4:5"), "{v}");
    let (code, out, _) = run(&["pricing", "show", "mystery-model", "--policies", policies]);
    assert_eq!(code, Some(1));
    assert!(out.contains("mystery-model: no price"), "{out}");
}

#[test]
fn validate_warns_about_unusable_catalog_entries_with_their_position() {
    let dir = policy_dir();
    let (code, _, err) = run(&["validate", dir.path().to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("catalog/litellm.json:5:3: catalog entry not used: `mystery-model`"),
        "{err}"
    );
}

#[test]
fn explain_shows_the_price_source_and_the_window_in_its_zone() {
    let dir = policy_dir();
    let (code, out, err) = run(&[
        "explain",
        dir.path().to_str().unwrap(),
        "--attr",
        "model=o3",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("price of o3: ")
            && out.contains("catalog/litellm.json:4:3 (an imported catalog)"),
        "{out}"
    );
    assert!(
        out.contains("monthly (from day 15, Europe/Berlin)"),
        "{out}"
    );
    // The reset is shown in Berlin time, at midnight on a 15th.
    let reset = out
        .lines()
        .find(|l| l.starts_with("most constrained:"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        reset.contains("-15T00:00:00+01:00") || reset.contains("-15T00:00:00+02:00"),
        "{reset}"
    );
}

/// A forward-auth check naming a model: the status code.
async fn check_model(port: u16, model: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let request = format!(
        "GET /v1/authz/forward/v1/chat/completions HTTP/1.0\r\nHost: x\r\n\
         x-tollgate-model: {model}\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    text.split(' ').nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pricing_missing_lists_the_models_a_server_saw_without_a_price() {
    let dir = policy_dir();
    std::fs::write(
        dir.path().join("attributes.yaml"),
        "attributes:\n  client_attributes: [model]\nrules:\n  - id: all\n    limit: { requests: 1000, window: daily }\n",
    )
    .unwrap();
    let server = common::TollgateProcess::start(&["--policies", dir.path().to_str().unwrap()]);
    for model in [
        "o3",
        "gpt-4o",
        "mystery-model",
        "mystery-model",
        "other-model",
    ] {
        assert_eq!(check_model(server.http_port, model).await, 200, "{model}");
    }
    let url = format!("http://127.0.0.1:{}", server.http_port);
    let out = tokio::task::spawn_blocking(move || {
        let table = run(&["pricing", "missing", "--server", &url]);
        let json = run(&["pricing", "missing", "--server", &url, "--json"]);
        (table, json)
    })
    .await
    .unwrap();
    let ((code, table, err), (_, json, _)) = out;
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("MODEL"), "{table}");
    assert!(
        lines[1].starts_with("mystery-model") && lines[1].contains(" 2 "),
        "{table}"
    );
    assert!(lines[2].starts_with("other-model"), "{table}");
    assert_eq!(lines.len(), 3, "{table}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["models"][0]["model"], "mystery-model");
    assert_eq!(v["models"][0]["requests"], 2);
    assert_eq!(v["overflow"], 0);
}
