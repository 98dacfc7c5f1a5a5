//! The budget dashboard in a real browser: two replicas on one Redis, usage,
//! an alert, denials and an approval ask made through both, then the page
//! in headless Chromium (driven over DevTools) shows the right numbers, a
//! forecast, a new denial within seconds, and approves from the page with
//! the admin token; without the token it offers no approve button and the
//! admin API refuses.

#[path = "common/browser.rs"]
mod browser;
mod common;

use std::time::Duration;

use browser::Browser;
use common::{http_get, policy_dir, RedisServer, TollgateProcess};

const TOKEN: &str = "dashboard-admin-token-0123456789";

const POLICY: &str = "
attributes:
  trusted_headers: { team: x-tollgate-team, workflow: x-tollgate-workflow, environment: x-tollgate-environment }
rules:
  - id: team-chat-daily
    description: Chat requests a team may make in a day
    owner: platform@example.com
    match: { workflow: chat }
    per: [team]
    limit: { requests: 10, window: daily }
    alerts: [50, 80]
  - id: finance-watch
    description: Counts every chat request; never denies
    owner: finance@example.com
    match: { workflow: chat }
    enforcement: soft
    limit: { requests: 1000, window: monthly }
  - id: launch-renders
    description: Renders past the first need a sign-off
    owner: creative@example.com
    match: { workflow: render }
    per: [team]
    limit: { requests: 1, window: daily }
    on_exceed: approval
";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The status a forward-auth check for `workflow` and `team` gets.
fn check(server: &TollgateProcess, workflow: &str, team: &str) -> u16 {
    runtime()
        .block_on(common::http_request(
            server.http_port,
            "POST",
            "/v1/authz/forward",
            &[
                ("x-tollgate-workflow", workflow),
                ("x-tollgate-team", team),
                ("x-tollgate-environment", "production"),
            ],
            "",
        ))
        .unwrap()
        .status
}

fn admin_get(server: &TollgateProcess, token: Option<&str>) -> common::HttpReply {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
    runtime()
        .block_on(common::http_request(
            server.http_port,
            "GET",
            "/v1/admin/approvals",
            &headers,
            "",
        ))
        .unwrap()
}

