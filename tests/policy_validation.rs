//! Validation reports every problem, each at its file:line:column.

mod common;

use common::compile;

/// Loads and returns every diagnostic as `file:line:col: message`.
fn errors(files: &[(&str, &str)]) -> Vec<String> {
    match compile(files) {
        Ok(_) => panic!("expected validation errors"),
        Err(e) => e.0.iter().map(|d| d.to_string()).collect(),
    }
}

fn has(errors: &[String], prefix: &str, needle: &str) {
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with(prefix) && e.contains(needle)),
        "no error at {prefix} containing {needle:?} in:\n{}",
        errors.join("\n")
    );
}

#[test]
fn every_error_is_reported_with_its_position() {
    let yaml = "\
rules:
  - id: a
    limit: { requests: 10, window: daily }
    colour: blue
  - id: b
    limit: { requests: 10, window: fortnightly }
  - id: c
    limit: { window: daily }
  - id: d
    limit: { requests: 10, tokens: 5, window: daily }
  - id: e
    limit: { spend: -5, window: daily }
    match: { model: gpt-4o }
  - id: f
    match: { model_family: premium }
    limit: { requests: 1, window: daily }
";
    let errs = errors(&[("p.yaml", yaml)]);
    has(&errs, "p.yaml:4:5:", "unknown field `colour`");
    has(&errs, "p.yaml:6:36:", "bad window \"fortnightly\"");
    has(&errs, "p.yaml:8:12:", "names no unit");
    has(&errs, "p.yaml:10:28:", "exactly one unit");
    has(&errs, "p.yaml:12:21:", "must not be negative");
    has(
        &errs,
        "p.yaml:15:28:",
        "model family `premium` is not defined",
    );
    assert_eq!(errs.len(), 6, "{}", errs.join("\n"));
}

#[test]
fn bad_time_zones_and_anchors_are_positioned() {
    let yaml = "\
rules:
  - id: a
    limit: { spend: 10, window: monthly, timezone: Mars/Olympus }
  - id: b
    limit: { spend: 10, window: monthly, anchor: 32 }
  - id: c
    limit: { spend: 10, window: weekly, anchor: funday }
  - id: d
    limit: { spend: 10, window: daily, anchor: 3 }
  - id: e
    limit: { spend: 10, window: hour, timezone: Europe/Berlin }
  - id: f
    limit: { spend: 10, window: 7d, anchor: 2 }
  - id: g
    limit: { concurrent: 2, timezone: Europe/Berlin }
";
    let errs = errors(&[("p.yaml", yaml)]);
    has(
        &errs,
        "p.yaml:3:52:",
        "\"Mars/Olympus\" is not an IANA time zone",
    );
    has(&errs, "p.yaml:5:50:", "billing day, 1 to 31");
    has(&errs, "p.yaml:7:49:", "one of monday, tuesday");
    has(&errs, "p.yaml:9:48:", "a daily window takes no `anchor`");
    has(
        &errs,
        "p.yaml:11:49:",
        "applies to a daily, weekly or monthly window",
    );
    has(
        &errs,
        "p.yaml:13:45:",
        "applies to a daily, weekly or monthly window",
    );
    has(
        &errs,
        "p.yaml:15:39:",
        "needs a daily, weekly or monthly `window`",
    );
    assert_eq!(errs.len(), 7, "{}", errs.join("\n"));
    // Weekday anchors take full and three-letter names.
    for ok in ["sunday", "Sun", "mon"] {
        let yaml = format!(
            "rules:\n  - id: w\n    limit: {{ requests: 1, window: weekly, anchor: {ok}, timezone: Asia/Tokyo }}\n"
        );
        assert!(compile(&[("p.yaml", &yaml)]).is_ok(), "{ok}");
    }
}

#[test]
fn duplicate_ids_across_files_name_both_places() {
    let one = "rules:\n  - id: shared\n    limit: { requests: 1, window: daily }\n";
    let two = "\n\nrules:\n  - id: shared\n    limit: { requests: 2, window: daily }\n";
    let errs = errors(&[("one.yaml", one), ("two.yaml", two)]);
    has(
        &errs,
        "two.yaml:4:5:",
        "duplicate rule id `shared`: first defined at one.yaml:2:5",
    );
}

