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
//!    Request trailers after headers alone are decided in turn.
//! 2. `request_body`: decided at the first body message, whether or not it
//!    ends the body (one followed by trailers does not), through the one
//!    authorize pipeline. A response that begins with nothing decided ends
//!    the stream with an error status, so no call passes undecided. A denial
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
//! A response that streams past what its reservation covered is topped
//! up as it goes: see [`Overrun`]. When no more fits, the rules' own
//! `on_overrun` says whether it runs to its end (`finish`) or is ended
//! with an error event the SDKs raise (`cut`).
//!
//! When the stream ends, completed or not, the reservation is settled with
//! what the response reported (or, failing that, what was counted), on
//! the policy snapshot that decided, off the response path and retried:
//! a store outage never stalls a response. A stream Envoy closes early
//! (the client went away, a timeout) settles with what was seen, which
//! releases its concurrency slots.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
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
    HttpBody, HttpHeaders, ImmediateResponse, ProcessingRequest, ProcessingResponse,
    TrailersResponse,
};
use tokio::sync::oneshot;
use tokio_stream::Stream;
use tollgate_core::engine::{Decision, Verdict};
use tollgate_core::gate::{
    reserved_output_tokens, ActualUsage, CheckInput, Gate, GateError, TopUp,
};
use tollgate_core::policy::{CompiledPolicy, OnOverrun, OnUpstreamError, StoreFailure, Unit};
use tollgate_core::store::SettleOutcome;
use tonic::{Request, Response, Status, Streaming};

use super::authorize::{authorize, Allowed, Answer, FrontEnd};
use super::body::CHARS_PER_TOKEN;
use super::http_request::{check_input, HttpRequest};
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

/// Settles (and releases) waiting to be tried again after a store fault,
/// at most. Through a long outage at a high rate they would otherwise pile
/// up without bound; past it a settle that fails is given up at once, and
/// its reservation keeps its estimate until it expires (the safe side: a
/// call is never charged less than it used).
const MAX_WAITING_SETTLES: usize = 100_000;

/// The places to wait in: a settle takes one for as long as it waits.
static WAITING_SETTLES: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(MAX_WAITING_SETTLES);

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
    type ProcessStream = ExchangeStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let route = route_metadata(request.metadata());
        Ok(Response::new(ExchangeStream {
            gate: self.gate.clone(),
            inbound: request.into_inner(),
            exchange: Some(Exchange::new(route)),
            deciding: None,
            ended: false,
        }))
    }
}

/// A decision under way, holding its exchange until the store answers.
type Deciding = Pin<Box<dyn Future<Output = (Exchange, ProcessingResponse)> + Send>>;

/// The replies of one `Process` stream: each inbound message is read and
/// answered in the reply stream's own poll, with no task or channel of its
/// own. Only a decision waits (on the store); every other reply is made at
/// once. When the exchange ends (Envoy half-closes, the stream fails, an
/// `ImmediateResponse` went out) or Envoy drops the stream, it is
/// finished: settled, or released, off the reply path.
pub struct ExchangeStream {
    gate: Arc<Gate>,
    inbound: Streaming<ProcessingRequest>,
    /// None while a decision holds it, and once finished.
    exchange: Option<Exchange>,
    deciding: Option<Deciding>,
    /// No more replies: the next poll ends the stream.
    ended: bool,
}

impl ExchangeStream {
    /// Hands out a reply; the one that ends the exchange (an
    /// `ImmediateResponse`) finishes it.
    fn deliver(
        &mut self,
        reply: ProcessingResponse,
    ) -> Poll<Option<Result<ProcessingResponse, Status>>> {
        if matches!(reply.response, Some(Reply::ImmediateResponse(_))) {
            self.end();
        }
        Poll::Ready(Some(Ok(reply)))
    }

    fn end(&mut self) {
        self.ended = true;
        if let Some(exchange) = self.exchange.take() {
            exchange.finish(self.gate.clone());
        }
    }
}

impl Stream for ExchangeStream {
    type Item = Result<ProcessingResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(deciding) = &mut this.deciding {
                let (exchange, reply) = ready!(deciding.as_mut().poll(cx));
                this.deciding = None;
                this.exchange = Some(exchange);
                return this.deliver(reply);
            }
            if this.ended {
                return Poll::Ready(None);
            }
            let message = match ready!(Pin::new(&mut this.inbound).poll_next(cx)) {
                Some(Ok(message)) => message,
                // Envoy half-closed the stream, or it failed.
                Some(Err(_)) | None => {
                    this.end();
                    return Poll::Ready(None);
                }
            };
            let Some(message) = message.request else {
                continue;
            };
            let Some(exchange) = this.exchange.as_mut() else {
                return broken("a message came with no exchange to take it");
            };
            match exchange.step(&this.gate, message) {
                Step::Reply(reply) => return this.deliver(reply),
                Step::Undecided => {
                    this.end();
                    return broken("the response began before any request message was decided");
                }
                Step::Decide(phase) => {
                    let (Some(mut exchange), gate) = (this.exchange.take(), this.gate.clone())
                    else {
                        return broken("a decision was asked for with no exchange");
                    };
                    this.deciding = Some(Box::pin(async move {
                        let reply = exchange.decide(&gate, phase).await;
                        (exchange, reply)
                    }));
                }
            }
        }
    }
}

