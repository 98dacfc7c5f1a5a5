//! The Envoy ext_authz path, with requests shaped exactly as Envoy sends
//! them, from a client built on the real Envoy protos.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use tokio::net::TcpListener;
use tollgate_core::gate::{Gate, GateConfig, SystemClock};
use tollgate_core::store::MemoryStore;
use tonic::transport::Channel;

const POLICY: &str = "
pricing:
  unpriced_models: reject
  models:
    gpt-4o: { input_per_mtok: 2.50, output_per_mtok: 10.00 }
    gpt-4o-mini: { input_per_mtok: 0.15, output_per_mtok: 0.60 }
    gpt-5: { input_per_mtok: 1.25, output_per_mtok: 10.00 }
  families:
    premium: [\"gpt-5*\"]
keys:
  - id: checkout-prod
    sha256: \"74c8b108068d5afd4a40bef2782d1ec6a90b0cde13b56d932971801f8b1e4262\"
    team: growth
rules:
  - id: per-key-requests
    match: { environment: production }
    per: [key]
    limit: { requests: 3, window: daily }
  - id: agent-output
    match: { workflow: research-agent }
    limit: { output_tokens: 1000, window: daily }
  - id: premium
    match: { model_family: premium }
    limit: { requests: 1, window: daily }
    on_exceed: { downgrade: gpt-4o-mini }
  - id: approval-gate
    match: { workflow: backfill }
    owner: data-lead@example.com
    limit: { requests: 100, window: daily }
    enforcement: approval
";

async fn start(policy: &str) -> AuthorizationClient<Channel> {
    let gate = Arc::new(Gate::new(
        common::policy(policy),
        Arc::new(MemoryStore::default()),
        Arc::new(SystemClock),
        GateConfig::default(),
    ));
    let reloader = tollgate::reload::Reloader::new(gate.clone(), common::reload_config(&[]));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tollgate::server::serve_grpc(
        gate,
        reloader,
        listener,
        std::future::pending(),
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    AuthorizationClient::new(channel)
}

/// A CheckRequest as Envoy builds it: lower-cased headers including the
/// pseudo-headers, the body as raw bytes, and per-route context.
fn envoy_request(
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    context: &[(&str, &str)],
) -> CheckRequest {
    let mut all: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    all.insert(":path".to_string(), path.to_string());
    all.insert(":method".to_string(), "POST".to_string());
    all.insert(":authority".to_string(), "api.example.com".to_string());
    // Envoy's own request id is its x-request-id (set at the edge, unless
    // configured to keep the client's).
    let id = all
        .entry("x-request-id".to_string())
        .or_insert_with(|| format!("{:x}", rand_id()))
        .clone();
    common::envoy_authz::check_request(id, path, all, body, context)
}

fn rand_id() -> u128 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    u128::from(N.fetch_add(1, Ordering::Relaxed)) << 32 | u128::from(std::process::id())
}

fn header<'a>(
    headers: &'a [envoy_types::pb::envoy::config::core::v3::HeaderValueOption],
    name: &str,
) -> Option<&'a str> {
    headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .find(|h| h.key == name)
        .map(|h| h.value.as_str())
}

enum Outcome {
    Allowed {
        upstream: Vec<envoy_types::pb::envoy::config::core::v3::HeaderValueOption>,
        downstream: Vec<envoy_types::pb::envoy::config::core::v3::HeaderValueOption>,
    },
    Denied {
        status: i32,
        headers: Vec<envoy_types::pb::envoy::config::core::v3::HeaderValueOption>,
        body: serde_json::Value,
    },
}

fn outcome(r: CheckResponse) -> Outcome {
    let code = r.status.as_ref().map(|s| s.code).unwrap_or(-1);
    match r.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            assert_eq!(code, 0, "an allow carries an OK status");
            Outcome::Allowed {
                upstream: ok.headers,
                downstream: ok.response_headers_to_add,
            }
        }
        Some(HttpResponse::DeniedResponse(d)) => {
            assert_ne!(code, 0, "a denial must not carry an OK status");
            Outcome::Denied {
                status: d.status.map(|s| s.code).unwrap_or(0),
                headers: d.headers,
                body: serde_json::from_str(&d.body).unwrap(),
            }
        }
        other => panic!("unexpected response {other:?}"),
    }
}