#[test]
fn a_spend_rule_that_can_match_unpriced_models_is_refused() {
    let yaml = "\
pricing:
  models:
    gpt-4o: { input_per_mtok: 2.5, output_per_mtok: 10 }
  families:
    premium: [\"gpt-5*\"]
rules:
  - id: everything
    limit: { spend: 10, window: daily }
  - id: named
    match: { model: [gpt-4o, mystery-model] }
    limit: { spend: 10, window: daily }
  - id: family
    match: { model_family: premium }
    limit: { spend: 10, window: daily }
  - id: fine
    match: { model: gpt-4o }
    limit: { spend: 10, window: daily }
";
    let errs = errors(&[("p.yaml", yaml)]);
    has(&errs, "p.yaml:7:5:", "it matches every model");
    has(&errs, "p.yaml:9:5:", "`mystery-model`");
    has(&errs, "p.yaml:12:5:", "`gpt-5*`");
    assert_eq!(errs.len(), 3, "{}", errs.join("\n"));

    // Opting into refusal at check time, or a catch-all price, makes it valid.
    let reject = yaml.replace("pricing:\n", "pricing:\n  unpriced_models: reject\n");
    assert!(compile(&[("p.yaml", &reject)]).is_ok());
    let catch_all = yaml.replace(
        "  models:\n",
        "  models:\n    \"*\": { per_request: 0.01 }\n",
    );
    assert!(compile(&[("p.yaml", &catch_all)]).is_ok());
}

#[test]
fn half_written_and_malformed_files_are_positioned_errors() {
    let half = "rules:\n  - id: a\n    limit: { requests: 10, window: da";
    let errs = errors(&[("half.yaml", half)]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].starts_with("half.yaml:"), "{errs:?}");
    assert!(errs[0].contains("invalid YAML"), "{errs:?}");

    let tabs = "rules:\n\t- id: a\n";
    has(
        &errors(&[("tabs.yaml", tabs)]),
        "tabs.yaml:2:",
        "invalid YAML",
    );

    let two_docs = "rules: []\n---\nrules: []\n";
    has(
        &errors(&[("docs.yaml", two_docs)]),
        "docs.yaml:2:1:",
        "one YAML document",
    );

    // Empty is what a reader sees mid-write: an error, not "no rules".
    has(
        &errors(&[("empty.yaml", "")]),
        "empty.yaml:1:1:",
        "no YAML document",
    );
    has(
        &errors(&[("comments.yaml", "# nothing yet\n")]),
        "comments.yaml:1:1:",
        "no YAML document",
    );
    assert!(common::compile(&[("empty.yaml", "rules: []\n")]).is_ok());

    let not_a_map = "- just\n- a list\n";
    has(
        &errors(&[("list.yaml", not_a_map)]),
        "list.yaml:1:1:",
        "must be a mapping",
    );
}

#[test]
fn field_level_mistakes() {
    let yaml = "\
keys:
  - id: k
    sha256: not-a-hash
rules:
  - id: has space
    limit: { requests: 1.5, window: daily }
  - id: soft-downgrade
    enforcement: soft
    on_exceed: { downgrade: gpt-4o-mini }
    limit: { requests: 1, window: daily }
  - id: conc
    limit: { concurrent: 3, window: daily }
  - id: alerts
    alerts: [90, 50, 0]
    limit: { requests: 1, window: daily }
  - id: modality
    match: { modality: hologram, attempt_kind: third }
    limit: { requests: 1, window: daily }
  - id: per
    per: [team, team, colour]
    limit: { requests: 1, window: daily }
";
    let errs = errors(&[("p.yaml", yaml)]);
    has(&errs, "p.yaml:3:13:", "64 hex digits");
    has(&errs, "p.yaml:5:9:", "may only use letters");
    has(&errs, "p.yaml:6:24:", "whole number");
    has(&errs, "p.yaml:9:16:", "soft rule never blocks");
    has(&errs, "p.yaml:12:37:", "takes no window");
    has(&errs, "p.yaml:14:18:", "ascending");
    has(&errs, "p.yaml:14:22:", "from 1 to 1000");
    has(&errs, "p.yaml:17:24:", "modality");
    has(&errs, "p.yaml:17:48:", "attempt_kind");
    has(&errs, "p.yaml:20:17:", "appears twice");
    has(&errs, "p.yaml:20:23:", "unknown attribute `colour`");
}

