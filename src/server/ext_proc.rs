//! Envoy's external processing (`envoy.service.ext_proc.v3.ExternalProcessor`),
//! on the gRPC port beside ext_authz: one filter decides on the request and
//! settles on the response.
//!
//! One gRPC stream is one HTTP exchange, in the order Envoy sends it under
//! the shipped processing mode (request headers SEND, request body
//! BUFFERED, response headers SEND, response body STREAMED):
//!
//! 1. `request_headers`: kept; decided at once only when the request has
//!    no body (`end_of_stream`), since no body message will follow.
//! 2. `request_body`: decided through the one authorize pipeline. A denial
//!    is an `ImmediateResponse` with the same status, headers and JSON body
//!    as ext_authz. An allow mutates the headers as ext_authz does, and on
//!    a downgrade rewrites the body's `model` (with the matching
//!    `content-length`, which Envoy does not fix for a buffered body).
//! 3. `response_headers`: the client's headroom headers are added; a call
//!    with nothing to settle turns the response body off (`mode_override`,
//!    which Envoy honours only in a headers reply).
//! 4. `response_body` chunks feed the [`Meter`]; the last one
//!    (`end_of_stream`) completes the exchange.
//!
//! When the stream ends, completed or not, the reservation is settled with
//! what the response reported (or, failing that, what was counted), on
//! the policy snapshot that decided, off the response path and retried:
//! a store outage never stalls a response. A stream Envoy closes early
//! (the client went away, a timeout) settles with what was seen, which
//! releases its concurrency slots.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::{
    processing_mode::BodySendMode, ProcessingMode,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Msg;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Reply;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation, BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse,
    HttpHeaders, ImmediateResponse, ProcessingRequest, ProcessingResponse, TrailersResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tollgate_core::engine::{Decision, Verdict};
use tollgate_core::gate::{ActualUsage, Gate, GateError};
use tollgate_core::policy::CompiledPolicy;
use tollgate_core::store::SettleOutcome;
use tonic::{Request, Response, Status, Streaming};

use super::authorize::{authorize, Allowed, Answer};
use super::body::CHARS_PER_TOKEN;
use super::http_request::HttpRequest;
use super::meter::sse::{Piece, Splitter};
use super::meter::{Api, Meter, Metered};
use super::status::Refusal;
use crate::telemetry::names;

/// gRPC metadata keys that carry route attributes, set per route with
/// `ExtProcPerRoute.overrides.grpc_initial_metadata`: `tollgate-route-team:
/// growth`, `tollgate-route-labels.plan: free`. They rank as route
/// attributes, above the key registry and the client.
pub const ROUTE_METADATA_PREFIX: &str = "tollgate-route-";

/// The most request body kept when Envoy streams one in pieces; past it,
/// the prefix is read as a cut body is.
const MAX_REQUEST_BODY: usize = 4 * 1024 * 1024;

/// How long a settle keeps trying through a store outage, and its backoff.
const SETTLE_PATIENCE: Duration = Duration::from_secs(600);
const SETTLE_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(10));

#[derive(Debug, Clone)]
pub struct ExtProc {
    gate: Arc<Gate>,
}

impl ExtProc {
    pub fn new(gate: Arc<Gate>) -> ExtProc {
        ExtProc { gate }
    }
}

