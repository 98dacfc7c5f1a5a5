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