fn artifact(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn the_dashboard_shows_budgets_denials_and_approves_from_the_page_across_replicas() {
    let redis = RedisServer::start();
    let policies = policy_dir(&[("dashboard.yaml", POLICY)]);
    let token_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token_file.path(), format!("{TOKEN}\n")).unwrap();
    let url = redis.url();
    let args = [
        "--policies",
        policies.path().to_str().unwrap(),
        "--redis",
        &url,
        "--admin-token-file",
        token_file.path().to_str().unwrap(),
    ];
    let a = TollgateProcess::start(&args);
    let b = TollgateProcess::start(&args);

    // `/` sends a browser to the page.
    let (code, _) = http_get(a.http_port, "/").unwrap();
    assert_eq!(code, 302);

    // Six chat requests for growth, alternating replicas: 60% of 10, past
    // the 50% alert. Only replica B sees the render scope: the page on A
    // must still list it.
    for i in 0..6 {
        let server = if i % 2 == 0 { &a } else { &b };
        assert_eq!(check(server, "chat", "growth"), 200);
    }
    assert_eq!(check(&b, "render", "design"), 200);
    assert_eq!(check(&b, "render", "design"), 403, "an approval ask");

    let mut page = Browser::open(&format!("{}/ui/", a.http_endpoint()), 1280, 1000);
    let row = r#"document.querySelector('#budget-groups tr[data-rule="team-chat-daily"][data-scope="team=growth"]')"#;
    assert!(
        page.wait_for(row, Duration::from_secs(15)),
        "no budget row for team=growth"
    );
    let cells = page.eval(&format!(
        "(() => {{ const r = {row}; return [r.querySelector('.used').textContent, r.querySelector('.limit').textContent, r.querySelector('.percent').textContent, r.querySelector('.forecast').textContent, r.querySelector('.forecast').dataset.state]; }})()"
    ));
    assert_eq!(cells[0], "6 requests", "{cells}");
    assert_eq!(cells[1], "10 requests", "{cells}");
    assert_eq!(cells[2], "60.0%", "{cells}");
    let forecast = cells[3].as_str().unwrap();
    assert!(
        forecast.starts_with("runs out at ") || forecast == "not this window",
        "forecast {forecast:?}"
    );
    // The owner, the description and the soft rule's mark.
    let groups = page.eval("document.querySelector('#budget-groups').textContent");
    let groups = groups.as_str().unwrap();
    assert!(groups.contains("platform@example.com"), "{groups}");
    assert!(
        groups.contains("Chat requests a team may make in a day"),
        "{groups}"
    );
    assert!(
        page.wait_for(
            "document.querySelector('#budget-groups [data-rule=\"finance-watch\"] .tag.soft')",
            Duration::from_secs(10)
        ),
        "the soft rule is not marked"
    );
    // The scope only replica B saw, read by A from the store.
    assert!(
        page.wait_for(
            r#"document.querySelector('#budget-groups tr[data-rule="launch-renders"][data-scope="team=design"]')"#,
            Duration::from_secs(10)
        ),
        "a scope seen by the other replica is missing"
    );
    // The alert fired once, at 50%.
    assert!(
        page.wait_for(
            r#"document.querySelector('#alerts tr[data-rule="team-chat-daily"][data-threshold="50"]')"#,
            Duration::from_secs(10)
        ),
        "no alert listed"
    );
    // The pending ask, with no approve button and no token.
    assert!(
        page.wait_for(
            r#"document.querySelector('#pending tr[data-rule="launch-renders"][data-scope="team=design"]')"#,
            Duration::from_secs(10)
        ),
        "no pending ask"
    );
    assert_eq!(
        page.eval("document.querySelectorAll('button.approve').length"),
        0
    );
    assert_eq!(
        admin_get(&a, None).status,
        401,
        "the admin API without a token"
    );

    // A denial on replica B shows on A's page within a few seconds.
    for _ in 0..4 {
        assert_eq!(check(&b, "chat", "growth"), 200);
    }
    let denied_at = std::time::Instant::now();
    assert_eq!(check(&b, "chat", "growth"), 429);
    assert!(
        page.wait_for(
            r#"document.querySelector('#denials tr[data-rule="team-chat-daily"][data-reason="budget_exceeded"]')"#,
            Duration::from_secs(10)
        ),
        "the denial did not appear"
    );
    let seen_after = denied_at.elapsed();
    assert!(seen_after < Duration::from_secs(8), "{seen_after:?}");
    assert!(page.wait_for(
        &format!("{row}.querySelector('.percent').textContent === '100.0%'"),
        Duration::from_secs(10)
    ));

    // The token, entered in the page, then approve from the page.
    page.eval(&format!(
        "document.getElementById('token').value = '{TOKEN}'; document.getElementById('token-save').click(); true"
    ));
    assert!(
        page.wait_for(
            r#"document.querySelector('button.approve[data-rule="launch-renders"][data-scope="team=design"]')"#,
            Duration::from_secs(10)
        ),
        "no approve button with the token"
    );
    assert_eq!(
        page.eval("sessionStorage.getItem('tollgate.adminToken')"),
        TOKEN
    );
    assert_eq!(page.eval("document.cookie"), "", "no cookie");
    page.eval(
        r#"document.querySelector('button.approve[data-rule="launch-renders"]').click();
           document.getElementById('a-extra').value = '5';
           document.getElementById('a-approver').value = 'lead@example.com';
           document.getElementById('a-reason').value = 'launch week';
           document.getElementById('a-submit').click(); true"#,
    );
    assert!(
        page.wait_for(
            "document.getElementById('approve-result').textContent.startsWith('Granted launch-renders')",
            Duration::from_secs(10)
        ),
        "{}",
        page.eval("document.getElementById('approve-result').textContent")
    );
    let listed = admin_get(&b, Some(TOKEN));
    assert_eq!(listed.status, 200, "{}", listed.body);
    let listed: serde_json::Value = serde_json::from_str(&listed.body).unwrap();
    let grant = listed["grants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["rule"] == "launch-renders" && g["scope"] == "team=design")
        .unwrap_or_else(|| panic!("no grant listed: {listed}"));
    assert_eq!(grant["approver"], "lead@example.com");
    assert_eq!(
        check(&a, "render", "design"),
        200,
        "the gated request is allowed"
    );
    assert!(
        page.wait_for(
            r#"document.querySelector('#grants tr[data-rule="launch-renders"]')"#,
            Duration::from_secs(10)
        ),
        "the grant is not shown"
    );
    std::fs::write(artifact("dashboard.png"), page.screenshot()).unwrap();

    // At phone width the page does not scroll sideways.
    page.call(
        "Emulation.setDeviceMetricsOverride",
        serde_json::json!({ "width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": true }),
    );
    std::thread::sleep(Duration::from_millis(300));
    let width = page.eval("document.documentElement.scrollWidth");
    let offenders = page.eval(
        "[...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > 392 && !(e.parentElement && e.parentElement.closest('.scroll'))).slice(0, 8).map(e => e.tagName + '#' + e.id + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right))",
    );
    assert!(
        width.as_u64().unwrap() <= 392,
        "page is {width} px wide on a phone: {offenders}"
    );
    std::fs::write(artifact("dashboard-phone.png"), page.screenshot()).unwrap();

    // The server gone: the page says its data is stale.
    drop(a);
    assert!(
        page.wait_for(
            "document.getElementById('freshness').dataset.stale === 'true'",
            Duration::from_secs(15)
        ),
        "stale data not flagged"
    );
    drop(redis);
}

#[test]
fn the_dashboard_can_be_off_or_behind_the_admin_token() {
    let policies = policy_dir(&[("dashboard.yaml", POLICY)]);
    let token_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token_file.path(), format!("{TOKEN}\n")).unwrap();
    let dir = policies.path().to_str().unwrap();

    let off = TollgateProcess::start(&["--policies", dir, "--ephemeral", "--dashboard", "off"]);
    assert_eq!(http_get(off.http_port, "/ui/").unwrap().0, 404);
    assert_eq!(http_get(off.http_port, "/v1/dashboard").unwrap().0, 404);
    assert_eq!(http_get(off.http_port, "/").unwrap().0, 404);

    let admin = TollgateProcess::start(&[
        "--policies",
        dir,
        "--ephemeral",
        "--dashboard",
        "admin",
        "--admin-token-file",
        token_file.path().to_str().unwrap(),
    ]);
    assert_eq!(http_get(admin.http_port, "/ui/").unwrap().0, 200);
    assert_eq!(http_get(admin.http_port, "/v1/dashboard").unwrap().0, 401);
    let auth = format!("Bearer {TOKEN}");
    let answer = runtime()
        .block_on(common::http_request(
            admin.http_port,
            "GET",
            "/v1/dashboard",
            &[("authorization", &auth)],
            "",
        ))
        .unwrap();
    assert_eq!(answer.status, 200);
    let v: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(v["api_version"], 1);
    assert_eq!(v["mode"], "admin");

    // The page served by default, with the admin API on its own listener:
    // the JSON says where.
    let own = common::free_port();
    let on = TollgateProcess::start(&[
        "--policies",
        dir,
        "--ephemeral",
        "--admin-token-file",
        token_file.path().to_str().unwrap(),
        "--admin-listen",
        &format!("127.0.0.1:{own}"),
    ]);
    let (code, body) = http_get(on.http_port, "/v1/dashboard").unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["admin"]["api"], "own");
    assert_eq!(v["admin"]["address"], format!("127.0.0.1:{own}"));
}

