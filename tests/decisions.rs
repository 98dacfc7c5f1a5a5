//! Decisions end to end through the gate on the embedded store: matching,
//! per-scope counters, charges, downgrades, approval gates, settle, windows.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{at, memory_gate, policy};
use tollgate_core::engine::{Attributes, Decision, Estimate, Reason, RequestError, Verdict};
use tollgate_core::gate::{ActualUsage, CheckInput, GateError, GrantRequest};
use tollgate_core::policy::Attr;
use tollgate_core::store::MemoryStore;
use tollgate_core::store::SettleOutcome;

fn attrs(pairs: &[(&str, &str)]) -> Attributes {
    let mut a = Attributes::default();
    for (k, v) in pairs {
        let attr = tollgate_core::policy::Attr::parse(k).unwrap_or_else(|| panic!("attribute {k}"));
        a.set(&attr, v.to_string());
    }
    a
}

/// A request as a trusted service sends it on the native API: its
/// attributes rank with the route, and it calls the model it is told to.
fn input(pairs: &[(&str, &str)]) -> CheckInput {
    CheckInput {
        attributes: attrs(pairs),
        can_switch_model: true,
        ..Default::default()
    }
}

const MATRIX: &str = "
pricing:
  models:
    gpt-4o: { input_per_mtok: 2.50, output_per_mtok: 10.00 }
    gpt-4o-mini: { input_per_mtok: 0.15, output_per_mtok: 0.60 }
    gpt-5: { input_per_mtok: 1.25, output_per_mtok: 10.00 }
    claude-opus-4: { input_per_mtok: 15, output_per_mtok: 75 }
  families:
    premium: [\"gpt-5*\", \"claude-opus-*\"]
rules:
  - id: prod
    match: { environment: production }
    limit: { requests: 100, window: daily }
  - id: team-list
    match: { team: [growth, data] }
    limit: { requests: 100, window: daily }
  - id: glob-model
    match: { model: \"gpt-4o*\" }
    limit: { requests: 100, window: daily }
  - id: family
    match: { model_family: premium }
    limit: { requests: 100, window: daily }
  - id: two-conditions
    match: { environment: production, labels.tier: gold }
    limit: { requests: 100, window: daily }
  - id: label-map-form
    match: { labels: { region: eu } }
    limit: { requests: 100, window: daily }
  - id: everything
    limit: { requests: 100000, window: daily }
";

#[test]
fn matching_table() {
    let p = policy(MATRIX);
    type Pairs<'a> = &'a [(&'a str, &'a str)];
    let cases: &[(Pairs, &[&str])] = &[
        (&[], &["everything"]),
        (&[("environment", "production")], &["prod", "everything"]),
        (&[("environment", "staging")], &["everything"]),
        (&[("team", "data")], &["team-list", "everything"]),
        (&[("team", "support")], &["everything"]),
        (&[("model", "gpt-4o")], &["glob-model", "everything"]),
        (&[("model", "gpt-4o-mini")], &["glob-model", "everything"]),
        (&[("model", "gpt-5")], &["family", "everything"]),
        (&[("model", "claude-opus-4")], &["family", "everything"]),
        (&[("model", "claude-sonnet-4")], &["everything"]),
        (
            &[("environment", "production"), ("labels.tier", "gold")],
            &["prod", "two-conditions", "everything"],
        ),
        (&[("labels.tier", "gold")], &["everything"]),
        (
            &[("labels.region", "eu")],
            &["label-map-form", "everything"],
        ),
    ];
    for (pairs, expected) in cases {
        let mut a = attrs(pairs);
        a.families = a
            .model
            .as_deref()
            .map(|m| p.families_of(m))
            .unwrap_or_default();
        let got: Vec<&str> = p
            .matching_rules(&a)
            .into_iter()
            .map(|i| p.rules()[i].id.as_str())
            .collect();
        assert_eq!(&got, expected, "{pairs:?}");
    }
}

#[test]
fn per_splits_counters_by_attribute_values() {
    let yaml = "
rules:
  - id: per-team
    per: [team]
    limit: { requests: 2, window: daily }
  - id: per-team-user
    per: [team, user]
    limit: { requests: 3, window: daily }
";
    let (gate, _) = memory_gate(yaml, at(2026, 11, 21, 12, 0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let check = |pairs: &'static [(&'static str, &'static str)]| gate.check(input(pairs));
        // Each team has its own two requests.
        assert_eq!(
            check(&[("team", "a"), ("user", "u1")])
                .await
                .unwrap()
                .verdict,
            Verdict::Allow
        );
        assert_eq!(
            check(&[("team", "a"), ("user", "u2")])
                .await
                .unwrap()
                .verdict,
            Verdict::Allow
        );
        let denied = check(&[("team", "a"), ("user", "u3")]).await.unwrap();
        assert_eq!(denied.verdict, Verdict::Deny);
        assert_eq!(denied.rule.as_deref(), Some("per-team"));
        assert_eq!(denied.scope.as_deref(), Some("team=a"));
        assert_eq!(
            check(&[("team", "b"), ("user", "u1")])
                .await
                .unwrap()
                .verdict,
            Verdict::Allow
        );
        // The denial charged nothing: team b's first user still has room.
        let usage = gate
            .usage(attrs(&[("team", "a"), ("user", "u3")]), None)
            .await
            .unwrap();
        let per_user = usage.iter().find(|c| c.rule == "per-team-user").unwrap();
        assert_eq!(per_user.used.to_string(), "0");
        assert_eq!(per_user.scope, "team=a,user=u3");

        // A `per` attribute the request lacks is a specific error, not an allow.
        match check(&[("user", "u1")]).await {
            Err(GateError::Request(RequestError::MissingAttribute { rule, attr })) => {
                assert_eq!((rule.as_str(), attr.as_str()), ("per-team", "team"));
            }
            other => panic!("expected missing_attribute, got {other:?}"),
        }
        // A usage report leaves out what it cannot scope, and shows the rest.
        let partial = gate.usage(attrs(&[("team", "a")]), None).await.unwrap();
        let rules: Vec<&str> = partial.iter().map(|c| c.rule.as_str()).collect();
        assert_eq!(rules, ["per-team"]);
    });
}

#[test]
fn spend_is_charged_exactly_and_denies_with_reason_and_reset() {
    let yaml = "
pricing:
  models:
    gpt-4o: { input_per_mtok: 2.50, output_per_mtok: 10.00 }
rules:
  - id: daily-spend
    owner: ops@example.com
    match: { model: gpt-4o }
    limit: { spend: 0.03, window: daily }
";
    let now = at(2026, 11, 21, 22, 0);
    let (gate, _) = memory_gate(yaml, now);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // 1000 in + 1000 out = 0.0025 + 0.01 = 0.0125 USD each.
        let req = || CheckInput {
            attributes: attrs(&[("model", "gpt-4o")]),
            estimate: Estimate {
                input_tokens: Some(1000),
                output_tokens: Some(1000),
                ..Default::default()
            },
            ..Default::default()
        };
        let first = gate.check(req()).await.unwrap();
        assert_eq!(first.verdict, Verdict::Allow);
        assert_eq!(first.counters[0].used.to_string(), "0.0125");
        assert_eq!(first.counters[0].remaining.to_string(), "0.0175");
        assert!(first.reservation_id.is_some());
        assert_eq!(gate.check(req()).await.unwrap().verdict, Verdict::Allow);
        let denied = gate.check(req()).await.unwrap();
        assert_eq!(denied.verdict, Verdict::Deny);
        assert_eq!(denied.reason, Reason::BudgetExceeded);
        assert!(!denied.retryable);
        // Two hours to UTC midnight.
        assert_eq!(denied.retry_after, Some(7200));
        for needle in [
            "daily-spend",
            "0.03 USD",
            "scope all",
            "0.025 used",
            "2026-11-22T00:00:00Z",
        ] {
            assert!(
                denied.message.contains(needle),
                "{needle:?} not in {}",
                denied.message
            );
        }
    });
}

