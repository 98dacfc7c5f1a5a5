//! Inputs the fuzz targets (fuzz/, scripts/fuzz) found to crash, each fed
//! again the way its target fed it. A copy of each input is in the
//! target's seed corpus, fuzz/corpus/<target>/regress-*.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::Authorization;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use tollgate::server::envoy::EnvoyAuthz;
use tollgate::server::http_request::{self, check_input};
use tollgate_core::gate::{Gate, GateConfig, ManualClock};
use tollgate_core::policy::{load_dirs, AttributeMapping, CompiledPolicy};
use tollgate_core::store::MemoryStore;

fn shipped() -> CompiledPolicy {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    load_dirs(&[dir]).unwrap()
}

fn gate() -> Gate {
    let config = GateConfig {
        store_timeout: Duration::from_secs(10),
        ..GateConfig::default()
    };
    Gate::new(
        shipped(),
        Arc::new(MemoryStore::new(1000)),
        Arc::new(ManualClock::new(1_773_153_000_000)),
        config,
    )
}

/// envoy_check, regress-bearer-char-boundary: an `authorization` value
/// whose 7th byte falls inside a character (`Beare` and U+FFFD, which
/// Envoy's `headers` map makes of a byte that is not UTF-8) panicked the
/// mapper while it looked for `bearer `, and a panic is an error Envoy's
/// failure mode may allow.
#[tokio::test]
async fn an_authorization_cut_inside_a_character_is_not_a_panic() {
    for value in [
        "Beare\u{fffd} sk-test-123",
        "Bearé sk-x",
        "bearer\u{e9}x",
        "\u{1f600}\u{1f600}",
    ] {
        let req = http_request::HttpRequest {
            method: "POST",
            path: "/v1/chat/completions",
            headers: vec![("authorization".to_string(), value.as_bytes().to_vec())],
            ..Default::default()
        };
        let input = check_input(&AttributeMapping::default(), &req).unwrap();
        assert_eq!(input.api_key, None, "{value:?} is no bearer token");
    }

    let mut http = HttpRequest {
        method: "POST".to_string(),
        path: "/v1/chat/completions".to_string(),
        body: r#"{"model":"gpt-4o","max_tokens":2048,"messages":[{"role":"user","content":"Lorem ipsum"#
            .to_string(),
        ..Default::default()
    };
    for (k, v) in [
        ("authorization", "Beare\u{fffd} s\u{16}k-test-123"),
        ("x-envoy-auth-partial-body", "true"),
        ("content-length", "400000"),
    ] {
        http.headers.insert(k.to_string(), v.to_string());
    }
    let check = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(http),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let authz = EnvoyAuthz::new(Arc::new(gate()));
    let response = authz
        .check(tonic::Request::new(check))
        .await
        .unwrap()
        .into_inner();
    // Not a bearer token, so no key: the shipped policies allow the call.
    assert_eq!(response.status.unwrap().code, 0);
    assert!(
        matches!(response.http_response, Some(HttpResponse::OkResponse(_))),
        "{:?}",
        response.http_response
    );
}

/// policy_limits, regress-flow-depth-255: flow collections nested past
/// 255 on one line stopped the YAML scanner ("recursion limit
/// exceeded") before the depth limit saw the 65th level, so the error
/// did not name the limit the file broke.
#[test]
fn flow_nesting_past_the_scanner_limit_names_the_depth_limit() {
    for depth in [65, 255, 256, 577, 100_000] {
        for open in ["[", "{k: "] {
            let text = format!("rules:\n  - id: r\n    match: {}x\n", open.repeat(depth));
            let files = [tollgate_core::policy::SourceFile {
                name: "p.yaml".to_string(),
                text,
            }];
            let e = tollgate_core::policy::compile_sources(&files)
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("invalid YAML: nested more than 64 levels deep; flatten the structure"),
                "{depth} x {open:?}: {e}"
            );
        }
    }
}

/// settle_form, regress-tokens-over-counter-bound: a settle reporting
/// more tokens than a counter may hold (2^52, what Lua counts exactly)
/// was charged in full; it keeps the estimate, as usage that cannot be
/// priced does.
#[tokio::test]
async fn a_settle_past_the_counter_bound_keeps_the_estimate() {
    use tollgate::server::settle::SettleForm;
    use tollgate_core::engine::charge::{counter_amount, Usage, MAX_COUNTER};
    use tollgate_core::engine::Attributes;
    use tollgate_core::gate::CheckInput;
    use tollgate_core::policy::{Attr, Unit};
    use tollgate_core::store::SettleOutcome;

    let usage = Usage {
        input_tokens: 184_467_440_737_095_616,
        ..Default::default()
    };
    for unit in [Unit::InputTokens, Unit::Tokens] {
        assert!(
            counter_amount(unit, &usage, None, None).is_err(),
            "{unit:?}"
        );
    }
    let at_bound = Usage {
        output_tokens: MAX_COUNTER as u64,
        ..Default::default()
    };
    assert_eq!(
        counter_amount(Unit::OutputTokens, &at_bound, None, None),
        Ok(MAX_COUNTER)
    );

    let gate = gate();
    let mut attributes = Attributes::default();
    for (attr, value) in [
        (Attr::Customer, "c-1"),
        (Attr::Label("plan".to_string()), "free"),
        (Attr::Environment, "staging"),
        (Attr::Model, "gpt-4o"),
    ] {
        attributes.set(&attr, value.to_string());
    }
    let input = CheckInput {
        attributes,
        ..Default::default()
    };
    let decision = gate.check(input.clone()).await.unwrap();
    let id = decision.reservation_id.clone().unwrap();
    let estimated: Vec<_> = decision.counters.iter().map(|c| c.used).collect();

    let form: SettleForm = serde_json::from_str(&format!(
        r#"{{"reservation_id":"{id}","usage":{{"input_tokens":184467440737095616}}}}"#
    ))
    .unwrap();
    let (id, actual) = form.checked().unwrap();
    assert_eq!(gate.settle(&id, &actual).await, Ok(SettleOutcome::Settled));
    let after = gate.check(input).await.unwrap();
    for (c, before) in after.counters.iter().zip(&estimated) {
        if c.unit == Unit::Tokens {
            // The estimate kept, and this request's own estimate on top.
            assert_eq!(c.used, before + before, "{c:?}");
        }
        assert!(c.used < rust_decimal::Decimal::from(MAX_COUNTER), "{c:?}");
    }
}