const CHAT: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Summarise this."}],"max_tokens":200}"#;

#[tokio::test]
async fn budget_denials_carry_status_json_and_headers() {
    let mut client = start(POLICY).await;
    let prod = [("environment", "production")];
    let auth = [
        ("authorization", "Bearer sk-example-checkout-prod"),
        ("content-type", "application/json"),
    ];
    for i in 0..3 {
        let r = client
            .check(envoy_request("/v1/chat/completions", &auth, CHAT, &prod))
            .await
            .unwrap()
            .into_inner();
        match outcome(r) {
            Outcome::Allowed {
                upstream,
                downstream,
            } => {
                assert_eq!(header(&upstream, "x-tollgate-decision"), Some("allow"));
                assert_eq!(
                    header(&upstream, "x-tollgate-reservation").map(str::len),
                    Some(32)
                );
                assert_eq!(
                    header(&downstream, "x-ratelimit-remaining-requests"),
                    Some(&*(2 - i).to_string())
                );
                assert!(header(&downstream, "x-ratelimit-reset-requests")
                    .is_some_and(|v| v.ends_with('s')));
            }
            Outcome::Denied { body, .. } => panic!("request {i} denied: {body}"),
        }
    }
    let r = client
        .check(envoy_request("/v1/chat/completions", &auth, CHAT, &prod))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status.as_ref().unwrap().code,
        tonic::Code::ResourceExhausted as i32
    );
    let Outcome::Denied {
        status,
        headers,
        body,
    } = outcome(r)
    else {
        panic!("must deny")
    };
    assert_eq!(status, 429);
    assert_eq!(
        header(&headers, "x-tollgate-rule"),
        Some("per-key-requests")
    );
    assert_eq!(header(&headers, "x-tollgate-retryable"), Some("false"));
    // What every official OpenAI and Anthropic SDK obeys first: a daily
    // budget is not worth an SDK's retry.
    assert_eq!(header(&headers, "x-should-retry"), Some("false"));
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    let retry: u64 = header(&headers, "retry-after").unwrap().parse().unwrap();
    assert!(retry > 0 && retry <= 86_400);
    let message = body["error"]["message"].as_str().unwrap();
    for needle in [
        "per-key-requests",
        "key=checkout-prod",
        "3 requests",
        "resets at",
    ] {
        assert!(message.contains(needle), "{needle:?} not in {message}");
    }
    assert_eq!(body["error"]["code"], "budget_exceeded");
    assert_eq!(body["error"]["type"], "insufficient_quota");
    assert!(
        !format!("{body}").contains("sk-example-checkout-prod"),
        "the raw key never leaves"
    );
}