/// `defaults.output_tokens: learned`: calls settled through the server
/// show in `GET /v1/dashboard` as the learned p95 of their model and
/// workflow, in use once `min_samples` have settled.
#[test]
fn the_dashboard_api_shows_the_learned_output_tokens() {
    let policy = "
attributes:
  trusted_headers: { workflow: x-tollgate-workflow, model: x-tollgate-model }
defaults:
  output_tokens: { learned: p95, default: 4096, min_samples: 5 }
rules:
  - id: output
    match: { workflow: \"*\" }
    per: [workflow]
    limit: { output_tokens: 100000000, window: daily }
";
    let dir = policy_dir(&[("p.yaml", policy)]);
    let server =
        TollgateProcess::start(&["--policies", dir.path().to_str().unwrap(), "--ephemeral"]);
    let rt = runtime();
    let learned = |server: &TollgateProcess| {
        let (code, body) = http_get(server.http_port, "/v1/dashboard").unwrap();
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["learned_output"].clone()
    };
    let view = learned(&server);
    assert_eq!(view["enabled"], true);
    assert_eq!(view["percentile"], 95);
    assert_eq!(view["entries"], serde_json::json!([]));
    // Outputs 100, 200, ... 1000: the nearest-rank p95 of ten is the 10th.
    for i in 1..=10u64 {
        let reply = rt
            .block_on(common::http_request(
                server.http_port,
                "POST",
                "/v1/authz/forward",
                &[
                    ("x-tollgate-workflow", "support"),
                    ("x-tollgate-model", "gpt-4o"),
                ],
                "",
            ))
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
        let reservation = reply.header("x-tollgate-reservation").unwrap().to_string();
        let body = format!(
            r#"{{"reservation_id":"{reservation}","usage":{{"input_tokens":10,"output_tokens":{}}}}}"#,
            i * 100
        );
        let settled = rt
            .block_on(common::http_request(
                server.http_port,
                "POST",
                "/v1/settle",
                &[("content-type", "application/json")],
                &body,
            ))
            .unwrap();
        assert_eq!(settled.status, 200, "{}", settled.body);
    }
    // The view is built at most once a second.
    std::thread::sleep(Duration::from_millis(1_100));
    let view = learned(&server);
    let entries = view["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{view}");
    assert_eq!(entries[0]["model"], "gpt-4o");
    assert_eq!(entries[0]["workflow"], "support");
    assert_eq!(entries[0]["samples"], 10);
    assert_eq!(entries[0]["output_tokens"], 1000);
    assert_eq!(entries[0]["in_use"], true);

    // `explain --server` reserves what that server learned.
    let url = format!("http://127.0.0.1:{}", server.http_port);
    let explain = |workflow: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["explain", dir.path().to_str().unwrap(), "--server", &url])
            .args([
                "--attr",
                &format!("workflow={workflow}"),
                "--attr",
                "model=gpt-4o",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let text = explain("support");
    assert!(
        text.contains(&format!(
            "output tokens: 1000 (learned: the p95 of the last 10 settled calls of gpt-4o in \
             workflow \"support\" on {url} (10 settled in all))"
        )),
        "{text}"
    );
    let text = explain("triage");
    assert!(
        text.contains(&format!(
            "output tokens: 4096 (defaults.output_tokens; {url} has settled no call of this \
             model and workflow to learn from)"
        )),
        "{text}"
    );
}
