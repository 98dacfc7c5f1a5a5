//! Drives tollgate over gRPC at a fixed concurrency and prints requests per
//! second and latency percentiles.
//!
//! cargo run --release --example loadgen -- --target http://127.0.0.1:50051 \
//!     --concurrency 64 --connections 4 --seconds 10 [--mode native] [--keys 1000]
//!
//! `--keys`: how many distinct API keys the requests cycle through.
//! `--target` may list several servers, comma-separated (replicas on one
//! Redis): each gets `--connections` connections, and the requests in
//! flight take the connections in turn.
//! Modes, all against the scenario in `policy.yaml`, each request matching
//! the same four rules (its key, its team, the premium family, production;
//! twenty with `20-rules/policy.yaml`):
//! - `native` (the default): `Check` on tollgate's own API.
//! - `ext-authz`: Envoy's `Authorization/Check`, one unary call shaped as
//!   Envoy sends it (lower-cased headers with `:path` and `:method`, the
//!   body in `raw_body`, a distinct `http.id`). The team and environment
//!   are route attributes, in `context_extensions`.
//! - `ext-proc`: the request phase of Envoy's `ExternalProcessor/Process`:
//!   one stream per request, `request_headers`, its reply, `request_body`,
//!   its reply, then the half-close, read to the end of the stream. The
//!   team and environment are route attributes, in the stream's
//!   `tollgate-route-*` initial metadata. A request counts as done, and
//!   its latency ends, when the body's reply arrives.
//! - `ext-authz-settle`: what ext_proc's request phase stands in for: the
//!   `ext-authz` call, then a native `Settle` of its reservation (with the
//!   input estimate and no output, as ext_proc settles a request phase), on
//!   the same connection. The request's latency ends with the decision.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context, AttributeContext, CheckRequest,
};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Msg;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Reply;
use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpHeaders, ProcessingRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tollgate::proto::v1 as pb;
use tollgate::proto::v1::tollgate_client::TollgateClient;
use tonic::transport::Channel;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Native,
    ExtAuthz,
    ExtAuthzSettle,
    ExtProc,
}

struct Args {
    target: String,
    concurrency: usize,
    connections: usize,
    seconds: u64,
    keys: usize,
    mode: Mode,
}