/// Ends the stream with an error status. An OK close would tell Envoy to
/// carry on without processing, which would let the call through
/// unmetered; an error makes Envoy apply `failure_mode_allow: false`.
fn broken(what: &str) -> Poll<Option<Result<ProcessingResponse, Status>>> {
    tracing::error!(what, "ext_proc exchange in a state it cannot be in");
    Poll::Ready(Some(Err(Status::internal(format!(
        "tollgate ext_proc: {what}"
    )))))
}

impl Drop for ExchangeStream {
    /// Envoy closed the stream before its end (the client went away, a
    /// timeout): what was seen is settled all the same, and a decision
    /// under way runs to its end first, so that its reservation is not
    /// left to expire.
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if let Some(deciding) = self.deciding.take() {
            let gate = self.gate.clone();
            runtime.spawn(async move {
                let (exchange, _) = deciding.await;
                exchange.finish(gate);
            });
        } else if let Some(exchange) = self.exchange.take() {
            let _enter = runtime.enter();
            exchange.finish(self.gate.clone());
        }
    }
}

/// What an inbound message needs: a reply now, or a decision first.
/// Returned and matched at once, never kept: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Step {
    Reply(ProcessingResponse),
    Decide(Phase),
    /// The response began with no decision made.
    Undecided,
}

/// The request message a decision answers: its reply must be of the same
/// kind, or Envoy fails the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Headers,
    Body,
    Trailers,
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
    /// The decision, for the top-ups.
    decision: Arc<Decision>,
    /// It was decided on the request's body (else on its headers alone).
    with_body: bool,
    /// The response is an event stream.
    event_stream: bool,
    /// The API the request called, if tollgate reads it.
    api: Option<Api>,
    overrun: Overrun,
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
    /// A decision was made (allowed or not): every call gets one before
    /// its response.
    decided: bool,
}

impl Exchange {
    fn new(route: HashMap<String, String>) -> Exchange {
        Exchange {
            route,
            headers: Vec::new(),
            body: Vec::new(),
            admitted: None,
            downstream: Vec::new(),
            decided: false,
        }
    }

    /// Answers one message, or says that it needs a decision first
    /// ([`Exchange::decide`]): nothing else here waits.
    fn step(&mut self, gate: &Arc<Gate>, message: Msg) -> Step {
        Step::Reply(match message {
            Msg::RequestHeaders(h) => {
                let end_of_stream = h.end_of_stream;
                self.headers = header_pairs(h);
                if end_of_stream {
                    return Step::Decide(Phase::Headers);
                }
                reply(Reply::RequestHeaders(HeadersResponse::default()))
            }
            Msg::RequestBody(b) => {
                if self.body.is_empty() && b.body.len() <= MAX_REQUEST_BODY {
                    // The whole body in one message, as Envoy buffers it:
                    // kept as it came.
                    self.body = b.body;
                } else {
                    let room = MAX_REQUEST_BODY.saturating_sub(self.body.len());
                    self.body
                        .extend_from_slice(&b.body[..b.body.len().min(room)]);
                }
                // Decided at the first body message, whether or not it
                // ends the body: a buffered body followed by trailers
                // comes without `end_of_stream` (and nothing follows it
                // while trailers are skipped), as does a prefix cut at the
                // buffer. Waiting for the end would let such a call go
                // upstream undecided.
                if !self.decided {
                    return Step::Decide(Phase::Body);
                }
                reply(Reply::RequestBody(BodyResponse::default()))
            }
            // A response to a call nothing decided (a processing mode that
            // sends no request message tollgate could decide on) must not
            // pass: an error status makes Envoy fail the request.
            Msg::ResponseHeaders(_) if !self.decided => return Step::Undecided,
            Msg::ResponseHeaders(h) => self.response_headers(h),
            Msg::ResponseBody(b) => self.response_body(gate, b),
            // Headers and trailers with no body between: the trailers are
            // the last request message.
            Msg::RequestTrailers(_) if !self.decided => return Step::Decide(Phase::Trailers),
            Msg::RequestTrailers(_) => reply(Reply::RequestTrailers(TrailersResponse::default())),
            Msg::ResponseTrailers(_) => {
                if let Some(a) = &mut self.admitted {
                    a.completed = true;
                }
                reply(Reply::ResponseTrailers(TrailersResponse::default()))
            }
        })
    }