#[test]
fn exact_decimals_are_read_from_the_source_text() {
    let yaml = "\
pricing:
  models:
    m: { per_request: 0.1 }
rules:
  - id: r
    match: { model: m }
    limit: { spend: 0.3, window: daily }
";
    let policy = common::policy(yaml);
    let rule = &policy.rules()[0];
    assert_eq!(rule.limit.amount.to_string(), "0.3");
    let price = policy.price("m").expect("priced");
    assert_eq!(
        price.per_request.map(|d| d.to_string()).as_deref(),
        Some("0.1")
    );
}

#[test]
fn the_shipped_policies_load() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let policy = tollgate_core::policy::load_dirs(&[dir]).unwrap_or_else(|e| panic!("{e}"));
    let ids: Vec<&str> = policy.rules().iter().map(|r| r.id.as_str()).collect();
    for expected in [
        "prod-key-monthly",
        "team-monthly",
        "research-agent-daily",
        "staging-daily",
        "premium-models-monthly",
        "customer-tokens-monthly",
        "final-render-images-daily",
        "video-jobs-in-flight",
        "attempts-per-action",
        "fallback-spend-monthly",
    ] {
        assert!(ids.contains(&expected), "missing {expected} in {ids:?}");
    }
}

#[test]
fn notifier_mistakes_are_positioned() {
    let yaml = "\
notifiers:
  - id: hook
    webhook: { url: ftp://example.com, secret_env: HOOK_SECRET }
  - id: unsigned
    webhook: { url: https://hooks.example.com/t }
  - id: log
    log: {}
  - id: two-kinds
    log: {}
    redis_stream: { stream: alerts }
  - id: slow
    webhook: { url: http://h/x, secret_env: S, timeout: 5m, max_attempts: 50 }
  - id: feed
    redis_stream: { stream: alerts }
rules:
  - id: a
    limit: { requests: 10, window: daily }
    alerts: [50]
    notify: [feed, pager]
";
    let errs = errors(&[("n.yaml", yaml)]);
    has(&errs, "n.yaml:3:21:", "http:// or https:// URL");
    has(&errs, "n.yaml:5:14:", "a webhook needs `secret_env`");
    has(&errs, "n.yaml:6:5:", "`log` is built in");
    has(
        &errs,
        "n.yaml:8:5:",
        "exactly one of `log`, `webhook` or `redis_stream`",
    );
    has(&errs, "n.yaml:12:57:", "from 1s to 60s");
    has(&errs, "n.yaml:12:75:", "from 1 to 20");
    has(
        &errs,
        "n.yaml:16:5:",
        "rule `a` notifies `pager`, which is not defined (notifiers: log, feed)",
    );
    assert_eq!(errs.len(), 7, "{}", errs.join("\n"));
}

#[test]
fn rules_notify_their_own_notifiers_or_the_defaults() {
    let p = common::policy(
        "
notifiers:
  - id: finance
    default: true
    webhook: { url: https://hooks.example.com/finance, secret_env: FINANCE_SECRET }
  - id: feed
    redis_stream: { stream: alerts }
rules:
  - id: plain
    limit: { requests: 10, window: daily }
    alerts: [50]
  - id: routed
    limit: { requests: 10, window: daily }
    alerts: [50]
    notify: [feed, log]
",
    );
    let of = |id: &str| {
        let rule = p.rules().iter().find(|r| r.id == id).unwrap();
        p.set.notifiers_for(rule).join(",")
    };
    assert_eq!(of("plain"), "finance");
    assert_eq!(of("routed"), "feed,log");
    let none = common::policy("rules: [{ id: r, limit: { requests: 1, window: daily } }]");
    assert_eq!(none.set.notifiers_for(&none.rules()[0]), ["log"]);
}

#[test]
fn alert_routing_mistakes_are_refused() {
    let yaml = "\
notifiers:
  - id: trail
    redis_stream: { stream: approvals }
rules:
  - id: slots
    limit: { concurrent: 5 }
    alerts: [80]
  - id: twice
    limit: { requests: 10, window: daily }
    alerts: [50]
    notify: [log, log]
";
    let errs = errors(&[("a.yaml", yaml)]);
    has(&errs, "a.yaml:3:29:", "approvals audit trail");
    has(&errs, "a.yaml:7:13:", "would fire again at every climb");
    has(&errs, "a.yaml:11:19:", "listed twice");
    assert_eq!(errs.len(), 3, "{}", errs.join("\n"));
}

#[test]
fn the_shipped_catalog_loads_and_holds_the_shipped_prices() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let catalog = root.join("policies/catalog/model_prices_and_context_window.json");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("prices.yaml"),
        format!(
            "pricing:\n  import: [{:?}]\nrules: []\n",
            catalog.display().to_string()
        ),
    )
    .unwrap();
    let imported = tollgate_core::policy::load_dirs(&[dir.path().to_path_buf()])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        imported.set.warnings.is_empty(),
        "{:?}",
        imported.set.warnings
    );
    let shipped = tollgate_core::policy::load_dirs(&[root.join("policies")]).unwrap();
    let mut models = 0;
    for (pattern, price, _) in &shipped.set.pricing.models {
        let Some(name) = pattern.exact() else {
            continue;
        };
        let (from_catalog, origin, source) = imported
            .priced(name)
            .unwrap_or_else(|| panic!("{name} is not in the catalog"));
        assert_eq!(source, tollgate_core::policy::PriceSource::Catalog);
        assert!(origin
            .file
            .ends_with("model_prices_and_context_window.json"));
        // The catalog format has no default output estimate.
        let mut expected = price.clone();
        expected.default_output_tokens = None;
        assert_eq!(from_catalog, &expected, "{name}");
        models += 1;
    }
    assert_eq!(models, 10);
}

#[test]
fn policy_prices_override_imported_ones_and_unusable_entries_are_reported() {
    let catalog = r#"{
  "gpt-4o": { "input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05 },
  "gpt-4o-mini": { "input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07 },
  "o3": { "input_cost_per_token": 2e-06, "output_cost_per_token": 8e-06 },
  "mystery": { "mode": "chat" },
  "broken": { "input_cost_per_token": -1 }
}"#;
    let yaml = "\
pricing:
  import: [litellm.json]
  models:
    gpt-4o: { input_per_mtok: 2.00, output_per_mtok: 8.00 }
    \"gpt-4o-*\": { input_per_mtok: 0.10, output_per_mtok: 0.40 }
    \"*\": { input_per_mtok: 50, output_per_mtok: 50 }
rules:
  - id: spend
    match: { model: [gpt-4o, o3] }
    limit: { spend: 10, window: daily }
";
    let p = compile(&[("p/prices.yaml", yaml), ("p/litellm.json", catalog)]).unwrap();
    use rust_decimal::Decimal;
    use tollgate_core::policy::PriceSource;
    let input = |model: &str| p.price(model).unwrap().input_per_mtok.unwrap();
    let source = |model: &str| {
        let (_, origin, source) = p.priced(model).unwrap();
        (origin.to_string(), source)
    };
    // The policy's own name and its globs win; the catch-all does not.
    assert_eq!(input("gpt-4o"), Decimal::new(2, 0));
    assert_eq!(
        source("gpt-4o"),
        ("p/prices.yaml:4:5".into(), PriceSource::Policy)
    );
    assert_eq!(input("gpt-4o-mini"), Decimal::new(10, 2));
    assert_eq!(source("gpt-4o-mini").1, PriceSource::PolicyGlob);
    assert_eq!(input("o3"), Decimal::new(2, 0));
    assert_eq!(
        source("o3"),
        ("p/litellm.json:4:3".into(), PriceSource::Catalog)
    );
    assert_eq!(input("unknown"), Decimal::new(50, 0));
    let warnings: Vec<String> = p
        .set
        .warnings
        .iter()
        .map(|(o, m)| format!("{o}: {m}"))
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].starts_with("p/litellm.json:5:3: catalog entry not used: `mystery`"));
    assert!(warnings[1].contains("p/litellm.json:6:3") && warnings[1].contains("negative"));

    // Imported prices count for the unpriced-models check.
    let only_catalog = "\
pricing:
  import: [litellm.json]
rules:
  - id: spend
    match: { model: [gpt-4o, o3] }
    limit: { spend: 10, window: daily }
  - id: unpriced
    match: { model: claude-opus-4 }
    limit: { spend: 10, window: daily }
";
    let errs = errors(&[("p/prices.yaml", only_catalog), ("p/litellm.json", catalog)]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    has(&errs, "p/prices.yaml:7:5:", "`claude-opus-4`");
}

#[test]
fn catalog_mistakes_are_positioned() {
    let yaml = "\
pricing:
  import: [missing.json, prices.csv, bad.json]
rules: []
";
    let errs = errors(&[
        ("p.yaml", yaml),
        (
            "bad.json",
            "{\n  \"m\": { \"input_cost_per_token\": 1e-06, }\n}",
        ),
    ]);
    has(
        &errs,
        "p.yaml:2:12:",
        "cannot read the price catalog \"missing.json\"",
    );
    has(&errs, "p.yaml:2:26:", "whose name ends in .json");
    has(
        &errs,
        "bad.json:2:41:",
        "invalid JSON: expected a quoted key",
    );
    assert_eq!(errs.len(), 3, "{}", errs.join("\n"));
}

#[test]
fn tokenizer_and_learned_output_mistakes_are_positioned() {
    let yaml = "\
pricing:
  models:
    gpt-4o: { input_per_mtok: 2.5, tokenizer: p50k_base }
    my-model: { tokenizer: o200k_base }
defaults:
  output_tokens: { learned: p100 }
rules:
  - id: a
    limit: { requests: 10, window: daily }
";
    let errs = errors(&[("p.yaml", yaml)]);
    has(
        &errs,
        "p.yaml:3:47:",
        "`gpt-4o.tokenizer` is `o200k_base`, `cl100k_base` or `approximate`",
    );
    // A tokenizer is not a price.
    has(
        &errs,
        "p.yaml:4:15:",
        "the price of my-model names no price",
    );
    has(&errs, "p.yaml:6:29:", "a percentile from p50 to p99");
    assert_eq!(errs.len(), 3, "{}", errs.join("\n"));

    let errs = errors(&[(
        "q.yaml",
        "defaults:\n  output_tokens: { default: 500, min_samples: 0 }\n",
    )]);
    has(&errs, "q.yaml:2:47:", "is from 1 to 256");
    has(&errs, "q.yaml:2:18:", "needs `learned`");
    assert_eq!(errs.len(), 2, "{}", errs.join("\n"));
}

#[test]
fn tokenizer_and_learned_output_load() {
    let policy = compile(&[(
        "p.yaml",
        "\
pricing:
  models:
    house-gpt: { input_per_mtok: 1, tokenizer: o200k_base }
    gpt-4o: { input_per_mtok: 2.5, tokenizer: approximate }
defaults:
  output_tokens: { learned: p90, default: 2000, min_samples: 50 }
",
    )])
    .unwrap_or_else(|e| panic!("{e}"));
    use tollgate_core::policy::{LearnOutput, Tokenizer};
    assert_eq!(
        policy.price("house-gpt").and_then(|p| p.tokenizer),
        Some(Tokenizer::O200kBase)
    );
    assert_eq!(
        policy.price("gpt-4o").and_then(|p| p.tokenizer),
        Some(Tokenizer::Approximate)
    );
    assert_eq!(policy.set.defaults.output_tokens, 2000);
    assert_eq!(
        policy.set.defaults.learn_output,
        Some(LearnOutput {
            percentile: 90,
            min_samples: 50
        })
    );
    let plain = compile(&[("p.yaml", "defaults:\n  output_tokens: learned\n")])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        plain.set.defaults.learn_output,
        Some(LearnOutput::default())
    );
    assert_eq!(plain.set.defaults.output_tokens, 1000);
}