fn args() -> Args {
    let mut a = Args {
        target: "http://127.0.0.1:50051".to_string(),
        concurrency: 64,
        connections: 4,
        seconds: 10,
        keys: 1000,
        mode: Mode::Native,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        let n = || {
            value
                .parse::<usize>()
                .unwrap_or_else(|_| panic!("{flag} takes a number"))
        };
        match flag.as_str() {
            "--target" => a.target = value.clone(),
            "--concurrency" => a.concurrency = n(),
            "--connections" => a.connections = n(),
            "--seconds" => a.seconds = n() as u64,
            "--keys" => a.keys = n(),
            "--mode" => {
                a.mode = match value.as_str() {
                    "native" => Mode::Native,
                    "ext-authz" => Mode::ExtAuthz,
                    "ext-authz-settle" => Mode::ExtAuthzSettle,
                    "ext-proc" => Mode::ExtProc,
                    other => panic!(
                        "--mode is native, ext-authz, ext-authz-settle or ext-proc, not {other}"
                    ),
                }
            }
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn request(i: usize, keys: usize) -> pb::CheckRequest {
    pb::CheckRequest {
        attributes: Some(pb::Attributes {
            api_key: format!("sk-load-{}", i % keys),
            team: format!("team-{}", i % 10),
            environment: "production".to_string(),
            model: "gpt-5".to_string(),
            ..Default::default()
        }),
        estimate: Some(pb::Estimate {
            input_tokens: Some(500),
            output_tokens: Some(200),
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

/// The body both Envoy modes send: a small OpenAI chat completion, whose
/// model puts it in the premium family.
const BODY: &str = r#"{"model":"gpt-5","messages":[{"role":"system","content":"You are a careful analyst. Answer briefly."},{"role":"user","content":"Summarise the attached quarterly report in three bullet points, with figures."}],"max_tokens":200,"temperature":0.2}"#;
const PATH: &str = "/v1/chat/completions";

/// The request headers as Envoy hands them over, names lower case.
fn envoy_headers(i: usize, keys: usize, id: &str) -> Vec<(&'static str, String)> {
    vec![
        (":path", PATH.to_string()),
        (":method", "POST".to_string()),
        (":authority", "api.example.com".to_string()),
        (":scheme", "https".to_string()),
        ("authorization", format!("Bearer sk-load-{}", i % keys)),
        ("content-type", "application/json".to_string()),
        ("content-length", BODY.len().to_string()),
        ("user-agent", "OpenAI/Python 1.99.0".to_string()),
        ("x-request-id", id.to_string()),
    ]
}

/// The route attributes: what the native mode sends as attributes besides
/// the key and the model.
fn route(i: usize) -> [(&'static str, String); 2] {
    [
        ("team", format!("team-{}", i % 10)),
        ("environment", "production".to_string()),
    ]
}

fn check_request(i: usize, keys: usize, id: String) -> CheckRequest {
    let headers = envoy_headers(i, keys, &id)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect::<HashMap<_, _>>();
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    id,
                    method: "POST".to_string(),
                    path: PATH.to_string(),
                    host: "api.example.com".to_string(),
                    scheme: "https".to_string(),
                    headers,
                    raw_body: BODY.as_bytes().to_vec(),
                    size: BODY.len() as i64,
                    protocol: "HTTP/1.1".to_string(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: route(i)
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            ..Default::default()
        }),
    }
}

fn processing(request: Msg) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(request),
        ..Default::default()
    }
}

enum Client {
    Native(TollgateClient<Channel>),
    ExtAuthz(AuthorizationClient<Channel>),
    ExtAuthzSettle(AuthorizationClient<Channel>, TollgateClient<Channel>),
    ExtProc(ExternalProcessorClient<Channel>),
}

impl Client {
    fn new(mode: Mode, channel: Channel) -> Client {
        match mode {
            Mode::Native => Client::Native(TollgateClient::new(channel)),
            Mode::ExtAuthz => Client::ExtAuthz(AuthorizationClient::new(channel)),
            Mode::ExtAuthzSettle => Client::ExtAuthzSettle(
                AuthorizationClient::new(channel.clone()),
                TollgateClient::new(channel),
            ),
            Mode::ExtProc => Client::ExtProc(ExternalProcessorClient::new(channel)),
        }
    }

    /// Sends request `i` (Envoy's request id built by `id`, unique in the
    /// run), and answers whether it was allowed, or the gRPC error, with
    /// the time it was decided.
    async fn one(
        &mut self,
        i: usize,
        keys: usize,
        id: impl FnOnce() -> String,
    ) -> (Result<bool, tonic::Status>, Instant) {
        let result = match self {
            Client::Native(c) => c
                .check(request(i, keys))
                .await
                .map(|r| r.get_ref().verdict() == pb::Verdict::Allow),
            Client::ExtAuthz(c) => c
                .check(check_request(i, keys, id()))
                .await
                .map(|r| r.get_ref().status.as_ref().is_some_and(|s| s.code == 0)),
            Client::ExtAuthzSettle(authz, native) => {
                let response = match authz.check(check_request(i, keys, id())).await {
                    Ok(r) => r.into_inner(),
                    Err(e) => return (Err(e), Instant::now()),
                };
                let decided = Instant::now();
                let allowed = response.status.as_ref().is_some_and(|s| s.code == 0);
                let reservation = match &response.http_response {
                    Some(HttpResponse::OkResponse(ok)) => ok
                        .headers
                        .iter()
                        .filter_map(|h| h.header.as_ref())
                        .find(|h| h.key == "x-tollgate-reservation")
                        .map(|h| h.value.clone()),
                    _ => None,
                };
                if let Some(reservation_id) = reservation {
                    let settle = pb::SettleRequest {
                        reservation_id,
                        usage: Some(pb::ActualUsage {
                            input_tokens: (BODY.len() as u64).div_ceil(4),
                            ..Default::default()
                        }),
                    };
                    if let Err(e) = native.settle(settle).await {
                        return (Err(e), decided);
                    }
                }
                return (Ok(allowed), decided);
            }
            Client::ExtProc(c) => {
                let id = id();
                let (result, decided) = ext_proc_request_phase(c, i, keys, &id).await;
                return (result, decided);
            }
        };
        (result, Instant::now())
    }
}

/// One request phase on a stream of its own: headers, then body, each
/// waiting for its reply. The stream is then half-closed and read to its
/// end, so that the server ends it and nothing is reset. Answers when the
/// body's reply arrived.
async fn ext_proc_request_phase(
    client: &mut ExternalProcessorClient<Channel>,
    i: usize,
    keys: usize,
    id: &str,
) -> (Result<bool, tonic::Status>, Instant) {
    let (tx, rx) = mpsc::channel(2);
    let headers = HttpHeaders {
        headers: Some(HeaderMap {
            headers: envoy_headers(i, keys, id)
                .into_iter()
                .map(|(k, v)| HeaderValue {
                    key: k.to_string(),
                    raw_value: v.into_bytes(),
                    ..Default::default()
                })
                .collect(),
        }),
        end_of_stream: false,
        ..Default::default()
    };
    let ended = || tonic::Status::unavailable("the stream ended early");
    // The channel has room: the headers wait there until the call starts.
    let _ = tx.try_send(processing(Msg::RequestHeaders(headers)));
    let mut call = tonic::Request::new(ReceiverStream::new(rx));
    for (attr, value) in route(i) {
        let key = format!("tollgate-route-{attr}");
        let key = tonic::metadata::MetadataKey::from_bytes(key.as_bytes()).expect("metadata key");
        call.metadata_mut()
            .insert(key, value.parse().expect("metadata value"));
    }
    let phase = async {
        let mut inbound = client.process(call).await?.into_inner();
        let reply = inbound.message().await?.ok_or_else(ended)?;
        if !matches!(reply.response, Some(Reply::RequestHeaders(_))) {
            return Ok((false, inbound));
        }
        let body = HttpBody {
            body: BODY.as_bytes().to_vec(),
            end_of_stream: true,
            ..Default::default()
        };
        tx.send(processing(Msg::RequestBody(body)))
            .await
            .map_err(|_| ended())?;
        let reply = inbound.message().await?.ok_or_else(ended)?;
        Ok((
            matches!(reply.response, Some(Reply::RequestBody(_))),
            inbound,
        ))
    };
    let result = phase.await;
    let decided = Instant::now();
    drop(tx);
    match result {
        Ok((allowed, mut inbound)) => {
            while let Ok(Some(_)) = inbound.message().await {}
            (Ok(allowed), decided)
        }
        Err(e) => (Err(e), decided),
    }
}

#[tokio::main]
async fn main() {
    let a = args();
    // Several targets (replicas) each get `connections` of their own; the
    // requests in flight take the connections in turn.
    let mut channels = Vec::new();
    for _ in 0..a.connections.max(1) {
        for target in a.target.split(',') {
            let ch = Channel::from_shared(target.to_string())
                .expect("target URL")
                .connect()
                .await
                .expect("connect to target");
            channels.push(ch);
        }
    }
    // Request ids unique to this run: a repeated id would be a replay.
    let run = format!("{:x}", std::process::id());
    // Warm up connections and caches.
    let mut warm = Client::new(a.mode, channels[0].clone());
    for i in 0..200 {
        let (result, _) = warm.one(i, a.keys, || format!("{run}-warm-{i}")).await;
        let allowed = result.expect("warm-up request");
        // The native warm-up, as before, asks only that the call succeed.
        assert!(
            allowed || a.mode == Mode::Native,
            "warm-up request {i} was not allowed"
        );
    }

    let until = Instant::now() + Duration::from_secs(a.seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..a.concurrency {
        let mut client = Client::new(a.mode, channels[t % channels.len()].clone());
        let keys = a.keys;
        let run = run.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(100_000);
            let mut errors = 0u64;
            let mut i = t * 7919;
            let mut n = 0u64;
            while Instant::now() < until {
                i += 1;
                n += 1;
                let sent = Instant::now();
                let (result, decided) = client.one(i, keys, || format!("{run}-{t}-{n}")).await;
                if !matches!(result, Ok(true)) {
                    errors += 1;
                }
                latencies.push(decided - sent);
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("task");
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        let i = ((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1));
        all.get(i).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
    };
    println!(
        "requests={} errors={} rate={:.0}/s p50={:.2}ms p99={:.2}ms p999={:.2}ms",
        all.len(),
        errors,
        all.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        pct(0.999)
    );
}