#[tokio::test]
async fn the_body_context_and_path_supply_model_workflow_and_estimate() {
    let mut client = start(POLICY).await;
    // The route says research-agent; the body asks for 600 output tokens
    // against a budget of 1,000.
    let ctx = [("workflow", "research-agent")];
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":600,"stream":true}"#;
    let first = client
        .check(envoy_request("/v1/chat/completions", &[], body, &ctx))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(outcome(first), Outcome::Allowed { .. }));
    let second = client
        .check(envoy_request("/v1/chat/completions", &[], body, &ctx))
        .await
        .unwrap()
        .into_inner();
    let Outcome::Denied { headers, .. } = outcome(second) else {
        panic!("600 + 600 > 1000 must deny")
    };
    assert_eq!(header(&headers, "x-tollgate-rule"), Some("agent-output"));

    // A header cannot override the route's context: the client claiming
    // another workflow is still counted as research-agent.
    let spoof = [("x-tollgate-workflow", "something-else")];
    let third = client
        .check(envoy_request("/v1/chat/completions", &spoof, body, &ctx))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(outcome(third), Outcome::Denied { .. }));

    // A partial body (Envoy cut it at its size limit) is read as far as
    // it goes: its model and output cap count, not the defaults (1,000
    // output tokens, which would not fit).
    let partial = [
        ("x-envoy-auth-partial-body", "true"),
        ("content-length", "5000000"),
    ];
    let cut = r#"{"model":"gpt-4o","max_tokens":1,"messages":[{"role":"user","content":"aaaa"#;
    let fourth = client
        .check(envoy_request("/v1/chat/completions", &partial, cut, &ctx))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(outcome(fourth), Outcome::Allowed { .. }),
        "the prefix's max_tokens, not the defaults"
    );
    let cut_large =
        r#"{"model":"gpt-4o","max_tokens":500,"messages":[{"role":"user","content":"aaaa"#;
    let fifth = client
        .check(envoy_request(
            "/v1/chat/completions",
            &partial,
            cut_large,
            &ctx,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(outcome(fifth), Outcome::Denied { .. }),
        "601 + 500 > 1000"
    );

    // Gemini names the model in the path.
    let gemini = r#"{"contents":[{"parts":[{"text":"hello"}]}]}"#;
    let r = client
        .check(envoy_request(
            "/v1beta/models/gemini-2.5-pro:generateContent",
            &[],
            gemini,
            &[],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(outcome(r), Outcome::Allowed { .. }),
        "no rule applies to it"
    );
}

#[tokio::test]
async fn downgrades_and_approval_gates() {
    let mut client = start(POLICY).await;
    let premium = r#"{"model":"gpt-5","input":"hi","max_output_tokens":10}"#;
    let first = client
        .check(envoy_request("/v1/responses", &[], premium, &[]))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(outcome(first), Outcome::Allowed { .. }));
    // ext_authz cannot rewrite the body: unless the route says its
    // upstream honours the model header, the downgrade is refused, naming
    // the cheaper model, and nothing is charged.
    let refused = client
        .check(envoy_request("/v1/responses", &[], premium, &[]))
        .await
        .unwrap()
        .into_inner();
    let Outcome::Denied {
        status,
        headers,
        body,
    } = outcome(refused)
    else {
        panic!("a downgrade nobody enforces must be refused")
    };
    assert_eq!(status, 429);
    assert_eq!(header(&headers, "x-should-retry"), Some("false"));
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("send it again with model gpt-4o-mini"),
        "{message}"
    );
    let honoured = [("downgrade", "header")];
    let second = client
        .check(envoy_request("/v1/responses", &[], premium, &honoured))
        .await
        .unwrap()
        .into_inner();
    let Outcome::Allowed { upstream, .. } = outcome(second) else {
        panic!("must downgrade")
    };
    assert_eq!(header(&upstream, "x-tollgate-decision"), Some("downgrade"));
    assert_eq!(header(&upstream, "x-tollgate-model"), Some("gpt-4o-mini"));

    let gated = client
        .check(envoy_request(
            "/v1/chat/completions",
            &[],
            CHAT,
            &[("workflow", "backfill")],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        gated.status.as_ref().unwrap().code,
        tonic::Code::PermissionDenied as i32
    );
    let Outcome::Denied { status, body, .. } = outcome(gated) else {
        panic!("must deny")
    };
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "approval_required");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("data-lead@example.com"));
}