#[test]
fn settle_trues_up_once_and_releases_concurrency() {
    let yaml = "
pricing:
  models:
    gpt-4o: { input_per_mtok: 2.50, output_per_mtok: 10.00 }
rules:
  - id: spend
    match: { model: gpt-4o }
    limit: { spend: 1, window: daily }
  - id: in-flight
    limit: { concurrent: 1 }
";
    let (gate, _) = memory_gate(yaml, at(2026, 11, 21, 12, 0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let req = || CheckInput {
            attributes: attrs(&[("model", "gpt-4o")]),
            estimate: Estimate {
                input_tokens: Some(10_000),
                output_tokens: Some(10_000),
                ..Default::default()
            },
            ..Default::default()
        };
        let first = gate.check(req()).await.unwrap();
        assert_eq!(first.verdict, Verdict::Allow);
        let busy = gate.check(req()).await.unwrap();
        assert_eq!(busy.verdict, Verdict::Deny);
        assert_eq!(busy.reason, Reason::ConcurrencyLimit);
        assert!(busy.retryable);
        assert_eq!(busy.retry_after, Some(1));

        let id = first.reservation_id.unwrap();
        let actual = ActualUsage {
            input_tokens: 1000,
            output_tokens: 100,
            ..Default::default()
        };
        assert_eq!(
            gate.settle(&id, &actual).await.unwrap(),
            SettleOutcome::Settled
        );
        assert_eq!(
            gate.settle(&id, &actual).await.unwrap(),
            SettleOutcome::AlreadySettled
        );
        let usage = gate
            .usage(attrs(&[("model", "gpt-4o")]), None)
            .await
            .unwrap();
        let spend = usage.iter().find(|c| c.rule == "spend").unwrap();
        // 1000 * 2.5e-6 + 100 * 1e-5 = 0.0035, replacing the 0.125 estimate.
        assert_eq!(spend.used.to_string(), "0.0035");
        let slots = usage.iter().find(|c| c.rule == "in-flight").unwrap();
        assert_eq!(slots.used.to_string(), "0");
        assert_eq!(gate.check(req()).await.unwrap().verdict, Verdict::Allow);

        assert!(matches!(
            gate.settle("no-such-reservation", &actual).await,
            Err(GateError::UnknownReservation(_))
        ));
    });
}

/// Settle prices the model the response names. A dated snapshot of the
/// model decided on (`gpt-4o-2024-08-06` for `gpt-4o`) is that model, at
/// its price, even with a catch-all price beside it; another priced model
/// is charged as itself.
#[test]
fn settle_prices_the_served_model_and_a_snapshot_as_the_one_decided() {
    let yaml = "
pricing:
  models:
    gpt-4o: { input_per_mtok: 2.50, output_per_mtok: 10.00 }
    gpt-4o-mini: { input_per_mtok: 0.15, output_per_mtok: 0.60 }
    '*': { input_per_mtok: 100, output_per_mtok: 100 }
rules:
  - id: spend
    limit: { spend: 100, window: daily }
";
    let (gate, _) = memory_gate(yaml, at(2026, 11, 21, 12, 0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let policy = gate.policy();
        let actual = ActualUsage {
            input_tokens: 1000,
            output_tokens: 100,
            ..Default::default()
        };
        let mut spent = Vec::new();
        for served in [None, Some("gpt-4o-2024-08-06"), Some("gpt-4o-mini")] {
            let before = gate
                .usage(attrs(&[("model", "gpt-4o")]), None)
                .await
                .unwrap()[0]
                .used;
            let decision = gate
                .check(CheckInput {
                    attributes: attrs(&[("model", "gpt-4o")]),
                    estimate: Estimate {
                        input_tokens: Some(1000),
                        output_tokens: Some(100),
                        ..Default::default()
                    },
                    ..Default::default()
                })
                .await
                .unwrap();
            let id = decision.reservation_id.unwrap();
            gate.settle_on(&policy, &id, &actual, served).await.unwrap();
            let after = gate
                .usage(attrs(&[("model", "gpt-4o")]), None)
                .await
                .unwrap()[0]
                .used;
            spent.push((after - before).to_string());
        }
        // 1000 * 2.5e-6 + 100 * 1e-5 for gpt-4o, whichever name it is
        // served under; 1000 * 1.5e-7 + 100 * 6e-7 for gpt-4o-mini.
        assert_eq!(spent, ["0.0035", "0.0035", "0.00021"]);
    });
}

#[test]
fn unsettled_reservations_expire_keeping_the_estimate_and_freeing_slots() {
    let yaml = "
rules:
  - id: tokens
    limit: { tokens: 100000, window: daily }
  - id: in-flight
    limit: { concurrent: 1 }
";
    let (gate, clock) = memory_gate(yaml, at(2026, 11, 21, 12, 0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let req = || CheckInput {
            attributes: attrs(&[("team", "t")]),
            estimate: Estimate {
                input_tokens: Some(500),
                output_tokens: Some(500),
                ..Default::default()
            },
            ..Default::default()
        };
        let first = gate.check(req()).await.unwrap();
        assert_eq!(first.verdict, Verdict::Allow);
        assert_eq!(
            gate.check(req()).await.unwrap().reason,
            Reason::ConcurrencyLimit
        );
        // Default reservation lifetime is ten minutes.
        clock.advance(10 * 60_000 + 1_000);
        let after = gate.check(req()).await.unwrap();
        assert_eq!(after.verdict, Verdict::Allow, "{}", after.message);
        let tokens = after.counters.iter().find(|c| c.rule == "tokens").unwrap();
        assert_eq!(
            tokens.used.to_string(),
            "2000",
            "the expired estimate stays charged"
        );
        assert!(matches!(
            gate.settle(
                first.reservation_id.as_deref().unwrap(),
                &ActualUsage::default()
            )
            .await,
            Err(GateError::UnknownReservation(_))
        ));
    });
}