    fn response_body(&mut self, gate: &Arc<Gate>, b: HttpBody) -> ProcessingResponse {
        let mut response = BodyResponse::default();
        let Some(a) = &mut self.admitted else {
            return reply(Reply::ResponseBody(response));
        };
        if a.overrun.state == OverrunState::CutSent {
            return reset_after_cut(a.overrun.reason);
        }
        if let Some(meter) = &mut a.meter {
            meter.feed(&b.body);
        }
        a.completed |= b.end_of_stream;
        let mut body = None;
        if let Some(splitter) = &mut a.rewrite {
            let rewritten = without_added_usage(splitter, &b.body, b.end_of_stream);
            if rewritten != b.body {
                body = Some(rewritten);
            }
        }
        let counted = a.meter.as_ref().map(Meter::counted_output_tokens);
        if let (Some(counted), true) = (counted, (200..300).contains(&a.upstream_status)) {
            let (route, headers, request_body) = (&self.route, &self.headers, &self.body);
            let with_body = a.with_body;
            let input =
                || request_input(&a.policy, route, headers, with_body.then_some(request_body));
            let cut =
                a.overrun
                    .after_chunk(gate, &a.policy, &a.decision, a.event_stream, counted, input);
            let delivered = body.as_deref().unwrap_or(&b.body);
            let replaced = match (cut, a.api) {
                (true, Some(api)) => a.overrun.cut(api, delivered),
                _ => None,
            };
            match replaced {
                Some(replaced) => body = Some(replaced),
                None if a.event_stream => a.overrun.edge.feed(delivered),
                None => {}
            }
        }
        if let Some(body) = body {
            response.response = Some(CommonResponse {
                body_mutation: Some(BodyMutation {
                    mutation: Some(body_mutation::Mutation::Body(body)),
                }),
                ..Default::default()
            });
        }
        reply(Reply::ResponseBody(response))
    }