#[tokio::test]
async fn malformed_requests_are_denied_never_errors_that_a_failure_mode_could_allow() {
    let mut client = start(POLICY).await;
    // A raw header value that is not UTF-8 (encode_raw_headers).
    let mut req = envoy_request("/v1/chat/completions", &[], CHAT, &[]);
    let http = req
        .attributes
        .as_mut()
        .unwrap()
        .request
        .as_mut()
        .unwrap()
        .http
        .as_mut()
        .unwrap();
    http.headers.clear();
    http.header_map = Some(HeaderMap {
        headers: vec![
            HeaderValue {
                key: ":path".to_string(),
                raw_value: b"/v1/chat/completions".to_vec(),
                ..Default::default()
            },
            HeaderValue {
                key: "x-api-key".to_string(),
                raw_value: vec![0xff, 0xfe, b'k'],
                ..Default::default()
            },
        ],
    });
    let r = client
        .check(req)
        .await
        .expect("a decision, not an RPC error");
    let Outcome::Denied { status, body, .. } = outcome(r.into_inner()) else {
        panic!("must deny")
    };
    assert_eq!(status, 400);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not valid UTF-8"));

    // An unpriced model under a spend-free policy is fine; under a spend
    // rule it is refused.
    let spend_policy = "pricing:\n  unpriced_models: reject\n  models:\n    gpt-4o: { input_per_mtok: 1 }\nrules:\n  - id: s\n    limit: { spend: 10, window: daily }\n";
    let mut client = start(spend_policy).await;
    let unknown = r#"{"model":"mystery","messages":[]}"#;
    let r = client
        .check(envoy_request("/v1/chat/completions", &[], unknown, &[]))
        .await
        .unwrap()
        .into_inner();
    let Outcome::Denied { status, body, .. } = outcome(r) else {
        panic!("must deny")
    };
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "unpriced_model");

    // A body that names no model is not rescued by the client's model
    // header: the body is what the upstream runs.
    let r = client
        .check(envoy_request(
            "/v1/chat/completions",
            &[("x-tollgate-model", "gpt-4o")],
            "{{{ not json",
            &[],
        ))
        .await
        .unwrap()
        .into_inner();
    let Outcome::Denied { status, body, .. } = outcome(r) else {
        panic!("must deny")
    };
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("unpriced_model"))
    );
    // Without a body, the declared model counts, and a bad estimate header
    // is a 400.
    let r = client
        .check(envoy_request(
            "/v1/chat/completions",
            &[("x-tollgate-model", "gpt-4o")],
            "",
            &[],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(outcome(r), Outcome::Allowed { .. }));
    let r = client
        .check(envoy_request(
            "/v1/chat/completions",
            &[
                ("x-tollgate-model", "gpt-4o"),
                ("x-tollgate-max-tokens", "many"),
            ],
            "",
            &[],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(outcome(r), Outcome::Denied { status: 400, .. }));
}

#[tokio::test]
async fn a_repeated_request_id_is_one_charge() {
    let mut client = start(POLICY).await;
    let headers = [
        ("authorization", "Bearer sk-example-checkout-prod"),
        ("x-request-id", "fixed-id-1"),
    ];
    let prod = [("environment", "production")];
    for _ in 0..5 {
        let r = client
            .check(envoy_request("/v1/chat/completions", &headers, CHAT, &prod))
            .await
            .unwrap()
            .into_inner();
        let Outcome::Allowed { downstream, .. } = outcome(r) else {
            panic!("a retry of one request is not a new request")
        };
        assert_eq!(
            header(&downstream, "x-ratelimit-remaining-requests"),
            Some("2")
        );
    }
}

/// The shipped Envoy configurations, read with tollgate's own YAML parser.
mod shipped {
    pub use tollgate_core::policy::yaml::Node;
    use tollgate_core::policy::yaml::{parse, Value};

    /// `deploy/envoy/<file>`, parsed.
    pub fn load(file: &str) -> Node {
        let path = format!("{}/deploy/envoy/{file}", env!("CARGO_MANIFEST_DIR"));
        let source = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        parse(&source).unwrap().unwrap()
    }

    pub fn find<'a>(n: &'a Node, key: &str) -> Option<&'a Node> {
        match &n.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| matches!(&k.value, Value::Scalar { text, .. } if text == key))
                .map(|(_, v)| v),
            _ => panic!("`{key}` looked up in a non-mapping"),
        }
    }

    pub fn get<'a>(n: &'a Node, key: &str) -> &'a Node {
        find(n, key).unwrap_or_else(|| panic!("no `{key}`"))
    }

    pub fn text(n: &Node) -> &str {
        match &n.value {
            Value::Scalar { text, .. } => text,
            _ => panic!("not a scalar"),
        }
    }

    pub fn items(n: &Node) -> &[Node] {
        match &n.value {
            Value::Seq(items) => items,
            _ => panic!("not a list"),
        }
    }

    pub fn keys(n: &Node) -> Vec<&str> {
        match &n.value {
            Value::Map(entries) => entries.iter().map(|(k, _)| text(k)).collect(),
            _ => panic!("not a mapping"),
        }
    }

    /// The listener's HTTP connection manager.
    pub fn connection_manager(root: &Node) -> &Node {
        let listener = &items(get(get(root, "static_resources"), "listeners"))[0];
        get(
            &items(get(&items(get(listener, "filter_chains"))[0], "filters"))[0],
            "typed_config",
        )
    }

    /// The filter's gRPC service is a cluster that reaches tollgate's gRPC
    /// port over HTTP/2.
    pub fn assert_reaches_tollgate(root: &Node, filter_config: &Node) {
        let grpc = get(filter_config, "grpc_service");
        let cluster_name = text(get(get(grpc, "envoy_grpc"), "cluster_name"));
        assert!(!text(get(grpc, "timeout")).is_empty());
        let cluster = items(get(get(root, "static_resources"), "clusters"))
            .iter()
            .find(|c| text(get(c, "name")) == cluster_name)
            .unwrap_or_else(|| panic!("no cluster {cluster_name}"));
        let opts = get(
            get(cluster, "typed_extension_protocol_options"),
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        );
        get(get(opts, "explicit_http_config"), "http2_protocol_options");
        let endpoint = &items(get(
            &items(get(get(cluster, "load_assignment"), "endpoints"))[0],
            "lb_endpoints",
        ))[0];
        let socket = get(get(get(endpoint, "endpoint"), "address"), "socket_address");
        // The address and port tollgate serves gRPC on by default.
        assert_eq!(
            format!(
                "{}:{}",
                text(get(socket, "address")),
                text(get(socket, "port_value"))
            ),
            "127.0.0.1:50051"
        );
    }
}