#[test]
fn downgrade_moves_to_the_cheaper_model_when_the_premium_cap_is_reached() {
    let yaml = "
pricing:
  models:
    gpt-5: { input_per_mtok: 1.25, output_per_mtok: 10.00 }
    gpt-4o-mini: { input_per_mtok: 0.15, output_per_mtok: 0.60 }
  families:
    premium: [\"gpt-5*\"]
rules:
  - id: premium
    match: { model_family: premium }
    limit: { requests: 1, window: daily }
    on_exceed: { downgrade: gpt-4o-mini }
  - id: mini
    match: { model: gpt-4o-mini }
    limit: { requests: 1, window: daily }
";
    let (gate, _) = memory_gate(yaml, at(2026, 11, 21, 12, 0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let req = || input(&[("model", "gpt-5")]);
        assert_eq!(gate.check(req()).await.unwrap().verdict, Verdict::Allow);
        let second = gate.check(req()).await.unwrap();
        assert_eq!(second.verdict, Verdict::Downgrade, "{}", second.message);
        assert_eq!(second.model.as_deref(), Some("gpt-4o-mini"));
        // The downgrade is charged to the cheaper model's rules.
        let third = gate.check(req()).await.unwrap();
        assert_eq!(third.verdict, Verdict::Deny);
        assert_eq!(third.rule.as_deref(), Some("mini"));
    });
}

#[test]
fn approval_gates_and_soft_rules() {
    let yaml = "
rules:
  - id: backfills
    owner: data-lead@example.com
    match: { workflow: backfill }
    limit: { requests: 1000, window: daily }
    enforcement: approval
  - id: soft-watch
    limit: { requests: 1, window: daily }
    enforcement: soft
    alerts: [50, 100, 200]
  - id: renders
    owner: art@example.com
    match: { workflow: render }
    limit: { requests: 1, window: daily }
    on_exceed: approval
";
    let (gate, _) = memory_gate(yaml, at(2026, 11, 21, 12, 0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let gated = gate
            .check(input(&[("workflow", "backfill")]))
            .await
            .unwrap();
        assert_eq!(gated.verdict, Verdict::Deny);
        assert_eq!(gated.reason, Reason::ApprovalRequired);
        assert!(
            gated.message.contains("data-lead@example.com"),
            "{}",
            gated.message
        );

        // A soft rule counts past its limit and reports the thresholds crossed.
        let first = gate.check(input(&[("team", "t")])).await.unwrap();
        assert_eq!(first.verdict, Verdict::Allow);
        let crossed: Vec<u32> = first.alerts.iter().map(|a| a.threshold).collect();
        assert_eq!(crossed, vec![50, 100]);
        let second = gate.check(input(&[("team", "t")])).await.unwrap();
        assert_eq!(second.verdict, Verdict::Allow);
        assert_eq!(
            second
                .alerts
                .iter()
                .map(|a| a.threshold)
                .collect::<Vec<_>>(),
            vec![200]
        );
        assert!(gate
            .check(input(&[("team", "t")]))
            .await
            .unwrap()
            .alerts
            .is_empty());

        assert_eq!(
            gate.check(input(&[("workflow", "render")]))
                .await
                .unwrap()
                .verdict,
            Verdict::Allow
        );
        let over = gate.check(input(&[("workflow", "render")])).await.unwrap();
        assert_eq!(over.reason, Reason::ApprovalRequired);
        assert!(!over.retryable);
        assert!(
            over.message
                .contains("ask art@example.com to approve it (tollgate approve --rule"),
            "{}",
            over.message
        );
    });
}

#[test]
fn daily_window_rolls_over_at_utc_midnight_with_an_injected_clock() {
    let yaml = "
rules:
  - id: daily
    match: { workflow: w }
    limit: { requests: 1, window: daily }
  - id: rolling
    match: { team: t }
    limit: { requests: 1, window: 30m }
";
    let (gate, clock) = memory_gate(yaml, at(2026, 11, 21, 23, 59));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let w = || input(&[("workflow", "w")]);
        assert_eq!(gate.check(w()).await.unwrap().verdict, Verdict::Allow);
        assert_eq!(gate.check(w()).await.unwrap().verdict, Verdict::Deny);
        clock.set(at(2026, 11, 22, 0, 0) - 1);
        assert_eq!(gate.check(w()).await.unwrap().verdict, Verdict::Deny);
        clock.set(at(2026, 11, 22, 0, 0));
        assert_eq!(gate.check(w()).await.unwrap().verdict, Verdict::Allow);

        // Rolling windows start at first use.
        clock.set(at(2026, 11, 23, 10, 0));
        assert_eq!(
            gate.check(input(&[("team", "t")])).await.unwrap().verdict,
            Verdict::Allow
        );
        clock.set(at(2026, 11, 23, 10, 20));
        let denied = gate.check(input(&[("team", "t")])).await.unwrap();
        assert_eq!(denied.rule.as_deref(), Some("rolling"));
        assert_eq!(denied.retry_after, Some(600));
        clock.set(at(2026, 11, 23, 10, 30));
        assert_eq!(
            gate.check(input(&[("team", "t")])).await.unwrap().verdict,
            Verdict::Allow
        );
    });
}

#[test]
fn registered_keys_are_resolved_by_hash_and_unknown_keys_by_hash_prefix() {
    let yaml = "
attributes:
  unknown_keys: allow
keys:
  - id: checkout-prod
    sha256: \"74c8b108068d5afd4a40bef2782d1ec6a90b0cde13b56d932971801f8b1e4262\"
    team: growth
    environment: production
rules:
  - id: per-key
    per: [key]
    match: { environment: production }
    limit: { requests: 1, window: daily }
  - id: any-key
    per: [key]
    limit: { requests: 5, window: daily }
";
    let (gate, _) = memory_gate(yaml, at(2026, 11, 21, 12, 0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let with_key = |k: &str| CheckInput {
            api_key: Some(k.to_string()),
            ..Default::default()
        };
        let known = gate
            .check(with_key("sk-example-checkout-prod"))
            .await
            .unwrap();
        assert_eq!(known.verdict, Verdict::Allow);
        assert!(known
            .counters
            .iter()
            .any(|c| c.scope == "key=checkout-prod"));
        let denied = gate
            .check(with_key("sk-example-checkout-prod"))
            .await
            .unwrap();
        assert_eq!(denied.scope.as_deref(), Some("key=checkout-prod"));

        let unknown = gate
            .check(with_key("sk-not-registered-secret"))
            .await
            .unwrap();
        let scope = &unknown.counters[0].scope;
        assert!(scope.starts_with("key=sha256:"), "{scope}");
        assert!(!format!("{unknown:?}").contains("sk-not-registered-secret"));
    });
}