#[tonic::async_trait]
impl ExternalProcessor for ExtProc {
    type ProcessStream = ReceiverStream<Result<ProcessingResponse, Status>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let route = route_metadata(request.metadata());
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let gate = self.gate.clone();
        tokio::spawn(async move {
            let mut exchange = Exchange::new(route);
            while let Ok(Some(message)) = inbound.message().await {
                let Some(message) = message.request else {
                    continue;
                };
                let reply = exchange.step(&gate, message).await;
                let last = matches!(
                    reply,
                    Err(_)
                        | Ok(ProcessingResponse {
                            response: Some(Reply::ImmediateResponse(_)),
                            ..
                        })
                );
                if tx.send(reply).await.is_err() || last {
                    break;
                }
            }
            exchange.finish(gate);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Route attributes from the stream's initial metadata.
fn route_metadata(metadata: &tonic::metadata::MetadataMap) -> HashMap<String, String> {
    metadata
        .iter()
        .filter_map(|kv| match kv {
            tonic::metadata::KeyAndValueRef::Ascii(k, v) => Some((k.as_str(), v.to_str().ok()?)),
            tonic::metadata::KeyAndValueRef::Binary(..) => None,
        })
        .filter_map(|(k, v)| {
            k.strip_prefix(ROUTE_METADATA_PREFIX)
                .map(|name| (name.to_string(), v.to_string()))
        })
        .collect()
}

/// A call that was allowed and holds a reservation to settle.
struct Admitted {
    reservation_id: String,
    policy: Arc<CompiledPolicy>,
    /// Input tokens as estimated from the request, for a settle without
    /// reported usage.
    input_estimate: u64,
    meter: Option<Meter>,
    upstream_status: u16,
    completed: bool,
    /// tollgate asked the upstream for the stream's usage; what that adds
    /// is taken out again before the client sees it.
    asked_for_usage: bool,
    /// Set once the response is a stream to take the usage out of.
    rewrite: Option<Splitter>,
}

struct Exchange {
    route: HashMap<String, String>,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    admitted: Option<Admitted>,
    /// Headers to add to the client's response, from the decision.
    downstream: Vec<(String, String)>,
}

impl Exchange {
    fn new(route: HashMap<String, String>) -> Exchange {
        Exchange {
            route,
            headers: Vec::new(),
            body: Vec::new(),
            admitted: None,
            downstream: Vec::new(),
        }
    }

    async fn step(&mut self, gate: &Gate, message: Msg) -> Result<ProcessingResponse, Status> {
        match message {
            Msg::RequestHeaders(h) => {
                self.headers = header_pairs(&h);
                if h.end_of_stream {
                    return Ok(self.decide(gate, false).await);
                }
                Ok(reply(Reply::RequestHeaders(HeadersResponse::default())))
            }
            Msg::RequestBody(b) => {
                let room = MAX_REQUEST_BODY.saturating_sub(self.body.len());
                self.body
                    .extend_from_slice(&b.body[..b.body.len().min(room)]);
                if !b.end_of_stream {
                    return Ok(reply(Reply::RequestBody(BodyResponse::default())));
                }
                Ok(self.decide(gate, true).await)
            }
            Msg::ResponseHeaders(h) => Ok(self.response_headers(&h)),
            Msg::ResponseBody(b) => {
                let mut response = BodyResponse::default();
                if let Some(a) = &mut self.admitted {
                    if let Some(meter) = &mut a.meter {
                        meter.feed(&b.body);
                    }
                    a.completed |= b.end_of_stream;
                    if let Some(splitter) = &mut a.rewrite {
                        let body = without_added_usage(splitter, &b.body, b.end_of_stream);
                        if body != b.body {
                            response.response = Some(CommonResponse {
                                body_mutation: Some(BodyMutation {
                                    mutation: Some(body_mutation::Mutation::Body(body)),
                                }),
                                ..Default::default()
                            });
                        }
                    }
                }
                Ok(reply(Reply::ResponseBody(response)))
            }
            Msg::RequestTrailers(_) => {
                Ok(reply(Reply::RequestTrailers(TrailersResponse::default())))
            }
            Msg::ResponseTrailers(_) => {
                if let Some(a) = &mut self.admitted {
                    a.completed = true;
                }
                Ok(reply(Reply::ResponseTrailers(TrailersResponse::default())))
            }
        }
    }

    /// Decides the request, in the reply to its headers (no body) or to its
    /// body.
    async fn decide(&mut self, gate: &Gate, with_body: bool) -> ProcessingResponse {
        let header = |name: &str| {
            self.headers
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
                .map(str::to_string)
        };
        let method = header(":method").unwrap_or_default();
        let path = header(":path").unwrap_or_default();
        let mut headers = self.headers.clone();
        // A body cut at Envoy's buffer (BUFFERED_PARTIAL) is read as a
        // prefix, with the input estimated from its declared length.
        let declared: Option<usize> = header("content-length").and_then(|v| v.parse().ok());
        if declared.is_some_and(|n| n > self.body.len()) {
            headers.push(("x-envoy-auth-partial-body".to_string(), b"true".to_vec()));
        }
        let view = HttpRequest {
            method: &method,
            path: &path,
            headers,
            context: Some(&self.route),
            body: with_body.then_some(&self.body[..]),
            proxy_request_id: None,
        };
        let answer = authorize(gate, &view, true).await;
        let Allowed {
            allowance,
            decision,
            policy,
        } = match answer {
            Answer::Refused(r) => return immediate(&r),
            Answer::Allowed(a) => *a,
        };
        let mut mutation = HeaderMutation {
            set_headers: allowance.upstream.into_iter().map(raw_header).collect(),
            remove_headers: allowance.remove,
        };
        self.downstream = allowance.downstream;
        let mut common = CommonResponse::default();
        let mut asked_for_usage = false;
        if with_body {
            let rewritten = rewritten_body(&self.body, &decision, &path);
            asked_for_usage = rewritten.as_ref().is_some_and(|r| r.asked_for_usage);
            if let Some(Rewritten { body, .. }) = rewritten {
                mutation.set_headers.push(raw_header((
                    "content-length".to_string(),
                    body.len().to_string(),
                )));
                common.body_mutation = Some(BodyMutation {
                    mutation: Some(body_mutation::Mutation::Body(body)),
                });
            }
        }
        common.header_mutation = Some(mutation);
        if let Some(id) = decision.reservation_id.clone() {
            self.admitted = Some(Admitted {
                reservation_id: id,
                policy,
                input_estimate: (self.body.len() as u64).div_ceil(CHARS_PER_TOKEN),
                meter: None,
                upstream_status: 0,
                completed: false,
                asked_for_usage,
                rewrite: None,
            });
        }
        let response = HeadersResponse {
            response: Some(common.clone()),
        };
        if with_body {
            reply(Reply::RequestBody(BodyResponse {
                response: Some(common),
            }))
        } else {
            reply(Reply::RequestHeaders(response))
        }
    }

    fn response_headers(&mut self, h: &HttpHeaders) -> ProcessingResponse {
        let pairs = header_pairs(h);
        let header = |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
        };
        let status = header(":status").and_then(|s| s.parse().ok()).unwrap_or(0);
        let event_stream =
            header("content-type").is_some_and(|c| c.starts_with("text/event-stream"));
        let path = self
            .headers
            .iter()
            .find(|(k, _)| k == ":path")
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .unwrap_or("")
            .to_string();
        let mut out = ProcessingResponse {
            response: Some(Reply::ResponseHeaders(HeadersResponse {
                response: Some(CommonResponse {
                    header_mutation: Some(HeaderMutation {
                        set_headers: self.downstream.drain(..).map(raw_header).collect(),
                        remove_headers: Vec::new(),
                    }),
                    ..Default::default()
                }),
            })),
            ..Default::default()
        };
        match &mut self.admitted {
            Some(a) => {
                a.upstream_status = status;
                a.meter = Api::from_path(&path).map(|api| Meter::new(api, event_stream));
                if a.asked_for_usage && event_stream && (200..300).contains(&status) {
                    a.rewrite = Some(Splitter::new(Splitter::DEFAULT_MAX_EVENT_BYTES));
                }
                if h.end_of_stream {
                    a.completed = true;
                }
            }
            // Nothing to settle: the body need not come here at all.
            None => {
                out.mode_override = Some(ProcessingMode {
                    response_body_mode: BodySendMode::None as i32,
                    ..Default::default()
                });
            }
        }
        out
    }

    /// Settles what the exchange used, whether it completed or was cut
    /// short, off the response path.
    fn finish(self, gate: Arc<Gate>) {
        let Some(a) = self.admitted else { return };
        let metered = a.meter.map(Meter::finish);
        let (actual, served) = settle_usage(a.input_estimate, a.upstream_status, metered.as_ref());
        if !a.completed {
            tracing::debug!(
                reservation = a.reservation_id,
                "exchange closed before its end; settling what was seen"
            );
        }
        tokio::spawn(settle_with_retries(
            gate,
            a.policy,
            a.reservation_id,
            actual,
            served,
        ));
    }
}

/// What a finished (or cut) exchange used: what the response reported,
/// else the input estimate and the output counted from the streamed text.
/// An upstream error (4xx, 5xx) that reports nothing is charged nothing
/// beyond the attempt itself: the provider bills no tokens for it.
fn settle_usage(
    input_estimate: u64,
    upstream_status: u16,
    metered: Option<&Metered>,
) -> (ActualUsage, Option<String>) {
    let served = metered.and_then(|m| m.model.clone());
    let reported = metered.and_then(|m| m.reported.as_ref());
    let actual = match reported {
        Some(r) => ActualUsage {
            input_tokens: r.input_tokens,
            cached_input_tokens: r.cached_input_tokens.min(r.input_tokens),
            output_tokens: r.output_tokens,
            images: r.images,
            ..Default::default()
        },
        None if upstream_status >= 400 => ActualUsage::default(),
        None => ActualUsage {
            input_tokens: input_estimate,
            output_tokens: metered.map(|m| m.counted_output_tokens).unwrap_or(0),
            ..Default::default()
        },
    };
    (actual, served)
}

/// Settles, retrying through a store outage with a doubling backoff. A
/// settle is keyed by its reservation, so a retry after one that did land
/// is answered `already_settled` and never applied twice.
async fn settle_with_retries(
    gate: Arc<Gate>,
    policy: Arc<CompiledPolicy>,
    reservation_id: String,
    actual: ActualUsage,
    served: Option<String>,
) {
    let deadline = tokio::time::Instant::now() + SETTLE_PATIENCE;
    let mut backoff = SETTLE_BACKOFF.0;
    loop {
        match gate
            .settle_on(&policy, &reservation_id, &actual, served.as_deref())
            .await
        {
            Ok(SettleOutcome::Settled | SettleOutcome::AlreadySettled) => return,
            Ok(SettleOutcome::Unknown) | Err(GateError::UnknownReservation(_)) => {
                tracing::warn!(
                    reservation = reservation_id,
                    "reservation gone before its settle; it expired with its estimate charged"
                );
                return;
            }
            Err(GateError::Store(e)) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(reservation = reservation_id, error = %e, "settle retried after a store fault");
                metrics::counter!(names::SETTLE_RETRIES).increment(1);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(SETTLE_BACKOFF.1);
            }
            Err(e) => {
                tracing::warn!(reservation = reservation_id, error = %e, "settle failed; the reservation keeps its estimate until it expires");
                return;
            }
        }
    }
}

/// A request body that tollgate changed.
struct Rewritten {
    body: Vec<u8>,
    /// `stream_options.include_usage` was added.
    asked_for_usage: bool,
}

/// The request body to send upstream instead, if it must change: on a
/// downgrade, the cheaper model in place of the one asked for; and an
/// OpenAI stream that does not ask for its usage is made to, so that it
/// can be settled at what it really used.
fn rewritten_body(body: &[u8], decision: &Decision, path: &str) -> Option<Rewritten> {
    let downgrade = decision
        .model
        .as_deref()
        .filter(|_| decision.verdict == Verdict::Downgrade && !path.contains("/models/"));
    let openai_stream = matches!(
        Api::from_path(path),
        Some(Api::OpenAiChat | Api::OpenAiCompletions)
    );
    if body.is_empty() || (downgrade.is_none() && !openai_stream) {
        return None;
    }
    let mut json: serde_json::Value = serde_json::from_slice(body).ok()?;
    let object = json.as_object_mut()?;
    if let Some(model) = downgrade {
        object.insert("model".to_string(), serde_json::Value::from(model));
    }
    let streams = object.get("stream").and_then(serde_json::Value::as_bool) == Some(true);
    let asks = object
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(serde_json::Value::as_bool)
        == Some(true);
    let ask_for_usage = openai_stream && streams && !asks;
    if ask_for_usage {
        let options = object
            .entry("stream_options")
            .or_insert_with(|| serde_json::json!({}));
        match options.as_object_mut() {
            Some(o) => {
                o.insert("include_usage".to_string(), serde_json::Value::Bool(true));
            }
            // A `stream_options` that is not an object is the client's
            // own mistake: leave it for the upstream to refuse.
            None => return None,
        }
    }
    if downgrade.is_none() && !ask_for_usage {
        return None;
    }
    Some(Rewritten {
        body: serde_json::to_vec(&json).ok()?,
        asked_for_usage: ask_for_usage,
    })
}

/// One chunk of a stream whose usage tollgate asked for, as the client
/// would have seen it had tollgate not: the final usage-only chunk goes,
/// and so does the `"usage":null` the upstream then puts in every other
/// chunk. An incomplete trailing event is held back (up to the
/// splitter's bound) so that nothing is cut in half; the stream's last
/// chunk flushes it.
fn without_added_usage(splitter: &mut Splitter, chunk: &[u8], last: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(chunk.len());
    splitter.push(chunk, |piece| match piece {
        Piece::Event(event) => strip_usage(event, &mut out),
        Piece::Overflow(bytes) => out.extend_from_slice(bytes),
    });
    if last {
        let rest = std::mem::replace(splitter, Splitter::new(0)).finish();
        out.extend_from_slice(&rest);
    }
    out
}

fn strip_usage(event: &[u8], out: &mut Vec<u8>) {
    let has = |needle: &[u8]| event.windows(needle.len()).any(|w| w == needle);
    if (has(b"\"choices\":[]") || has(b"\"choices\": []"))
        && (has(b"\"usage\":{") || has(b"\"usage\": {"))
    {
        return;
    }
    let needles: [&[u8]; 4] = [
        b",\"usage\":null",
        b"\"usage\":null,",
        b", \"usage\": null",
        b"\"usage\": null, ",
    ];
    for needle in needles {
        if let Some(at) = event.windows(needle.len()).position(|w| w == needle) {
            out.extend_from_slice(&event[..at]);
            out.extend_from_slice(&event[at + needle.len()..]);
            return;
        }
    }
    out.extend_from_slice(event);
}

fn reply(response: Reply) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(response),
        ..Default::default()
    }
}