/// The ext_authz-only Envoy config points its ext_authz filter at the port
/// and service tollgate serves, with the settings the docs promise.
#[test]
fn the_shipped_envoy_config_matches_the_server() {
    use shipped::{get, items, text};
    let root = shipped::load("envoy-ext-authz.yaml");
    let hcm = shipped::connection_manager(&root);
    let filters = items(get(hcm, "http_filters"));
    let authz = filters
        .iter()
        .find(|f| text(get(f, "name")) == "envoy.filters.http.ext_authz")
        .expect("ext_authz filter");
    let config = get(authz, "typed_config");
    assert_eq!(text(get(config, "transport_api_version")), "V3");
    assert_eq!(text(get(config, "failure_mode_allow")), "false");
    assert_eq!(text(get(config, "encode_raw_headers")), "true");
    assert_eq!(
        text(get(get(config, "with_request_body"), "pack_as_bytes")),
        "true"
    );
    shipped::assert_reaches_tollgate(&root, config);

    // Routes set environment and workflow through context_extensions.
    let routes = items(get(
        &items(get(get(hcm, "route_config"), "virtual_hosts"))[0],
        "routes",
    ));
    let ctx = get(
        get(
            get(
                get(&routes[0], "typed_per_filter_config"),
                "envoy.filters.http.ext_authz",
            ),
            "check_settings",
        ),
        "context_extensions",
    );
    assert_eq!(text(get(ctx, "environment")), "production");
    assert_eq!(text(get(ctx, "workflow")), "research-agent");
    // Nothing settles behind ext_authz alone: every route says so.
    for route in routes.iter() {
        let ctx = get(
            get(
                get(
                    get(route, "typed_per_filter_config"),
                    "envoy.filters.http.ext_authz",
                ),
                "check_settings",
            ),
            "context_extensions",
        );
        assert_eq!(text(get(ctx, "settle")), "never");
    }
}