#[test]
fn bad_estimates_are_refused_with_specific_errors() {
    let p = MATRIX;
    let (gate, _) = memory_gate(p, at(2026, 11, 21, 12, 0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let absurd = CheckInput {
            estimate: Estimate {
                output_tokens: Some(u64::MAX),
                ..Default::default()
            },
            ..Default::default()
        };
        let err = gate.check(absurd).await.unwrap_err();
        assert!(err.to_string().contains("output_tokens"), "{err}");

        let huge = Attributes {
            team: Some("x".repeat(2_000_000)),
            ..Default::default()
        };
        let err = gate
            .check(CheckInput {
                attributes: huge,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("`team` is 2000000 bytes"), "{err}");

        let mut labels = BTreeMap::new();
        for i in 0..40 {
            labels.insert(format!("l{i}"), "v".to_string());
        }
        let err = gate
            .check(CheckInput {
                attributes: Attributes {
                    labels,
                    ..Default::default()
                },
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("40 labels"), "{err}");
    });
}

#[test]
fn unpriced_models_under_a_spend_rule_are_refused_not_free() {
    let yaml = "
pricing:
  unpriced_models: reject
  models:
    gpt-4o: { input_per_mtok: 2.50, output_per_mtok: 10.00 }
rules:
  - id: spend
    limit: { spend: 10, window: daily }
";
    let (gate, _) = memory_gate(yaml, at(2026, 11, 21, 12, 0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let err = gate
            .check(input(&[("model", "mystery-9")]))
            .await
            .unwrap_err();
        assert!(
            matches!(err, GateError::Request(RequestError::Unpriced { .. })),
            "{err:?}"
        );
        assert!(err.to_string().contains("mystery-9"));
        let err = gate.check(input(&[("team", "t")])).await.unwrap_err();
        assert!(err.to_string().contains("names no model"), "{err}");
    });
}

#[test]
fn the_most_specific_glob_price_wins_wherever_it_is_written() {
    let p = policy(
        "
pricing:
  models:
    \"*\": { per_request: 1 }
    \"gpt-4o*\": { per_request: 2 }
    gpt-4o-mini: { per_request: 3 }
",
    );
    let price = |m: &str| {
        p.price(m)
            .and_then(|p| p.per_request)
            .map(|d| d.to_string())
    };
    assert_eq!(price("gpt-4o-mini").as_deref(), Some("3"));
    assert_eq!(price("gpt-4o-2024").as_deref(), Some("2"));
    assert_eq!(price("llama").as_deref(), Some("1"));
}

#[test]
fn a_downgrade_target_behind_an_approval_gate_is_not_taken() {
    let yaml = "
rules:
  - id: premium
    match: { model: big }
    limit: { requests: 1, window: daily }
    on_exceed: { downgrade: small }
  - id: small-needs-approval
    match: { model: small }
    limit: { requests: 100, window: daily }
    enforcement: approval
";
    let (gate, _) = memory_gate(yaml, at(2026, 11, 21, 12, 0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Within budget, the gated downgrade target does not matter.
        assert_eq!(
            gate.check(input(&[("model", "big")]))
                .await
                .unwrap()
                .verdict,
            Verdict::Allow
        );
        // Over budget, the way out is shut until someone approves it.
        let over = gate.check(input(&[("model", "big")])).await.unwrap();
        assert_eq!(over.verdict, Verdict::Deny);
        assert_eq!(over.reason, Reason::ApprovalRequired);
        assert_eq!(over.rule.as_deref(), Some("small-needs-approval"));

        gate.approve(GrantRequest {
            rule: "small-needs-approval".to_string(),
            scope: "all".to_string(),
            extra: None,
            duration: std::time::Duration::from_secs(3600),
            approver: "ana".to_string(),
            reason: "spike".to_string(),
        })
        .await
        .unwrap();
        let approved = gate.check(input(&[("model", "big")])).await.unwrap();
        assert_eq!(approved.verdict, Verdict::Downgrade);
        assert_eq!(approved.model.as_deref(), Some("small"));
    });
}

fn grant_request(rule: &str, scope: &str, extra: Option<&str>, secs: u64) -> GrantRequest {
    GrantRequest {
        rule: rule.to_string(),
        scope: scope.to_string(),
        extra: extra.map(|e| e.parse().unwrap()),
        duration: std::time::Duration::from_secs(secs),
        approver: "ana@example.com".to_string(),
        reason: "launch week".to_string(),
    }
}

const APPROVALS: &str = "
pricing:
  models:
    \"*\": { per_image: 0.04 }
rules:
  - id: production-fine-tuning
    owner: ml-platform@example.com
    match: { workflow: fine-tune }
    per: [team]
    limit: { requests: 2, window: daily }
    enforcement: approval
  - id: final-renders
    owner: creative@example.com
    match: { labels.stage: final }
    per: [team]
    limit: { spend: 0.08, window: daily }
    on_exceed: approval
";

#[test]
fn an_approval_gate_opens_for_its_scope_only_and_for_as_long_as_granted() {
    let (gate, clock) = memory_gate(APPROVALS, at(2026, 11, 21, 12, 0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let tune = |team: &str| input(&[("workflow", "fine-tune"), ("team", team)]);
        let shut = gate.check(tune("growth")).await.unwrap();
        assert_eq!(shut.reason, Reason::ApprovalRequired);
        assert!(!shut.retryable);
        assert!(
            shut.message.contains("ask ml-platform@example.com")
                && shut
                    .message
                    .contains("--rule production-fine-tuning --scope team=growth"),
            "{}",
            shut.message
        );

        let grant = gate
            .approve(grant_request(
                "production-fine-tuning",
                "team=growth",
                None,
                3600,
            ))
            .await
            .unwrap();
        assert_eq!(grant.scope, "team=growth");
        assert_eq!(
            gate.check(tune("growth")).await.unwrap().verdict,
            Verdict::Allow
        );
        // Another team is still shut out.
        assert_eq!(
            gate.check(tune("search")).await.unwrap().reason,
            Reason::ApprovalRequired
        );
        // Open, the rule counts like a cap: two a day.
        assert_eq!(
            gate.check(tune("growth")).await.unwrap().verdict,
            Verdict::Allow
        );
        let used_up = gate.check(tune("growth")).await.unwrap();
        assert_eq!(used_up.reason, Reason::ApprovalRequired);
        assert!(used_up.message.contains("used up"), "{}", used_up.message);

        // An expired grant opens nothing.
        clock.advance(3_600_001);
        gate.approve(grant_request(
            "production-fine-tuning",
            "team=search",
            None,
            60,
        ))
        .await
        .unwrap();
        assert_eq!(
            gate.check(tune("search")).await.unwrap().verdict,
            Verdict::Allow
        );
        clock.advance(60_001);
        assert_eq!(
            gate.check(tune("search")).await.unwrap().reason,
            Reason::ApprovalRequired
        );
        assert!(gate.approvals().await.unwrap().is_empty());

        // The audit trail has both approvals, oldest first, with who and why.
        let log = gate.approvals_log(10).await.unwrap();
        assert_eq!(log.len(), 2);
        let first: serde_json::Value = serde_json::from_str(&log[0]).unwrap();
        assert_eq!(first["action"], "approve");
        assert_eq!(first["by"], "ana@example.com");
        assert_eq!(first["grant"]["scope"], "team=growth");
        // Amounts and times read as the admin API gives them.
        assert_eq!(first["grant"]["extra"], "0");
        assert_eq!(first["grant"]["expires_at"], "2026-11-21T13:00:00Z");
    });
}

#[test]
fn an_extension_adds_its_extra_once_then_the_cap_holds_again_and_revoke_ends_it() {
    let (gate, _) = memory_gate(APPROVALS, at(2026, 11, 21, 12, 0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let render = || {
            let mut i = input(&[
                ("labels.stage", "final"),
                ("team", "art"),
                ("modality", "image"),
                ("model", "img-1"),
            ]);
            i.estimate.images = Some(1);
            i
        };
        for _ in 0..2 {
            assert_eq!(gate.check(render()).await.unwrap().verdict, Verdict::Allow);
        }
        let capped = gate.check(render()).await.unwrap();
        assert_eq!(capped.reason, Reason::ApprovalRequired);
        assert!(
            capped.message.contains("ask creative@example.com"),
            "{}",
            capped.message
        );

        // A cap's approval must add something.
        let err = gate
            .approve(grant_request("final-renders", "team=art", None, 3600))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("extra"), "{err}");
        // 0.12 USD more: exactly three more renders at 0.04.
        gate.approve(grant_request(
            "final-renders",
            "team=art",
            Some("0.12"),
            3600,
        ))
        .await
        .unwrap();
        let usage = gate.usage(render().attributes, None).await.unwrap();
        assert_eq!(
            usage[0].limit.to_string(),
            "0.2",
            "usage shows the extension"
        );
        for _ in 0..3 {
            let d = gate.check(render()).await.unwrap();
            assert_eq!(d.verdict, Verdict::Allow);
            assert_eq!(d.counters[0].limit.to_string(), "0.2");
        }
        assert_eq!(
            gate.check(render()).await.unwrap().reason,
            Reason::ApprovalRequired
        );

        // Revoked, the cap is back to 0.08, already passed.
        gate.approve(grant_request("final-renders", "team=art", Some("1"), 3600))
            .await
            .unwrap();
        assert_eq!(gate.check(render()).await.unwrap().verdict, Verdict::Allow);
        let revoked = gate
            .revoke("final-renders", "team=art", "ana@example.com", "over")
            .await
            .unwrap();
        assert_eq!(revoked.rule, "final-renders");
        assert_eq!(
            gate.check(render()).await.unwrap().reason,
            Reason::ApprovalRequired
        );
        let again = gate
            .revoke("final-renders", "team=art", "ana@example.com", "over")
            .await
            .unwrap_err();
        assert!(matches!(again, GateError::NoGrant { .. }), "{again}");
    });
}

#[test]
fn approvals_name_a_real_rule_and_scope_and_say_who_and_why() {
    let (gate, _) = memory_gate(APPROVALS, at(2026, 11, 21, 12, 0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let cases = [
            (grant_request("nope", "team=a", None, 60), "no rule `nope`"),
            (
                grant_request("production-fine-tuning", "all", None, 60),
                "give team=VALUE",
            ),
            (
                grant_request("production-fine-tuning", "customer=x", None, 60),
                "not counted per customer",
            ),
            (
                grant_request("production-fine-tuning", "team=a", Some("-1"), 60),
                "negative",
            ),
            (
                grant_request("production-fine-tuning", "team=a", None, 0),
                "1 second to 366 days",
            ),
            (
                GrantRequest {
                    reason: " ".to_string(),
                    ..grant_request("production-fine-tuning", "team=a", None, 60)
                },
                "reason must be given",
            ),
        ];
        for (request, expected) in cases {
            let err = gate.approve(request).await.unwrap_err();
            assert!(
                err.to_string().contains(expected),
                "{err} lacks {expected:?}"
            );
        }
        assert!(gate.approvals().await.unwrap().is_empty());
        assert!(gate.approvals_log(10).await.unwrap().is_empty());
    });
}

const RETRY_BUDGETS: &str = "
pricing:
  models:
    \"*\": { per_request: 1 }
rules:
  - id: attempts-per-action
    match: { action: \"*\" }
    per: [action]
    limit: { requests: 2, window: 1h }
  - id: primary-spend
    match: { attempt_kind: primary }
    limit: { spend: 3, window: daily }
  - id: fallback-spend
    match: { attempt_kind: fallback }
    limit: { spend: 2, window: daily }
";

#[test]
fn the_third_attempt_of_an_action_is_denied_for_good() {
    let (gate, _) = memory_gate(RETRY_BUDGETS, at(2026, 11, 21, 12, 0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let attempt =
            |kind: &str| input(&[("action", "a1"), ("attempt_kind", kind), ("model", "m")]);
        assert_eq!(
            gate.check(attempt("primary")).await.unwrap().verdict,
            Verdict::Allow
        );
        assert_eq!(
            gate.check(attempt("retry")).await.unwrap().verdict,
            Verdict::Allow
        );
        let third = gate.check(attempt("retry")).await.unwrap();
        assert_eq!(third.verdict, Verdict::Deny);
        assert_eq!(third.rule.as_deref(), Some("attempts-per-action"));
        assert_eq!(third.reason, Reason::BudgetExceeded);
        assert!(!third.retryable);
        // Another action has its own budget.
        let other = input(&[
            ("action", "a2"),
            ("attempt_kind", "primary"),
            ("model", "m"),
        ]);
        assert_eq!(gate.check(other).await.unwrap().verdict, Verdict::Allow);
    });
}

#[test]
fn the_fallback_cap_is_independent_of_the_primary_cap() {
    let (gate, _) = memory_gate(RETRY_BUDGETS, at(2026, 11, 21, 12, 0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let attempt = |action: String, kind: &str| {
            input(&[
                ("action", action.as_str()),
                ("attempt_kind", kind),
                ("model", "m"),
            ])
        };
        for i in 0..3 {
            let d = gate
                .check(attempt(format!("p{i}"), "primary"))
                .await
                .unwrap();
            assert_eq!(d.verdict, Verdict::Allow);
        }
        let primary_spent = gate.check(attempt("p3".into(), "primary")).await.unwrap();
        assert_eq!(primary_spent.rule.as_deref(), Some("primary-spend"));
        // Fallbacks still have their own 2 USD, and only those.
        for i in 0..2 {
            let d = gate
                .check(attempt(format!("f{i}"), "fallback"))
                .await
                .unwrap();
            assert_eq!(d.verdict, Verdict::Allow);
        }
        let fallback_spent = gate.check(attempt("f2".into(), "fallback")).await.unwrap();
        assert_eq!(fallback_spent.verdict, Verdict::Deny);
        assert_eq!(fallback_spent.rule.as_deref(), Some("fallback-spend"));
        assert!(!fallback_spent.retryable);
    });
}

#[test]
fn a_request_without_an_action_gets_a_fresh_one_its_retries_can_share() {
    let clock = Arc::new(tollgate_core::gate::ManualClock::new(at(
        2026, 11, 21, 12, 0,
    )));
    let store = Arc::new(tollgate_core::store::MemoryStore::default());
    let gate = common::gate_with(policy(RETRY_BUDGETS), store.clone(), clock);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut ids = Vec::new();
        for _ in 0..5 {
            let d = gate.check(input(&[("team", "t")])).await.unwrap();
            assert_eq!(d.verdict, Verdict::Allow);
            ids.push(d.action_id.expect("a fresh action id"));
        }
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 5, "every request is its own action");
        assert_eq!(store.counter_count(), 5, "one attempt counted per action");
        // Sending the id back makes the retry share the action's budget:
        // the first attempt already counted.
        let retry = |id: &str| input(&[("action", id), ("attempt_kind", "retry")]);
        let second = gate.check(retry(&ids[0])).await.unwrap();
        assert_eq!(second.verdict, Verdict::Allow);
        assert_eq!(second.action_id, None, "a given action id is kept");
        assert_eq!(
            gate.check(retry(&ids[0])).await.unwrap().verdict,
            Verdict::Deny
        );
    });
}