    /// Decides the request, in the reply to its headers (no body) or to its
    /// body.
    async fn decide(&mut self, gate: &Gate, phase: Phase) -> ProcessingResponse {
        self.decided = true;
        // Only a body message carries the body: decided on headers or on
        // trailers after headers alone, there is none.
        let with_body = phase == Phase::Body;
        let method = header_str(&self.headers, ":method")
            .unwrap_or_default()
            .to_string();
        let path = header_str(&self.headers, ":path")
            .unwrap_or_default()
            .to_string();
        // Envoy sets x-request-id itself at the edge (replacing a client's,
        // unless told to keep it), as it does for ext_authz's `http.id`.
        let envoy_id = header_str(&self.headers, "x-request-id").map(str::to_string);
        // The headers are lent to the decision, not copied: the top-ups
        // read them again.
        let mut headers = std::mem::take(&mut self.headers);
        let marked = mark_partial(&mut headers, self.body.len());
        // Only a whole body can be rewritten.
        let whole_body = with_body && !marked;
        let view = HttpRequest {
            method: &method,
            path: &path,
            headers,
            context: Some(&self.route),
            body: with_body.then_some(&self.body[..]),
            proxy_request_id: envoy_id.as_deref(),
        };
        // A downgrade is real only where the body that goes upstream names
        // the model, and is rewritten: not a Gemini call, whose model is in
        // its path, nor one without a body.
        let front_end = FrontEnd {
            rewrites_body: whole_body && model_in_body(&path),
            // ext_proc settles every call when it ends, whatever the
            // policy or the route says for ext_authz.
            settles: true,
        };
        let answer = authorize(gate, &view, front_end).await;
        self.headers = view.headers;
        if marked {
            self.headers.pop();
        }
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
        if whole_body {
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
                decision: Arc::new(decision),
                with_body,
                event_stream: false,
                api: None,
                overrun: Overrun::default(),
                input_estimate: (self.body.len() as u64).div_ceil(CHARS_PER_TOKEN),
                meter: None,
                upstream_status: 0,
                completed: false,
                asked_for_usage,
                rewrite: None,
            });
        }
        match phase {
            Phase::Body => reply(Reply::RequestBody(BodyResponse {
                response: Some(common),
            })),
            Phase::Headers => reply(Reply::RequestHeaders(HeadersResponse {
                response: Some(common),
            })),
            // The headers went upstream already: what is left to change
            // is the trailers, which tollgate does not.
            Phase::Trailers => reply(Reply::RequestTrailers(TrailersResponse::default())),
        }
    }

    fn response_headers(&mut self, h: HttpHeaders) -> ProcessingResponse {
        let end_of_stream = h.end_of_stream;
        let pairs = header_pairs(h);
        let status = header_str(&pairs, ":status")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let event_stream =
            header_str(&pairs, "content-type").is_some_and(|c| c.starts_with("text/event-stream"));
        let path = header_str(&self.headers, ":path").unwrap_or("");
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
                a.event_stream = event_stream;
                a.api = Api::from_path(path);
                a.meter = a.api.map(|api| Meter::new(api, event_stream));
                if a.asked_for_usage && event_stream && (200..300).contains(&status) {
                    a.rewrite = Some(Splitter::new(Splitter::DEFAULT_MAX_EVENT_BYTES));
                }
                if end_of_stream {
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
        // Every top-up is given back whole: the settle above charges
        // what the call used.
        for id in a.overrun.top_ups {
            tokio::spawn(release_with_retries(gate.clone(), id));
        }
        if let Some((_, pending)) = a.overrun.pending {
            let gate = gate.clone();
            tokio::spawn(async move {
                if let Ok(Ok(TopUp::Reserved(id))) = pending.await {
                    release_with_retries(gate, id).await;
                }
            });
        }
        // An upstream error whose cost the policy says to keep is charged
        // at the estimate; its slots are given back all the same.
        let failed = a.upstream_status >= 400;
        if failed && a.policy.set.attributes.on_upstream_error == OnUpstreamError::KeepEstimate {
            let id = a.reservation_id;
            tokio::spawn(async move {
                with_retries(&id, || gate.keep_estimate(&id)).await;
            });
            return;
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

/// The method, the path and the headers the request is decided on. A
/// body cut at Envoy's buffer (BUFFERED_PARTIAL) is read as a prefix,
/// with the input estimated from its declared length.
fn request_parts(
    headers: &[(String, Vec<u8>)],
    body_len: usize,
) -> (&str, &str, Vec<(String, Vec<u8>)>) {
    let method = header_str(headers, ":method").unwrap_or_default();
    let path = header_str(headers, ":path").unwrap_or_default();
    let mut headers = headers.to_vec();
    mark_partial(&mut headers, body_len);
    (method, path, headers)
}

/// Marks a body shorter than the request's declared length as Envoy's
/// ext_authz marks a partial one (`x-envoy-auth-partial-body: true`, the
/// last header); says whether it did.
fn mark_partial(headers: &mut Vec<(String, Vec<u8>)>, body_len: usize) -> bool {
    let declared: Option<usize> =
        header_str(headers, "content-length").and_then(|v| v.parse().ok());
    let partial = declared.is_some_and(|n| n > body_len);
    if partial {
        headers.push(("x-envoy-auth-partial-body".to_string(), b"true".to_vec()));
    }
    partial
}

/// A header's value, if it is there and UTF-8.
fn header_str<'h>(headers: &'h [(String, Vec<u8>)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

/// The request as it was decided, read again on the snapshot that
/// decided it: what a top-up reserves on.
fn request_input(
    policy: &CompiledPolicy,
    route: &HashMap<String, String>,
    headers: &[(String, Vec<u8>)],
    body: Option<&Vec<u8>>,
) -> Option<CheckInput> {
    // The decision's request id, so that the decision log ties each
    // top-up to its call (a top-up itself is never replayed by it).
    let envoy_id = header_str(headers, "x-request-id");
    let (method, path, headers) = request_parts(headers, body.map_or(0, Vec::len));
    let view = HttpRequest {
        method,
        path,
        headers,
        context: Some(route),
        body: body.map(|b| &b[..]),
        proxy_request_id: envoy_id,
    };
    let mut input = check_input(&policy.set.attributes, &view).ok()?;
    // Settled with the call, as the decision was.
    input.estimate_is_final = false;
    Some(input)
}

/// The least a top-up reserves, in output tokens.
const MIN_TOP_UP: u64 = 1_000;

/// The most one top-up reserves, in output tokens.
const MAX_TOP_UP: u64 = 32_000;

/// Keeps a response covered while it streams past what its reservation
/// covered (the request's output estimate, or the default output).
///
/// When the output counted so far nears the coverage, a top-up reserves
/// more ([`Gate::top_up`]), off the reply path: no chunk's reply waits
/// for the store (Envoy's `message_timeout` applies to every message). A
/// later chunk reads its answer. A top-up follows the stream's rate: it
/// reserves what the stream has used so far (the first one half the first
/// coverage), at least [`MIN_TOP_UP`] and at most [`MAX_TOP_UP`] output
/// tokens, so that the coverage about doubles with each and an answer of
/// N tokens needs about log2(N / 1,000) store calls, not N / 1,000. A
/// top-up larger than the first that finds no room is asked again at the
/// first one's size (and later ones stay at it): near the limit, the
/// stream takes what is left in small steps. When the exchange ends, the
/// first reservation is settled at what the call used and every top-up
/// is given back whole, so the net charge is the real usage.
///
/// When a top-up finds no room, the rules that blocked it decide: if one
/// says `on_overrun: cut` and the response is an event stream, the next
/// chunk past the coverage is replaced by an error event the official
/// SDKs raise (Anthropic's `event: error`; for the OpenAI APIs a `data:`
/// line with an `error` object), and the reply to the message after it
/// is an `ImmediateResponse`, which, once the response has started
/// downstream, makes Envoy reset the stream: that also stops the upstream
/// generating. Bytes Envoy had not yet flushed to the client when it
/// resets (the error event among them) can be lost with the reset.
/// Otherwise (`finish`, the default, or a body that is not an event
/// stream) the response runs to its end and is charged what it used,
/// which may pass the limit.
///
/// A top-up the store fails is judged by the rules' `on_store_error`, as
/// a decision is: when one of the top-up's rules fails closed and says
/// `on_overrun: cut`, an event stream is cut the same way, past its
/// coverage, with an error event that names the store; otherwise the
/// response finishes. Every top-up's outcome is logged and counted in
/// `tollgate_ext_proc_top_ups_total{outcome}` (`reserved`, `no_room`,
/// `store_error`, `error`).
#[derive(Default)]
struct Overrun {
    /// What the first reservation covered: read from the request at the
    /// first chunk that counts output.
    coverage: Option<Coverage>,
    state: OverrunState,
    /// A top-up under way, and the output tokens it asked for.
    pending: Option<(u64, oneshot::Receiver<Result<TopUp, GateError>>)>,
    /// The top-ups made, to give back at the end.
    top_ups: Vec<String>,
    /// The rules that had no room (or failed closed), for the error event.
    rules: Vec<String>,
    /// Why the stream is cut, for the error event.
    reason: CutReason,
    /// Where the bytes the client got so far stop, in the event stream.
    edge: SseEdge,
}

struct Coverage {
    input: Arc<CheckInput>,
    /// Output tokens the reservations cover so far.
    covered: u64,
    /// The first top-up's size, in output tokens: half the first
    /// coverage, at least [`MIN_TOP_UP`].
    base: u64,
    /// Top-ups grow with the stream; false once a larger one found no
    /// room.
    grow: bool,
}

impl Coverage {
    /// The next top-up's size, once the stream has counted `counted`.
    fn step(&self, counted: u64) -> u64 {
        if self.grow {
            counted.clamp(self.base, self.base.max(MAX_TOP_UP))
        } else {
            self.base
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum OverrunState {
    /// Topping up as the output grows.
    #[default]
    Topping,
    /// No more top-ups: the response runs to its end.
    Finish,
    /// No room, and a rule says cut: at the next chunk past the coverage.
    CutPast,
    /// The error event went out; the next message ends the exchange.
    CutSent,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum CutReason {
    /// The rules' budget is spent.
    #[default]
    NoRoom,
    /// The store failed a top-up under a rule that fails closed.
    StoreFault,
}

/// The rules a top-up reserves on (the decision's enforced counters of
/// what output adds to: tokens, output tokens, spend) whose
/// `on_store_error` is `fail_closed`, and whether one of them says
/// `on_overrun: cut`: what a store fault during a top-up is judged by.
fn fail_closed_rules(policy: &CompiledPolicy, decision: &Decision) -> (Vec<String>, bool) {
    let mut rules: Vec<String> = Vec::new();
    let mut cut = false;
    for counter in &decision.counters {
        let counts_output = matches!(
            counter.unit,
            Unit::OutputTokens | Unit::Tokens | Unit::Spend
        );
        if !counter.enforced || !counts_output || rules.contains(&counter.rule) {
            continue;
        }
        let Some(rule) = policy.rules().iter().find(|r| r.id == counter.rule) else {
            continue;
        };
        if rule.on_store_error == StoreFailure::FailClosed {
            cut |= rule.on_overrun == OnOverrun::Cut;
            rules.push(rule.id.clone());
        }
    }
    (rules, cut)
}

/// Counts a top-up's outcome.
fn count_top_up(outcome: &'static str) {
    metrics::counter!(names::EXT_PROC_TOP_UPS, "outcome" => outcome).increment(1);
}

impl Overrun {
    /// After a chunk that brought the counted output to `counted`: reads
    /// a top-up's answer if one is in, starts one if the output nears the
    /// coverage, and says whether to cut the stream at this chunk.
    fn after_chunk(
        &mut self,
        gate: &Arc<Gate>,
        policy: &Arc<CompiledPolicy>,
        decision: &Arc<Decision>,
        event_stream: bool,
        counted: u64,
        input: impl FnOnce() -> Option<CheckInput>,
    ) -> bool {
        if counted == 0 || matches!(self.state, OverrunState::Finish | OverrunState::CutSent) {
            return false;
        }
        let coverage = match &mut self.coverage {
            Some(c) => c,
            None => {
                let Some(input) = input() else {
                    self.state = OverrunState::Finish;
                    return false;
                };
                let covered = reserved_output_tokens(policy, &input, decision);
                self.coverage.insert(Coverage {
                    input: Arc::new(input),
                    covered,
                    base: (covered / 2).max(MIN_TOP_UP),
                    grow: true,
                })
            }
        };
        if let Some((asked, pending)) = &mut self.pending {
            let asked = *asked;
            let answer = match pending.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => None,
                Ok(answer) => Some(answer),
                Err(oneshot::error::TryRecvError::Closed) => {
                    Some(Err(GateError::UnknownReservation(String::new())))
                }
            };
            if let Some(answer) = answer {
                self.pending = None;
                let reservation = &decision.reservation_id;
                match answer {
                    Ok(TopUp::Reserved(id)) => {
                        count_top_up("reserved");
                        coverage.covered = coverage.covered.saturating_add(asked);
                        tracing::debug!(
                            reservation = reservation.as_deref(),
                            top_up = id,
                            output_tokens = asked,
                            covered = coverage.covered,
                            "stream topped up"
                        );
                        self.top_ups.push(id);
                    }
                    Ok(TopUp::Unmetered) => self.state = OverrunState::Finish,
                    Ok(TopUp::NoRoom { .. }) if asked > coverage.base => {
                        // Asked again at the first size, below.
                        count_top_up("no_room");
                        coverage.grow = false;
                    }
                    Ok(TopUp::NoRoom { cut, rules }) => {
                        count_top_up("no_room");
                        let cut = cut && event_stream;
                        tracing::info!(
                            reservation = reservation.as_deref(),
                            rules = ?rules,
                            output_tokens = counted,
                            cut,
                            "no room to top the stream up"
                        );
                        self.state = if cut {
                            OverrunState::CutPast
                        } else {
                            OverrunState::Finish
                        };
                        self.rules = rules;
                    }
                    Err(GateError::Store(error)) => {
                        count_top_up("store_error");
                        let (rules, cut) = fail_closed_rules(policy, decision);
                        let cut = cut && event_stream;
                        tracing::warn!(
                            reservation = reservation.as_deref(),
                            error = %error,
                            fail_closed = ?rules,
                            cut,
                            "counter store fault while topping a stream up; {}",
                            if cut {
                                "it is cut past its coverage"
                            } else {
                                "it runs to its end"
                            }
                        );
                        if cut {
                            self.state = OverrunState::CutPast;
                            self.reason = CutReason::StoreFault;
                            self.rules = rules;
                        } else {
                            self.state = OverrunState::Finish;
                        }
                    }
                    Err(e) => {
                        count_top_up("error");
                        tracing::warn!(
                            reservation = reservation.as_deref(),
                            error = %e,
                            "top-up failed; the response runs to its end"
                        );
                        self.state = OverrunState::Finish;
                    }
                }
            }
        }
        match self.state {
            OverrunState::Topping => {
                let step = coverage.step(counted);
                let margin = coverage.covered.min(step) / 4;
                if self.pending.is_none() && counted >= coverage.covered - margin {
                    let (tx, rx) = oneshot::channel();
                    self.pending = Some((step, rx));
                    let (gate, policy, decision) = (gate.clone(), policy.clone(), decision.clone());
                    let input = coverage.input.clone();
                    tokio::spawn(async move {
                        let answer = gate.top_up(&policy, &input, &decision, step).await;
                        // The exchange is gone without reading it: give
                        // it back here.
                        if let Err(Ok(TopUp::Reserved(id))) = tx.send(answer) {
                            release_with_retries(gate, id).await;
                        }
                    });
                }
                false
            }
            OverrunState::CutPast => counted > coverage.covered,
            OverrunState::Finish | OverrunState::CutSent => false,
        }
    }

    /// The chunk that ends a cut stream, in place of `delivered` (what
    /// the client would have got of this chunk): what completes an event
    /// the client has part of, then the error event. None when this
    /// chunk does not complete it (one event spread over many chunks):
    /// the chunk goes through and the next one is cut.
    fn cut(&mut self, api: Api, delivered: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        if !self.edge.between_events() {
            let end = self.edge.clone().end_of_event(delivered)?;
            out.extend_from_slice(&delivered[..end]);
        }
        out.extend_from_slice(&match self.reason {
            CutReason::NoRoom => error_event(api, &self.rules),
            CutReason::StoreFault => store_fault_event(api, &self.rules),
        });
        self.state = OverrunState::CutSent;
        Some(out)
    }
}

/// Where an event stream stops: between events, or inside one.
#[derive(Debug, Clone)]
struct SseEdge {
    line_start: bool,
    event_start: bool,
    /// The last byte was a CR: an LF now ends the same line.
    after_cr: bool,
}

impl Default for SseEdge {
    fn default() -> Self {
        SseEdge {
            line_start: true,
            event_start: true,
            after_cr: false,
        }
    }
}

impl SseEdge {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.step(b);
        }
    }

    fn step(&mut self, b: u8) {
        let after_cr = std::mem::replace(&mut self.after_cr, false);
        match b {
            b'\n' if after_cr => {}
            b'\r' | b'\n' => {
                // An empty line ends the event.
                if self.line_start {
                    self.event_start = true;
                }
                self.line_start = true;
                self.after_cr = b == b'\r';
            }
            _ => {
                self.line_start = false;
                self.event_start = false;
            }
        }
    }

    fn between_events(&self) -> bool {
        self.event_start
    }

    /// The length of `bytes` up to the end of the event in progress
    /// (its line ending whole), if it ends in them.
    fn end_of_event(mut self, bytes: &[u8]) -> Option<usize> {
        let at = bytes.iter().position(|&b| {
            self.step(b);
            self.event_start
        })?;
        let crlf = bytes[at] == b'\r' && bytes.get(at + 1) == Some(&b'\n');
        Some(at + 1 + usize::from(crlf))
    }
}

/// The error event that ends a cut stream, as each API's official SDK
/// raises it: the Anthropic SDK on an `error` event only, the OpenAI SDKs
/// on a `data:` line whose object has an `error`.
fn error_event(api: Api, rules: &[String]) -> Vec<u8> {
    let message = format!(
        "budget exceeded: the response used all that {} leaves, and tollgate stopped it",
        named(rules, "its budget")
    );
    api_error_event(
        api,
        &message,
        ("budget_exceeded", "insufficient_quota", "budget_exceeded"),
    )
}

/// The error event that ends a stream cut because the counter store
/// failed its top-up under a rule that fails closed.
fn store_fault_event(api: Api, rules: &[String]) -> Vec<u8> {
    let message = format!(
        "the counter store could not cover the rest of the response under {}, which fails \
         closed, and tollgate stopped it",
        named(rules, "its rules")
    );
    api_error_event(
        api,
        &message,
        ("api_error", "server_error", "store_unavailable"),
    )
}

fn named(rules: &[String], none: &str) -> String {
    match rules {
        [] => none.to_string(),
        [one] => format!("rule `{one}`"),
        many => format!(
            "rules {}",
            many.iter()
                .map(|r| format!("`{r}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// `kinds`: the Anthropic error type, then the OpenAI type and code.
fn api_error_event(api: Api, message: &str, kinds: (&str, &str, &str)) -> Vec<u8> {
    let (anthropic_type, openai_type, openai_code) = kinds;
    match api {
        Api::Anthropic => {
            let data = serde_json::json!({
                "type": "error",
                "error": {"type": anthropic_type, "message": message},
            });
            format!("event: error\ndata: {data}\n\n").into_bytes()
        }
        _ => {
            let data = serde_json::json!({
                "error": {
                    "message": message,
                    "type": openai_type,
                    "code": openai_code,
                },
            });
            format!("data: {data}\n\n").into_bytes()
        }
    }
}

/// The reply to the message after a cut's error event: once the response
/// has started downstream, Envoy resets the stream on it.
fn reset_after_cut(reason: CutReason) -> ProcessingResponse {
    let (code, details) = match reason {
        CutReason::NoRoom => (429, "tollgate_budget_exceeded"),
        CutReason::StoreFault => (503, "tollgate_store_unavailable"),
    };
    reply(Reply::ImmediateResponse(ImmediateResponse {
        status: Some(HttpStatus { code }),
        details: details.to_string(),
        ..Default::default()
    }))
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
            reasoning_tokens: r.reasoning_tokens,
            cache_write_tokens: r.cache_write_tokens,
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
    with_retries(&reservation_id, || {
        gate.settle_on(&policy, &reservation_id, &actual, served.as_deref())
    })
    .await;
}

/// Gives a top-up back whole, retrying as a settle does.
async fn release_with_retries(gate: Arc<Gate>, reservation_id: String) {
    with_retries(&reservation_id, || gate.release(&reservation_id)).await;
}

async fn with_retries<F, Fut>(reservation_id: &str, call: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<SettleOutcome, GateError>>,
{
    retried_within(&WAITING_SETTLES, reservation_id, call).await;
}

async fn retried_within<F, Fut>(waiting: &tokio::sync::Semaphore, reservation_id: &str, mut call: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<SettleOutcome, GateError>>,
{
    let deadline = tokio::time::Instant::now() + SETTLE_PATIENCE;
    let mut backoff = SETTLE_BACKOFF.0;
    let mut slot = None;
    loop {
        match call().await {
            Ok(SettleOutcome::Settled | SettleOutcome::AlreadySettled) => return,
            Ok(SettleOutcome::Unknown) | Err(GateError::UnknownReservation(_)) => {
                tracing::warn!(
                    reservation = reservation_id,
                    "reservation gone before its settle; it expired with its estimate charged"
                );
                return;
            }
            Err(GateError::Store(e)) if tokio::time::Instant::now() < deadline => {
                if slot.is_none() {
                    slot = waiting.try_acquire().ok();
                    if slot.is_none() {
                        tracing::warn!(reservation = reservation_id, error = %e, "too many settles waiting for the store; this one keeps its estimate until it expires");
                        metrics::counter!(names::SETTLES_ABANDONED).increment(1);
                        return;
                    }
                }
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

/// Whether the model a call runs is the one its body names, so that a
/// rewritten body changes it: not on Gemini's `/models/{model}:...` paths.
fn model_in_body(path: &str) -> bool {
    !path.contains("/models/")
}

/// The request body to send upstream instead, if it must change: on a
/// downgrade, the cheaper model in place of the one asked for; and an
/// OpenAI stream that does not ask for its usage is made to, so that it
/// can be settled at what it really used.
fn rewritten_body(body: &[u8], decision: &Decision, path: &str) -> Option<Rewritten> {
    let downgrade = decision
        .model
        .as_deref()
        .filter(|_| decision.verdict == Verdict::Downgrade && model_in_body(path));
    // Most calls need no rewrite; a call that might stream is parsed only
    // when its body mentions `stream` at all.
    let openai_stream = matches!(
        Api::from_path(path),
        Some(Api::OpenAiChat | Api::OpenAiCompletions)
    ) && body.windows(8).any(|w| w == b"\"stream\"");
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

/// The headers of a headers message, read as ext_authz reads them
/// ([`super::http_request::envoy_header`]), taken over without copying.
fn header_pairs(h: HttpHeaders) -> Vec<(String, Vec<u8>)> {
    h.headers
        .into_iter()
        .flat_map(|map| map.headers)
        .map(|h| {
            let (mut key, value) = if h.raw_value.is_empty() {
                (h.key, h.value.into_bytes())
            } else {
                (h.key, h.raw_value)
            };
            key.make_ascii_lowercase();
            (key, value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Past its bound of settles waiting for a retry, a settle that fails
    /// on the store is given up at once instead of waiting too; one that
    /// gets through frees its place.
    #[tokio::test]
    async fn settles_waiting_for_the_store_are_bounded() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tollgate_core::store::StoreError;
        static WAITING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
        let down = || async { Err(GateError::Store(StoreError::Unavailable("down".into()))) };
        let first_calls = Arc::new(AtomicUsize::new(0));
        let calls = first_calls.clone();
        let waiting = tokio::spawn(async move {
            retried_within(&WAITING, "r1", || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n < 3 {
                        Err(GateError::Store(StoreError::Unavailable("down".into())))
                    } else {
                        Ok(SettleOutcome::Settled)
                    }
                }
            })
            .await
        });
        while WAITING.available_permits() == 1 {
            tokio::task::yield_now().await;
        }
        // The one place is taken: a second failing settle tries once.
        let second_calls = AtomicUsize::new(0);
        retried_within(&WAITING, "r2", || {
            second_calls.fetch_add(1, Ordering::SeqCst);
            down()
        })
        .await;
        assert_eq!(second_calls.load(Ordering::SeqCst), 1);
        waiting.await.unwrap();
        assert_eq!(
            first_calls.load(Ordering::SeqCst),
            4,
            "retried until through"
        );
        assert_eq!(WAITING.available_permits(), 1, "its place is given back");
    }

    /// Anthropic's cache writes reach the settle apart from the rest of the
    /// input, so that they are priced at their own rate.
    #[test]
    fn an_anthropic_responses_cache_writes_are_settled_as_cache_writes() {
        let mut meter =
            crate::server::meter::Meter::new(crate::server::meter::Api::Anthropic, false);
        meter.feed(br#"{"model":"claude-sonnet-4-5","usage":{"input_tokens":20,"cache_creation_input_tokens":300,"cache_read_input_tokens":1000,"output_tokens":7}}"#);
        let metered = meter.finish();
        let (actual, served) = settle_usage(50, 200, Some(&metered));
        assert_eq!(served.as_deref(), Some("claude-sonnet-4-5"));
        assert_eq!(actual.input_tokens, 1320);
        assert_eq!(actual.cached_input_tokens, 1000);
        assert_eq!(actual.cache_write_tokens, 300);
        assert_eq!(actual.output_tokens, 7);
    }

    /// A body Envoy cut at its buffer (BUFFERED_PARTIAL sends a prefix, and
    /// the request keeps its own content-length) is read as ext_authz reads
    /// a partial body: the model and output cap from the prefix, the input
    /// from the declared length.
    #[test]
    fn a_five_megabyte_prompt_cut_at_the_buffer_is_priced_from_its_prefix() {
        let mut prefix = String::from(
            r#"{"model":"gpt-4o","max_tokens":500,"messages":[{"role":"user","content":""#,
        );
        prefix.push_str(&"a".repeat(1024 * 1024 - prefix.len()));
        let headers = vec![
            (":method".to_string(), b"POST".to_vec()),
            (":path".to_string(), b"/v1/chat/completions".to_vec()),
            ("content-length".to_string(), b"5000000".to_vec()),
        ];
        let (method, path, headers) = request_parts(&headers, prefix.len());
        let view = HttpRequest {
            method,
            path,
            headers,
            context: None,
            body: Some(prefix.as_bytes()),
            proxy_request_id: None,
        };
        let input = check_input(&Default::default(), &view).unwrap();
        assert_eq!(input.attributes.model.as_deref(), Some("gpt-4o"));
        assert_eq!(input.estimate.output_tokens, Some(500));
        assert_eq!(input.estimate.input_tokens, Some(1_250_000));
    }
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

    #[test]
    fn a_cut_completes_the_event_the_client_has_part_of_then_sends_the_error() {
        let stream = "data: {\"a\":1}\r\n\r\ndata: {\"b\":2}\n\nevent: x\rdata: {}\r\r";
        let bytes = stream.as_bytes();
        // Where the client is between events, and where each event ends
        // (the LF of a CRLF with it).
        let between = [0, 16, 17, 32, bytes.len()];
        let ends = [17, 32, bytes.len()];
        for at in 0..=bytes.len() {
            let mut overrun = Overrun::default();
            overrun.edge.feed(&bytes[..at]);
            let rest = &bytes[at..];
            match overrun.cut(Api::OpenAiChat, rest) {
                Some(out) => {
                    let kept = if between.contains(&at) {
                        0
                    } else {
                        ends.iter().find(|&&e| e > at).unwrap() - at
                    };
                    let mut want = rest[..kept].to_vec();
                    want.extend(error_event(Api::OpenAiChat, &[]));
                    assert_eq!(
                        String::from_utf8_lossy(&out),
                        String::from_utf8_lossy(&want),
                        "at {at}"
                    );
                    assert_eq!(overrun.state, OverrunState::CutSent);
                }
                None => panic!("at {at}: the event ends in the rest"),
            }
        }
        // An event that does not end in the chunk is let through whole.
        let mut overrun = Overrun::default();
        overrun.edge.feed(b"data: {\"a\":");
        assert_eq!(overrun.cut(Api::Anthropic, b"\"long"), None);
    }

    #[test]
    fn the_error_event_is_each_apis_own() {
        let anthropic =
            String::from_utf8(error_event(Api::Anthropic, &["r1".to_string()])).unwrap();
        let data = anthropic
            .strip_prefix("event: error\ndata: ")
            .unwrap()
            .strip_suffix("\n\n")
            .unwrap();
        let json: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(json["type"], "error");
        assert_eq!(json["error"]["type"], "budget_exceeded");
        assert!(json["error"]["message"].as_str().unwrap().contains("`r1`"));
        let openai = String::from_utf8(error_event(Api::OpenAiResponses, &[])).unwrap();
        let data = openai
            .strip_prefix("data: ")
            .unwrap()
            .strip_suffix("\n\n")
            .unwrap();
        let json: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(json["error"]["code"], "budget_exceeded");
        assert_eq!(json["error"]["type"], "insufficient_quota");
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