/// The shipped Envoy config, deploy/envoy/envoy.yaml: one ext_proc filter
/// that decides and settles, in the processing mode tollgate serves, with
/// route attributes as the gRPC metadata tollgate reads.
#[test]
fn the_shipped_ext_proc_config_matches_the_server() {
    use shipped::{find, get, items, keys, text};
    use tollgate_core::policy::Attr;

    const EXT_PROC: &str = "envoy.filters.http.ext_proc";
    // The prefix src/server/ext_proc.rs reads route attributes under
    // (`ROUTE_METADATA_PREFIX`).
    const ROUTE_METADATA_PREFIX: &str = "tollgate-route-";
    let root = shipped::load("envoy.yaml");
    let hcm = shipped::connection_manager(&root);
    let filters = items(get(hcm, "http_filters"));
    let names: Vec<&str> = filters.iter().map(|f| text(get(f, "name"))).collect();
    assert_eq!(
        names,
        [EXT_PROC, "envoy.filters.http.router"],
        "one ext_proc filter does the whole job, with no ext_authz beside it"
    );
    let config = get(&filters[0], "typed_config");
    assert_eq!(
        text(get(config, "@type")),
        "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
    );
    // Budgets are enforcement: an unreachable tollgate fails the request.
    assert_eq!(text(get(config, "failure_mode_allow")), "false");
    // tollgate turns the response body off for calls with nothing to settle.
    assert_eq!(text(get(config, "allow_mode_override")), "true");
    let timeout = text(get(config, "message_timeout"));
    let seconds: f64 = timeout
        .strip_suffix('s')
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("message_timeout {timeout:?}"));
    assert!(seconds > 0.0, "message_timeout {timeout:?}");

    // Exactly the mode the server is written for: the request whole, the
    // response as it streams, request trailers when a request has them.
    let mode = get(config, "processing_mode");
    let expected = [
        ("request_header_mode", "SEND"),
        ("request_body_mode", "BUFFERED"),
        ("response_header_mode", "SEND"),
        ("response_body_mode", "STREAMED"),
        ("request_trailer_mode", "SEND"),
        ("response_trailer_mode", "SKIP"),
    ];
    for (field, value) in expected {
        assert_eq!(text(get(mode, field)), value, "processing_mode.{field}");
    }
    assert_eq!(keys(mode).len(), expected.len(), "{:?}", keys(mode));
    shipped::assert_reaches_tollgate(&root, config);

    // Every route names its attributes as `tollgate-route-<attribute>`
    // metadata, each a real attribute.
    let routes = items(get(
        &items(get(get(hcm, "route_config"), "virtual_hosts"))[0],
        "routes",
    ));
    assert!(!routes.is_empty());
    let mut research_agent = false;
    for route in routes {
        let per_filter = get(route, "typed_per_filter_config");
        assert!(find(per_filter, "envoy.filters.http.ext_authz").is_none());
        let per_route = get(per_filter, EXT_PROC);
        assert_eq!(
            text(get(per_route, "@type")),
            "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
        );
        let metadata = items(get(get(per_route, "overrides"), "grpc_initial_metadata"));
        assert!(!metadata.is_empty());
        for entry in metadata {
            let key = text(get(entry, "key"));
            let attribute = key
                .strip_prefix(ROUTE_METADATA_PREFIX)
                .unwrap_or_else(|| panic!("{key} is not a route attribute"));
            assert!(Attr::parse(attribute).is_some(), "{key}: no such attribute");
            let value = text(get(entry, "value"));
            assert!(!value.is_empty(), "{key} is empty");
            research_agent |= attribute == "workflow" && value == "research-agent";
        }
    }
    assert!(research_agent, "the agent route sets its workflow");

    // The buffer limit is set, the same for HTTP/1.1 (the listener's) and
    // HTTP/2 (the stream window), and a body at the limit fits in one gRPC
    // message tollgate accepts from Envoy (4 MiB, MAX_ENVOY_REQUEST_BYTES),
    // with room for the rest of the message.
    let listener = &items(get(get(&root, "static_resources"), "listeners"))[0];
    let limit: u64 = text(get(listener, "per_connection_buffer_limit_bytes"))
        .parse()
        .unwrap();
    let window: u64 = text(get(
        get(hcm, "http2_protocol_options"),
        "initial_stream_window_size",
    ))
    .parse()
    .unwrap();
    assert_eq!(limit, window);
    assert!(
        (1 << 20..=(4 << 20) - (64 << 10)).contains(&limit),
        "buffer limit {limit}"
    );
}