#[test]
fn a_request_id_replays_only_the_same_request() {
    let clock = Arc::new(tollgate_core::gate::ManualClock::new(at(
        2026, 11, 21, 12, 0,
    )));
    let store = Arc::new(tollgate_core::store::MemoryStore::default());
    let gate = common::gate_with(policy(RETRY_BUDGETS), store.clone(), clock);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let with_id = |team: &str| CheckInput {
            request_id: Some("req-1".to_string()),
            ..input(&[("team", team), ("model", "m")])
        };
        let first = gate.check(with_id("a")).await.unwrap();
        let again = gate.check(with_id("a")).await.unwrap();
        assert_eq!(again.reservation_id, first.reservation_id);
        assert_eq!(
            again.action_id, first.action_id,
            "a replay keeps its action id"
        );
        assert_eq!(store.counter_count(), 1, "the replay charged nothing");

        // The same id on another request is not that request's replay: it
        // gets its own decision, reservation and action.
        let other = gate.check(with_id("b")).await.unwrap();
        assert_ne!(other.reservation_id, first.reservation_id);
        assert_ne!(other.action_id, first.action_id);
        assert_eq!(store.counter_count(), 2);
    });
}

#[test]
fn grant_scopes_are_unambiguous_and_never_hold_a_raw_key() {
    let yaml = "
pricing:
  families:
    premium: [\"gpt-5*\"]
attributes:
  unknown_keys: allow
keys:
  - id: checkout-prod
    sha256: \"74c8b108068d5afd4a40bef2782d1ec6a90b0cde13b56d932971801f8b1e4262\"
rules:
  - id: premium-gate
    match: { model_family: premium }
    per: [model_family]
    limit: { requests: 10, window: daily }
    enforcement: approval
  - id: key-gate
    match: { workflow: backfill }
    per: [key, team]
    limit: { requests: 10, window: daily }
    enforcement: approval
";
    let (gate, _) = memory_gate(yaml, at(2026, 11, 21, 12, 0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // A rule counted per model family takes a family scope.
        assert_eq!(
            gate.check(input(&[("model", "gpt-5")]))
                .await
                .unwrap()
                .reason,
            Reason::ApprovalRequired
        );
        gate.approve(grant_request(
            "premium-gate",
            "model_family=premium",
            None,
            60,
        ))
        .await
        .unwrap();
        assert_eq!(
            gate.check(input(&[("model", "gpt-5")]))
                .await
                .unwrap()
                .verdict,
            Verdict::Allow
        );

        let cases = [
            ("key=checkout-prod,team=a,team=b", "given twice"),
            ("key=checkout-prod,team=a=b", "hold no `=`"),
            (
                "key=sk-example-checkout-prod,team=a",
                "that is a raw API key",
            ),
            ("key=nobody,team=a", "neither a registry id"),
        ];
        for (scope, expected) in cases {
            let err = gate
                .approve(grant_request("key-gate", scope, None, 60))
                .await
                .unwrap_err();
            assert!(err.to_string().contains(expected), "{scope}: {err}");
            assert!(
                !err.to_string().contains("sk-example"),
                "a raw key is never echoed: {err}"
            );
        }
        assert_eq!(gate.approvals().await.unwrap().len(), 1);
        // A registry id works, and so does the hash form of an unknown key.
        gate.approve(grant_request(
            "key-gate",
            "key=checkout-prod,team=a",
            None,
            60,
        ))
        .await
        .unwrap();
        let unknown = gate
            .check(CheckInput {
                api_key: Some("sk-unregistered".to_string()),
                ..input(&[("workflow", "backfill"), ("team", "a")])
            })
            .await
            .unwrap();
        let scope = unknown.scope.clone().unwrap();
        assert!(scope.starts_with("key=sha256:"), "{scope}");
        gate.approve(grant_request("key-gate", &scope, None, 60))
            .await
            .unwrap();
        let allowed = gate
            .check(CheckInput {
                api_key: Some("sk-unregistered".to_string()),
                ..input(&[("workflow", "backfill"), ("team", "a")])
            })
            .await
            .unwrap();
        assert_eq!(allowed.verdict, Verdict::Allow);
    });
}

const TRUST: &str = "
keys:
  - id: checkout-prod
    sha256: \"74c8b108068d5afd4a40bef2782d1ec6a90b0cde13b56d932971801f8b1e4262\"
    team: growth
    environment: production
rules:
  - id: prod-key
    match: { environment: production }
    per: [key]
    limit: { requests: 2, window: daily }
";

/// The route beats the registry, which beats the client: a production key
/// that claims to be staging is still counted as production.
#[test]
fn client_attributes_never_override_the_registry_or_the_route() {
    use tollgate_core::engine::request::Source;
    let policy = common::policy(TRUST);
    let claim = |pairs: &[(&str, &str)]| CheckInput {
        api_key: Some("sk-example-checkout-prod".to_string()),
        client_attributes: attrs(pairs),
        ..Default::default()
    };
    let r = tollgate_core::gate::resolve(
        &policy,
        &claim(&[
            ("environment", "staging"),
            ("team", "data"),
            ("workflow", "w"),
        ]),
    );
    assert_eq!(r.attributes.environment.as_deref(), Some("production"));
    assert_eq!(r.attributes.team.as_deref(), Some("growth"));
    // What the route and the registry leave empty, the client fills.
    assert_eq!(r.attributes.workflow.as_deref(), Some("w"));
    let source = |a: Attr| r.sources.iter().find(|(x, _)| *x == a).map(|(_, s)| *s);
    assert_eq!(source(Attr::Environment), Some(Source::Registry));
    assert_eq!(source(Attr::Key), Some(Source::Registry));
    assert_eq!(source(Attr::Workflow), Some(Source::Client));

    // The route wins over the registry.
    let routed = CheckInput {
        attributes: attrs(&[("environment", "canary")]),
        ..claim(&[("environment", "staging")])
    };
    let r = tollgate_core::gate::resolve(&policy, &routed);
    assert_eq!(r.attributes.environment.as_deref(), Some("canary"));
    assert_eq!(
        r.sources.iter().find(|(a, _)| *a == Attr::Environment),
        Some(&(Attr::Environment, Source::Route))
    );

    let (gate, _) = memory_gate(TRUST, at(2026, 11, 21, 12, 0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for claimed in ["staging", "development"] {
            let d = gate
                .check(claim(&[("environment", claimed), ("team", "data")]))
                .await
                .unwrap();
            assert_eq!(d.verdict, Verdict::Allow, "{claimed}");
        }
        let d = gate
            .check(claim(&[("environment", "staging")]))
            .await
            .unwrap();
        assert_eq!(d.verdict, Verdict::Deny);
        assert_eq!(d.rule.as_deref(), Some("prod-key"));
    });
}

#[test]
fn unknown_keys_are_denied_once_a_registry_exists_and_allowed_without_one() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let stranger = || CheckInput {
            api_key: Some("sk-random-0123".to_string()),
            attributes: attrs(&[("environment", "production")]),
            ..Default::default()
        };
        let (gate, _) = memory_gate(TRUST, at(2026, 11, 21, 12, 0));
        let d = gate.check(stranger()).await.unwrap();
        assert_eq!(d.reason, Reason::UnknownKey);

        let open = format!("attributes:\n  unknown_keys: allow\n{TRUST}");
        let (gate, _) = memory_gate(&open, at(2026, 11, 21, 12, 0));
        assert_eq!(
            gate.check(stranger()).await.unwrap().verdict,
            Verdict::Allow
        );

        let no_registry =
            "rules:\n  - id: per-key\n    per: [key]\n    limit: { requests: 5, window: daily }\n";
        let (gate, _) = memory_gate(no_registry, at(2026, 11, 21, 12, 0));
        assert_eq!(
            gate.check(stranger()).await.unwrap().verdict,
            Verdict::Allow
        );
    });
}