/// A refusal as Envoy's local reply, with the same status, headers and
/// JSON body as ext_authz (Envoy's own default content type is text).
fn immediate(r: &Refusal) -> ProcessingResponse {
    let mut headers = r.headers.clone();
    headers.push(("content-type".to_string(), "application/json".to_string()));
    reply(Reply::ImmediateResponse(ImmediateResponse {
        status: Some(HttpStatus {
            code: i32::from(r.http),
        }),
        headers: Some(HeaderMutation {
            set_headers: headers.into_iter().map(raw_header).collect(),
            remove_headers: Vec::new(),
        }),
        body: r.body().into_bytes(),
        details: format!("tollgate_{}", r.code),
        ..Default::default()
    }))
}

/// Envoy reads a mutation's value from `raw_value` only: `value` alone is
/// taken as empty, and both together are an error.
fn raw_header((key, value): (String, String)) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key,
            raw_value: value.into_bytes(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Header values arrive in `raw_value` in current Envoy (with `value`
/// empty); older ones used `value`. Both are read.
fn header_pairs(h: &HttpHeaders) -> Vec<(String, Vec<u8>)> {
    h.headers
        .iter()
        .flat_map(|map| map.headers.iter())
        .map(|hv| {
            let value = if hv.raw_value.is_empty() {
                hv.value.as_bytes().to_vec()
            } else {
                hv.raw_value.clone()
            };
            (hv.key.to_ascii_lowercase(), value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::engine::Reason;

    const STREAM: &str = "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}],\"usage\":null}\r\n\r\n\
data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n\
data: [DONE]\n\n";

    const WITHOUT: &str = "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n\
data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}]}\r\n\r\n\
data: [DONE]\n\n";

    #[test]
    fn what_tollgate_added_to_a_stream_is_taken_out_wherever_the_chunks_split() {
        let bytes = STREAM.as_bytes();
        for cut in 0..=bytes.len() {
            for second in cut..=bytes.len() {
                let mut splitter = Splitter::new(Splitter::DEFAULT_MAX_EVENT_BYTES);
                let mut out = without_added_usage(&mut splitter, &bytes[..cut], false);
                out.extend(without_added_usage(
                    &mut splitter,
                    &bytes[cut..second],
                    false,
                ));
                out.extend(without_added_usage(&mut splitter, &bytes[second..], true));
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    WITHOUT,
                    "cut at {cut}, {second}"
                );
            }
        }
    }

    fn decision(verdict: Verdict, model: Option<&str>) -> Decision {
        Decision {
            verdict,
            reason: Reason::Allowed,
            model: model.map(str::to_string),
            ..Decision::allow_unmetered()
        }
    }

    #[test]
    fn a_stream_is_asked_for_its_usage_and_a_downgrade_names_the_cheaper_model() {
        let chat = "/v1/chat/completions";
        let asked = rewritten_body(
            br#"{"model":"gpt-5","stream":true,"messages":[]}"#,
            &decision(Verdict::Allow, None),
            chat,
        )
        .unwrap();
        assert!(asked.asked_for_usage);
        let json: serde_json::Value = serde_json::from_slice(&asked.body).unwrap();
        assert_eq!(json["stream_options"]["include_usage"], true);
        assert_eq!(json["model"], "gpt-5");

        // A client that asked already, or a call that does not stream, is
        // left as it is.
        for body in [
            r#"{"model":"gpt-5","stream":true,"stream_options":{"include_usage":true}}"#,
            r#"{"model":"gpt-5","messages":[]}"#,
        ] {
            assert!(
                rewritten_body(body.as_bytes(), &decision(Verdict::Allow, None), chat).is_none()
            );
        }

        let down = rewritten_body(
            br#"{"model":"gpt-5","messages":[]}"#,
            &decision(Verdict::Downgrade, Some("gpt-4o-mini")),
            "/v1/messages",
        )
        .unwrap();
        assert!(!down.asked_for_usage);
        let json: serde_json::Value = serde_json::from_slice(&down.body).unwrap();
        assert_eq!(json["model"], "gpt-4o-mini");
    }
}