#[tokio::test]
async fn blocked_models_unknown_keys_and_configured_paths() {
    let policy = "
attributes:
  unknown_keys: deny
  modality_paths:
    /v2/generate-image: image
keys:
  - id: known
    sha256: \"74c8b108068d5afd4a40bef2782d1ec6a90b0cde13b56d932971801f8b1e4262\"
rules:
  - id: no-preview-models
    match: { model: \"*-preview\" }
    limit: { requests: 0, window: daily }
  - id: images
    match: { modality: image }
    limit: { images: 2, window: daily }
";
    let mut client = start(policy).await;
    let known = [("x-api-key", "sk-example-checkout-prod")];

    let preview = r#"{"model":"gpt-5-preview","input":"hi"}"#;
    let r = client
        .check(envoy_request("/v1/responses", &known, preview, &[]))
        .await
        .unwrap()
        .into_inner();
    let Outcome::Denied {
        status,
        body,
        headers,
    } = outcome(r)
    else {
        panic!("a blocked model must be denied")
    };
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "blocked");
    assert!(
        header(&headers, "retry-after").is_none(),
        "waiting does not help"
    );

    let stranger = [("x-api-key", "sk-someone-else")];
    let r = client
        .check(envoy_request(
            "/v1/responses",
            &stranger,
            r#"{"model":"gpt-4o"}"#,
            &[],
        ))
        .await
        .unwrap()
        .into_inner();
    let Outcome::Denied { status, body, .. } = outcome(r) else {
        panic!("unknown keys are denied")
    };
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("unknown_key"))
    );

    // The configured path is an image route: three images against two.
    let images = r#"{"prompt":"a fox","n":3}"#;
    let r = client
        .check(envoy_request("/v2/generate-image", &known, images, &[]))
        .await
        .unwrap()
        .into_inner();
    let Outcome::Denied { headers, .. } = outcome(r) else {
        panic!("3 images over a cap of 2")
    };
    assert_eq!(header(&headers, "x-tollgate-rule"), Some("images"));
}

const RETRY_POLICY: &str = "
pricing:
  models:
    gpt-4o: { input_per_mtok: 2.50, output_per_mtok: 10.00 }
rules:
  - id: attempts-per-action
    match: { action: \"*\" }
    per: [action]
    limit: { requests: 2, window: 1h }
  - id: renders-in-flight
    match: { workflow: render }
    limit: { concurrent: 1 }
";

/// Retry budgets through ext_authz: the action id and attempt kind come
/// from headers, a request without an action id is told the one it got,
/// and every denial says whether retrying can help.
#[tokio::test]
async fn retry_budgets_and_retryability_over_ext_authz() {
    let mut client = start(RETRY_POLICY).await;
    let attempt = |kind: &'static str| {
        envoy_request(
            "/v1/chat/completions",
            &[
                ("x-tollgate-action-id", "checkout-42"),
                ("x-tollgate-attempt", kind),
            ],
            CHAT,
            &[],
        )
    };
    for kind in ["primary", "retry"] {
        let r = client.check(attempt(kind)).await.unwrap().into_inner();
        assert!(matches!(outcome(r), Outcome::Allowed { .. }), "{kind}");
    }
    let r = client
        .check(attempt("fallback"))
        .await
        .unwrap()
        .into_inner();
    let Outcome::Denied {
        status,
        headers,
        body,
    } = outcome(r)
    else {
        panic!("the third attempt must be denied")
    };
    assert_eq!(status, 429);
    assert_eq!(
        header(&headers, "x-tollgate-rule"),
        Some("attempts-per-action")
    );
    assert_eq!(header(&headers, "x-tollgate-retryable"), Some("false"));
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("action=checkout-42"));

    // No action id: a fresh one, told both ways, so retries can share it.
    let r = client
        .check(envoy_request("/v1/chat/completions", &[], CHAT, &[]))
        .await
        .unwrap()
        .into_inner();
    let Outcome::Allowed {
        upstream,
        downstream,
    } = outcome(r)
    else {
        panic!("allowed")
    };
    let fresh = header(&upstream, "x-tollgate-action-id").expect("fresh action id");
    assert_eq!(header(&downstream, "x-tollgate-action-id"), Some(fresh));
    // Each retry is a request of its own (its own x-request-id).
    let retry = || {
        envoy_request(
            "/v1/chat/completions",
            &[
                ("x-tollgate-action-id", fresh),
                ("x-tollgate-attempt", "retry"),
            ],
            CHAT,
            &[],
        )
    };
    let r = client.check(retry()).await.unwrap().into_inner();
    assert!(matches!(outcome(r), Outcome::Allowed { .. }));
    let r = client.check(retry()).await.unwrap().into_inner();
    assert!(matches!(outcome(r), Outcome::Denied { status: 429, .. }));

    // A full concurrency slot is worth retrying, shortly.
    let render = || envoy_request("/v1/chat/completions", &[], CHAT, &[("workflow", "render")]);
    let r = client.check(render()).await.unwrap().into_inner();
    assert!(matches!(outcome(r), Outcome::Allowed { .. }));
    let r = client.check(render()).await.unwrap().into_inner();
    let Outcome::Denied {
        status, headers, ..
    } = outcome(r)
    else {
        panic!("the slot is taken")
    };
    assert_eq!(status, 429);
    assert_eq!(header(&headers, "x-tollgate-retryable"), Some("true"));
    assert_eq!(header(&headers, "x-should-retry"), Some("true"));
    assert_eq!(header(&headers, "retry-after"), Some("1"));
    assert_eq!(header(&headers, "retry-after-ms"), Some("1000"));
}