/// A flood of random unregistered keys cannot fill the embedded store:
/// past `max_unknown_keys` they share one bucket, and registered keys and
/// new unregistered keys alike are still decided.
#[test]
fn a_flood_of_random_keys_locks_no_one_out() {
    let yaml = "
attributes:
  unknown_keys: allow
  max_unknown_keys: 100
keys:
  - id: checkout-prod
    sha256: \"74c8b108068d5afd4a40bef2782d1ec6a90b0cde13b56d932971801f8b1e4262\"
rules:
  - id: per-key
    per: [key]
    limit: { requests: 1000000, window: daily }
";
    let clock = Arc::new(tollgate_core::gate::ManualClock::new(at(
        2026, 11, 21, 12, 0,
    )));
    // Room for far fewer counters than keys in the flood.
    let gate = common::gate_with(
        common::policy(yaml),
        Arc::new(MemoryStore::new(1000)),
        clock,
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let with_key = |k: String| CheckInput {
            api_key: Some(k),
            ..Default::default()
        };
        for i in 0..5000 {
            let d = gate
                .check(with_key(format!("sk-flood-{i}")))
                .await
                .unwrap_or_else(|e| panic!("flood key {i}: {e}"));
            assert_eq!(d.verdict, Verdict::Allow, "flood key {i}");
        }
        let d = gate
            .check(with_key("sk-example-checkout-prod".to_string()))
            .await
            .unwrap();
        assert_eq!(d.verdict, Verdict::Allow);
        assert_eq!(d.counters[0].scope, "key=checkout-prod");
        let d = gate
            .check(with_key("sk-late-newcomer".to_string()))
            .await
            .unwrap();
        assert_eq!(d.verdict, Verdict::Allow);
        assert_eq!(d.counters[0].scope, "key=sha256:shared");
    });
}

/// `x-should-retry` tells the truth: a window about to reset and a busy
/// concurrency slot are worth a retry; a long reset, a gate and a block
/// are not.
#[test]
fn retryable_only_when_waiting_and_retrying_works() {
    let yaml = "
rules:
  - id: per-minute
    match: { workflow: chat }
    limit: { requests: 1, window: minute }
  - id: daily
    match: { workflow: batch }
    limit: { requests: 1, window: daily }
  - id: slots
    match: { workflow: render }
    limit: { concurrent: 1 }
  - id: gate
    match: { workflow: backfill }
    owner: lead@example.com
    limit: { requests: 1, window: daily }
    enforcement: approval
  - id: blocked
    match: { workflow: never }
    limit: { requests: 0, window: daily }
";
    // 12:00:30: the minute resets in 30 s, the day in 12 h.
    let now = at(2026, 11, 21, 12, 0) + 30_000;
    let (gate, _) = memory_gate(yaml, now);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let twice = |workflow: &'static str| {
            let gate = &gate;
            async move {
                let _ = gate.check(input(&[("workflow", workflow)])).await.unwrap();
                gate.check(input(&[("workflow", workflow)])).await.unwrap()
            }
        };
        let d = twice("chat").await;
        assert_eq!((d.verdict, d.retryable), (Verdict::Deny, true));
        assert_eq!(d.retry_after, Some(30));
        assert_eq!(d.retry_after_ms, Some(30_000));

        let d = twice("batch").await;
        assert_eq!((d.verdict, d.retryable), (Verdict::Deny, false));
        assert_eq!(d.retry_after, Some(12 * 3600 - 30));

        let d = twice("render").await;
        assert_eq!((d.reason, d.retryable), (Reason::ConcurrencyLimit, true));
        assert_eq!(d.retry_after_ms, Some(1000));

        let d = gate
            .check(input(&[("workflow", "backfill")]))
            .await
            .unwrap();
        assert_eq!((d.reason, d.retryable), (Reason::ApprovalRequired, false));
        let d = gate.check(input(&[("workflow", "never")])).await.unwrap();
        assert_eq!((d.reason, d.retryable), (Reason::Blocked, false));
    });
}

/// Where nobody can switch the model, a downgrade is refused, naming the
/// cheaper model, and charges nothing.
#[test]
fn a_downgrade_nobody_enforces_is_refused_and_charges_nothing() {
    let yaml = "
pricing:
  models:
    gpt-5: { input_per_mtok: 1.25, output_per_mtok: 10.00 }
    gpt-4o-mini: { input_per_mtok: 0.15, output_per_mtok: 0.60 }
  families:
    premium: [\"gpt-5*\"]
rules:
  - id: premium
    match: { model_family: premium }
    limit: { requests: 1, window: daily }
    on_exceed: { downgrade: gpt-4o-mini }
  - id: all-spend
    match: { model: [gpt-5, gpt-4o-mini] }
    limit: { spend: 100, window: daily }
";
    let (gate, _) = memory_gate(yaml, at(2026, 11, 21, 12, 0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ask = |switch: bool| CheckInput {
            can_switch_model: switch,
            ..input(&[("model", "gpt-5")])
        };
        assert_eq!(
            gate.check(ask(false)).await.unwrap().verdict,
            Verdict::Allow
        );
        let spent = |d: &Decision| {
            d.counters
                .iter()
                .find(|c| c.rule == "all-spend")
                .map(|c| c.used)
        };
        let refused = gate.check(ask(false)).await.unwrap();
        assert_eq!(refused.verdict, Verdict::Deny);
        assert!(!refused.retryable);
        assert!(
            refused
                .message
                .contains("send it again with model gpt-4o-mini"),
            "{}",
            refused.message
        );
        assert!(refused.reservation_id.is_none());
        let before = spent(&refused);
        let downgraded = gate.check(ask(true)).await.unwrap();
        assert_eq!(downgraded.verdict, Verdict::Downgrade);
        assert_eq!(downgraded.model.as_deref(), Some("gpt-4o-mini"));
        // The refusal charged nothing: the spend counter moved only by
        // the downgraded call's own (cheap) estimate.
        let after = spent(&downgraded).unwrap();
        // 1,000 input and 1,000 output tokens of gpt-4o-mini.
        let cheap: rust_decimal::Decimal = "0.00075".parse().unwrap();
        assert_eq!(
            after - before.expect("the refusal reports the spend counter"),
            cheap
        );
    });
}

/// On Redis the same flood leaves a bounded number of keys behind, where
/// it used to grow by a set of counters per random key.
#[test]
fn a_flood_of_random_keys_leaves_redis_bounded() {
    let yaml = "
attributes:
  unknown_keys: allow
  max_unknown_keys: 50
rules:
  - id: per-key
    per: [key]
    limit: { requests: 1000000, window: daily }
";
    let redis = common::RedisServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let clock = Arc::new(tollgate_core::gate::ManualClock::new(at(
            2026, 11, 21, 12, 0,
        )));
        let gate = common::gate_with(common::policy(yaml), Arc::new(redis.store().await), clock);
        for i in 0..2000 {
            let d = gate
                .check(CheckInput {
                    api_key: Some(format!("sk-flood-{i}")),
                    ..Default::default()
                })
                .await
                .unwrap();
            assert_eq!(d.verdict, Verdict::Allow);
        }
    });
    let out = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "--scan",
            "--pattern",
            "*per-key*",
        ])
        .output()
        .expect("redis-cli must be installed for this test");
    let counters = String::from_utf8_lossy(&out.stdout).lines().count();
    // 50 keys apart and the shared one; before the bound, 2,000.
    assert!(
        counters > 0 && counters <= 51,
        "{counters} per-key counters"
    );
}

/// Where nothing will settle a call (ext_authz alone), the estimate is the
/// charge: the reservation is kept only moments, and a rule that needs the
/// call's end is refused with a message that says what to do.
#[test]
fn calls_nothing_settles_hold_no_reservation_and_refuse_concurrency_rules() {
    let yaml = "
rules:
  - id: daily
    match: { workflow: batch }
    limit: { requests: 10, window: daily }
  - id: in-flight
    match: { workflow: render }
    limit: { concurrent: 2 }
";
    let (gate, clock) = memory_gate(yaml, at(2026, 11, 21, 12, 0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let unsettled = |workflow: &str| CheckInput {
            estimate_is_final: true,
            ..input(&[("workflow", workflow)])
        };
        let d = gate.check(unsettled("batch")).await.unwrap();
        assert_eq!(d.verdict, Verdict::Allow);
        let id = d.reservation_id.expect("a reservation, for replays");
        clock.advance(6_000);
        let late = gate.settle(&id, &ActualUsage::default()).await;
        assert!(
            matches!(late, Err(GateError::UnknownReservation(_))),
            "the record is gone within seconds: {late:?}"
        );
        // The estimate stayed charged: one request of ten.
        let d = gate.check(unsettled("batch")).await.unwrap();
        assert_eq!(d.counters[0].used.to_string(), "2");

        let refused = gate.check(unsettled("render")).await.unwrap_err();
        let message = refused.to_string();
        assert!(
            message.contains("`in-flight`") && message.contains("ext_proc"),
            "{message}"
        );
        // The same rule works where calls are settled.
        assert_eq!(
            gate.check(input(&[("workflow", "render")]))
                .await
                .unwrap()
                .verdict,
            Verdict::Allow
        );
    });
}

const BILLING_BERLIN: &str = "
rules:
  - id: billing
    match: { workflow: w }
    limit: { requests: 1, window: monthly, timezone: Europe/Berlin, anchor: 15 }
";