/// A route that says nothing settles its calls refuses a rule that needs
/// the call's end, with a message that says what to do instead.
#[tokio::test]
async fn a_route_nothing_settles_refuses_concurrency_rules() {
    let mut client = start(RETRY_POLICY).await;
    let render = |settle: &'static str| {
        envoy_request(
            "/v1/chat/completions",
            &[],
            CHAT,
            &[("workflow", "render"), ("settle", settle)],
        )
    };
    let r = client.check(render("never")).await.unwrap().into_inner();
    let message = refused_as_unsettled(r);
    assert!(
        message.contains("renders-in-flight") && message.contains("ext_proc"),
        "{message}"
    );
    let r = client.check(render("always")).await.unwrap().into_inner();
    assert!(matches!(outcome(r), Outcome::Allowed { .. }));
}

/// The message of a 400 that no retry helps: a rule that needs a settle
/// where nothing settles.
fn refused_as_unsettled(r: CheckResponse) -> String {
    let Outcome::Denied {
        status,
        body,
        headers,
    } = outcome(r)
    else {
        panic!("must refuse")
    };
    assert_eq!(status, 400);
    assert_eq!(header(&headers, "x-should-retry"), Some("false"));
    body["error"]["message"].as_str().unwrap().to_string()
}

/// `settle: never` in the policy's own `attributes` (not a route's) says
/// nothing settles any call: a `concurrent` rule is refused with 400 on
/// every route that does not say otherwise, a rule that needs no settle
/// still allows, and a route's `settle: always` overrides it.
#[tokio::test]
async fn a_server_that_says_nothing_settles_refuses_concurrency_rules() {
    let policy = format!("\nattributes:\n  settle: never\n{RETRY_POLICY}");
    let mut client = start(&policy).await;
    let render =
        |context: &[(&str, &str)]| envoy_request("/v1/chat/completions", &[], CHAT, context);
    // Twice: a refusal holds no slot, so the second is refused the same
    // way, never found busy.
    for _ in 0..2 {
        let r = client
            .check(render(&[("workflow", "render")]))
            .await
            .unwrap()
            .into_inner();
        let message = refused_as_unsettled(r);
        assert!(
            message.contains("renders-in-flight") && message.contains("settle: never"),
            "{message}"
        );
    }
    // Under the other rules alone, it is allowed.
    let r = client.check(render(&[])).await.unwrap().into_inner();
    assert!(matches!(outcome(r), Outcome::Allowed { .. }));
    // The route's own setting wins: one slot, then it is busy.
    let settled = [("workflow", "render"), ("settle", "always")];
    let r = client.check(render(&settled)).await.unwrap().into_inner();
    assert!(matches!(outcome(r), Outcome::Allowed { .. }));
    let r = client.check(render(&settled)).await.unwrap().into_inner();
    assert!(matches!(outcome(r), Outcome::Denied { status: 429, .. }));
}