#[test]
fn a_billing_month_in_berlin_resets_at_local_midnight_on_its_anchor() {
    // 23:30 on 14 December in Berlin (CET, UTC+1).
    let (gate, clock) = memory_gate(BILLING_BERLIN, at(2026, 12, 14, 22, 30));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let w = || input(&[("workflow", "w")]);
        assert_eq!(gate.check(w()).await.unwrap().verdict, Verdict::Allow);
        let denied = gate.check(w()).await.unwrap();
        assert_eq!(denied.verdict, Verdict::Deny);
        assert_eq!(denied.retry_after, Some(30 * 60));
        assert_eq!(denied.counters[0].resets_at, Some(at(2026, 12, 14, 23, 0)));
        assert!(
            denied
                .message
                .contains("resets at 2026-12-15T00:00:00+01:00"),
            "{}",
            denied.message
        );
        assert!(
            denied
                .message
                .contains("monthly (from day 15, Europe/Berlin)"),
            "{}",
            denied.message
        );
        clock.set(at(2026, 12, 14, 23, 0) - 1);
        assert_eq!(gate.check(w()).await.unwrap().verdict, Verdict::Deny);
        clock.set(at(2026, 12, 14, 23, 0));
        let next = gate.check(w()).await.unwrap();
        assert_eq!(next.verdict, Verdict::Allow);
        assert_eq!(next.counters[0].resets_at, Some(at(2027, 1, 14, 23, 0)));
    });
}

#[test]
fn a_daily_window_in_a_zone_lasts_25_hours_on_the_fall_back_day() {
    let yaml = "
rules:
  - id: daily-ny
    match: { workflow: w }
    limit: { requests: 1, window: daily, timezone: America/New_York }
";
    // 2026-11-01 in New York runs from 04:00 UTC to 05:00 UTC the next day.
    let (gate, clock) = memory_gate(yaml, at(2026, 11, 1, 4, 0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let w = || input(&[("workflow", "w")]);
        assert_eq!(gate.check(w()).await.unwrap().verdict, Verdict::Allow);
        let denied = gate.check(w()).await.unwrap();
        assert_eq!(denied.retry_after, Some(25 * 3600));
        clock.set(at(2026, 11, 2, 4, 59));
        assert_eq!(gate.check(w()).await.unwrap().verdict, Verdict::Deny);
        clock.set(at(2026, 11, 2, 5, 0));
        assert_eq!(gate.check(w()).await.unwrap().verdict, Verdict::Allow);
    });
}

#[test]
fn changing_a_windows_zone_or_anchor_starts_new_counters_and_keeps_the_old_ones() {
    let (gate, _clock) = memory_gate(BILLING_BERLIN, at(2026, 12, 20, 12, 0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let w = || input(&[("workflow", "w")]);
        assert_eq!(gate.check(w()).await.unwrap().verdict, Verdict::Allow);
        assert_eq!(gate.check(w()).await.unwrap().verdict, Verdict::Deny);
        // The same rule id in another zone, on another billing day, or as
        // a plain UTC month counts in a window of its own.
        for other in [
            "timezone: America/New_York, anchor: 15",
            "timezone: Europe/Berlin, anchor: 1",
            "timezone: Europe/Berlin, anchor: 16",
            "timezone: UTC",
            "anchor: 15",
        ] {
            let yaml = BILLING_BERLIN.replace("timezone: Europe/Berlin, anchor: 15", other);
            gate.replace_policy(policy(&yaml));
            assert_eq!(
                gate.check(w()).await.unwrap().verdict,
                Verdict::Allow,
                "{other}"
            );
            assert_eq!(
                gate.check(w()).await.unwrap().verdict,
                Verdict::Deny,
                "{other}"
            );
        }
        // Back to the first window: its count was kept.
        gate.replace_policy(policy(BILLING_BERLIN));
        assert_eq!(gate.check(w()).await.unwrap().verdict, Verdict::Deny);
    });
}

#[test]
fn utc_windows_keep_their_counter_names() {
    // `timezone: UTC` with the default anchor is the plain window: the
    // counters it already had go on counting.
    let plain = "
rules:
  - id: m
    match: { workflow: w }
    limit: { requests: 1, window: monthly }
";
    let (gate, _clock) = memory_gate(plain, at(2026, 12, 20, 12, 0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let w = || input(&[("workflow", "w")]);
        assert_eq!(gate.check(w()).await.unwrap().verdict, Verdict::Allow);
        let same = plain.replace(
            "window: monthly",
            "window: monthly, timezone: UTC, anchor: 1",
        );
        gate.replace_policy(policy(&same));
        assert_eq!(gate.check(w()).await.unwrap().verdict, Verdict::Deny);
    });
}

#[test]
fn cache_writes_reasoning_audio_batch_and_call_fees_are_charged_exactly_at_check_and_settle() {
    let yaml = "
pricing:
  models:
    claude-sonnet-4:
      input_per_mtok: 3
      cached_input_per_mtok: 0.30
      cache_write_per_mtok: 3.75
      output_per_mtok: 15
      reasoning_per_mtok: 20
      audio_input_per_mtok: 40
      batch_discount: 0.5
      long_context: { above_input_tokens: 200000, input_per_mtok: 6, output_per_mtok: 22.50 }
      per_call: { web_search: 0.01 }
rules:
  - id: spend
    match: { model: claude-sonnet-4 }
    limit: { spend: 100, window: daily }
";
    let (gate, _) = memory_gate(yaml, at(2026, 11, 21, 12, 0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut estimate = Estimate {
            input_tokens: Some(300_000),
            output_tokens: Some(1_000),
            ..Default::default()
        };
        estimate.detail.calls.insert("web_search".into(), 2);
        let checked = gate
            .check(CheckInput {
                attributes: attrs(&[("model", "claude-sonnet-4")]),
                estimate,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(checked.verdict, Verdict::Allow);
        // Long context: 300000*6e-6 + 1000*22.5e-6 + 2*0.01 = 1.8 + 0.0225 + 0.02
        assert_eq!(checked.counters[0].used.to_string(), "1.8425");

        let actual = ActualUsage {
            input_tokens: 10_000,
            cached_input_tokens: 6_000,
            cache_write_tokens: 2_000,
            audio_input_tokens: 1_000,
            output_tokens: 2_000,
            reasoning_tokens: 1_500,
            calls: [("web_search".to_string(), 1)].into(),
            batch: true,
            ..Default::default()
        };
        let id = checked.reservation_id.unwrap();
        assert_eq!(
            gate.settle(&id, &actual).await.unwrap(),
            SettleOutcome::Settled
        );
        let usage = gate
            .usage(attrs(&[("model", "claude-sonnet-4")]), None)
            .await
            .unwrap();
        // Tokens, halved for the batch: (1000*3 + 6000*0.3 + 2000*3.75
        // + 1000*40 + 500*15 + 1500*20) / 1e6 = 0.0898, so 0.0449; plus one
        // search at 0.01.
        assert_eq!(usage[0].used.to_string(), "0.0549");
    });
}

/// An attribute value with a newline or another control character is a
/// malformed request: such values would break store records and rows.
#[tokio::test]
async fn an_attribute_with_a_control_character_is_refused() {
    let (gate, _) = common::memory_gate(
        "
rules:
  - id: team-daily
    match: { team: '*' }
    per: [team]
    limit: { requests: 5, window: daily }
",
        common::at(2026, 12, 1, 12, 0),
    );
    for bad in ["gro\nwth", "a\tb", "x\u{1e}y"] {
        let result = gate
            .check(tollgate_core::gate::CheckInput {
                attributes: tollgate_core::engine::Attributes {
                    team: Some(bad.to_string()),
                    ..Default::default()
                },
                ..Default::default()
            })
            .await;
        let err = result.expect_err("refused");
        assert_eq!(err.code(), "invalid_request", "{bad:?}: {err}");
        assert!(err.to_string().contains("control character"), "{err}");
    }
}
