//! A fake Envoy for the ext_proc service: it plays the HTTP filter side of
//! `envoy.service.ext_proc.v3.ExternalProcessor/Process`, one bidirectional
//! stream per HTTP exchange, message by message as Envoy sends them, and
//! enforces on every reply what Envoy enforces.
//!
//! The processing mode is the shipped one (deploy/envoy/envoy.yaml):
//! request headers SEND, request body BUFFERED, response headers SEND,
//! response body STREAMED, request trailers SEND (this fake sends none),
//! response trailers SKIP, `allow_mode_override: true`,
//! `failure_mode_allow: false`. Each rule is cited next to the code that
//! enforces it; "Envoy" below means upstream Envoy at 1.27 or later. The
//! sources cited are in Envoy's tree: ext_proc.cc, processor_state.cc,
//! mutation_utils.cc and client_impl.cc in
//! source/extensions/filters/http/ext_proc/; the protos
//! api/envoy/service/ext_proc/v3/external_processor.proto and
//! api/envoy/extensions/filters/http/ext_proc/v3/processing_mode.proto; the
//! filter's docs, docs/root/configuration/http/http_filters/ext_proc_filter.rst.
//!
//! A reply Envoy would reject with a local error reply (a malformed
//! mutation, a content-length that does not match a mutated body, a reply
//! of the wrong kind, no reply within `message_timeout`) is a
//! [`Violation`]: the exchange fails, naming the rule, the message sent and
//! the reply got. What Envoy silently ignores is ignored here too, and
//! listed in [`Exchange::ignored`].

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderMap, HeaderValue,
};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::{
    BodySendMode, HeaderSendMode,
};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::ProcessingMode;
use envoy_types::pb::envoy::service::ext_proc::v3::body_mutation::Mutation;
use envoy_types::pb::envoy::service::ext_proc::v3::common_response::ResponseStatus;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Msg;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Reply;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    CommonResponse, HeaderMutation, HttpBody, HttpHeaders, ImmediateResponse, ProcessingRequest,
    ProcessingResponse, ProtocolConfiguration,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// The shipped `message_timeout` (deploy/envoy/envoy.yaml): every reply
/// must arrive within it. Envoy, on a timeout with `failure_mode_allow:
/// false`, fails the request (ext_proc.cc, `onMessageTimeout`).
pub const MESSAGE_TIMEOUT: Duration = Duration::from_millis(200);

/// How long the fake waits, after its last message, for the server to end
/// the stream, to catch replies nobody asked for. Envoy itself does not
/// wait: it half-closes and resets (client_impl.cc, `close`).
const DRAIN: Duration = Duration::from_secs(1);

/// Header names and raw values, names lower case, in order.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, Vec<u8>)>);

impl std::fmt::Debug for Headers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.0
                    .iter()
                    .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v))),
            )
            .finish()
    }
}

/// Body bytes, shown as text.
struct Text<'a>(&'a [u8]);

impl std::fmt::Debug for Text<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.0))
    }
}

impl Headers {
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Headers {
        Headers(
            pairs
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec()))
                .collect(),
        )
    }

    /// The first value of `name`, if it is UTF-8.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// Every value of `name`.
    pub fn all(&self, name: &str) -> Vec<&[u8]> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|(k, _)| k == name)
    }

    pub fn remove(&mut self, name: &str) {
        self.0.retain(|(k, _)| k != name);
    }

    /// Replaces every value of `name` with one, in the first one's place.
    pub fn set(&mut self, name: &str, value: Vec<u8>) {
        match self.0.iter().position(|(k, _)| k == name) {
            Some(i) => {
                self.0[i].1 = value;
                let mut seen = 0;
                self.0.retain(|(k, _)| {
                    if k != name {
                        return true;
                    }
                    seen += 1;
                    seen == 1
                });
            }
            None => self.0.push((name.to_string(), value)),
        }
    }

    pub fn add(&mut self, name: &str, value: Vec<u8>) {
        self.0.push((name.to_string(), value));
    }

    /// UTF-8 pairs, sorted, for comparisons.
    pub fn sorted(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .0
            .iter()
            .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
            .collect();
        v.sort();
        v
    }

    /// As Envoy puts headers in a `ProcessingRequest`: names lower case,
    /// values in `raw_value` with `value` empty (the runtime guard
    /// `envoy.reloadable_features.send_header_raw_value`, on by default
    /// since 1.27; api/envoy/service/ext_proc/v3/external_processor.proto,
    /// `HttpHeaders.headers`: "The header value is encoded in the
    /// raw_value field"). With `in_value`, as Envoy did before (and does
    /// with that guard off): in `value`, with `raw_value` empty.
    fn to_proto(&self, in_value: bool) -> HeaderMap {
        HeaderMap {
            headers: self
                .0
                .iter()
                .map(|(k, v)| {
                    let (value, raw_value) = if in_value {
                        (String::from_utf8_lossy(v).into_owned(), Vec::new())
                    } else {
                        (String::new(), v.clone())
                    };
                    HeaderValue {
                        key: k.clone(),
                        value,
                        raw_value,
                    }
                })
                .collect(),
        }
    }
}

/// A step of the exchange: the message Envoy sends at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    RequestHeaders,
    RequestBody,
    ResponseHeaders,
    /// The response body chunk at this index (a final empty chunk that
    /// only carries `end_of_stream` counts as one).
    ResponseBody(usize),
}

/// A client's HTTP request, as it reaches Envoy, and how the fake plays it.
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub authority: String,
    /// The client's own headers.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The route's `ExtProcPerRoute.overrides.grpc_initial_metadata`:
    /// sent as the stream's initial gRPC metadata.
    pub route_metadata: Vec<(String, String)>,
    close_after: Option<Step>,
    pause_after: Option<(Step, PausePoint)>,
    values_in_value: bool,
}

impl HttpRequest {
    /// A POST of a JSON body.
    pub fn post(path: &str, body: &str) -> HttpRequest {
        HttpRequest {
            method: "POST".to_string(),
            path: path.to_string(),
            authority: "api.example.com".to_string(),
            headers: vec![("content-type".to_string(), "application/json".to_string())],
            body: body.as_bytes().to_vec(),
            route_metadata: Vec::new(),
            close_after: None,
            pause_after: None,
            values_in_value: false,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> HttpRequest {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Route metadata `tollgate-route-<attribute>: value`.
    pub fn route(mut self, attribute: &str, value: &str) -> HttpRequest {
        self.route_metadata
            .push((format!("tollgate-route-{attribute}"), value.to_string()));
        self
    }

    /// Every header value, of the request and of the response, goes in
    /// `value` with `raw_value` empty, as Envoy sent them before 1.27
    /// (`send_header_raw_value` off).
    pub fn values_in_value(mut self) -> HttpRequest {
        self.values_in_value = true;
        self
    }

    /// Envoy closes the stream once the reply to `step` is in: the client
    /// went away, or a route timeout fired.
    pub fn close_after(mut self, step: Step) -> HttpRequest {
        self.close_after = Some(step);
        self
    }

    /// The fake stops once the reply to `step` is in (and applied) until
    /// the test resumes it: the upstream thinking, or a slow response.
    pub fn pause_after(mut self, step: Step) -> (HttpRequest, Paused) {
        let (reached_tx, reached_rx) = oneshot::channel();
        let (resume_tx, resume_rx) = oneshot::channel();
        self.pause_after = Some((
            step,
            PausePoint {
                reached: reached_tx,
                resume: resume_rx,
            },
        ));
        (
            self,
            Paused {
                reached: Some(reached_rx),
                resume: resume_tx,
            },
        )
    }
}

struct PausePoint {
    reached: oneshot::Sender<()>,
    resume: oneshot::Receiver<()>,
}

/// The test's end of a pause.
pub struct Paused {
    reached: Option<oneshot::Receiver<()>>,
    resume: oneshot::Sender<()>,
}

impl Paused {
    /// Waits until the exchange reaches the pause (panics after 5 s).
    pub async fn reached(&mut self) {
        let rx = self.reached.take().expect("reached() once");
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .expect("the exchange did not reach its pause within 5 s")
            .expect("the exchange ended before its pause");
    }

    pub fn resume(self) {
        let _ = self.resume.send(());
    }
}

/// What reached the upstream.
#[derive(Clone)]
pub struct Forwarded {
    pub headers: Headers,
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Forwarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarded")
            .field("headers", &self.headers)
            .field("body", &Text(&self.body))
            .finish()
    }
}

impl Forwarded {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "forwarded body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// The upstream's answer.
#[derive(Debug, Clone)]
pub struct UpstreamResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub chunks: Vec<Vec<u8>>,
    /// The end of the body arrives on its own (an HTTP/1.1 chunked
    /// terminator after the last data): Envoy then sends it as an empty
    /// body chunk with `end_of_stream`.
    pub separate_end: bool,
}

impl UpstreamResponse {
    /// A JSON body, in one chunk with its content-length.
    pub fn json(body: &str) -> UpstreamResponse {
        UpstreamResponse {
            status: 200,
            headers: vec![
                ("content-type".to_string(), "application/json".to_string()),
                ("content-length".to_string(), body.len().to_string()),
            ],
            chunks: vec![body.as_bytes().to_vec()],
            separate_end: false,
        }
    }

    /// An event stream, one chunk per element (chunked, no content-length).
    pub fn sse(chunks: &[&str], separate_end: bool) -> UpstreamResponse {
        UpstreamResponse {
            status: 200,
            headers: vec![(
                "content-type".to_string(),
                "text/event-stream; charset=utf-8".to_string(),
            )],
            chunks: chunks.iter().map(|c| c.as_bytes().to_vec()).collect(),
            separate_end,
        }
    }
}

/// How the exchange ended, as the client saw it.
#[derive(Clone)]
pub enum Outcome {
    /// The upstream's response, after the server's mutations.
    Response {
        status: u16,
        headers: Headers,
        chunks: Vec<Vec<u8>>,
    },
    /// A reply Envoy made itself, from an `ImmediateResponse` (or its own
    /// error reply).
    Local {
        status: u16,
        headers: Headers,
        body: Vec<u8>,
        details: String,
    },
    /// The response had started downstream and was reset: the client got
    /// these headers and chunks, then a reset.
    Reset {
        status: u16,
        headers: Headers,
        chunks: Vec<Vec<u8>>,
    },
    /// Envoy closed the stream after this step (the client went away).
    Closed { at: Step },
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let texts = |c: &[Vec<u8>]| {
            c.iter()
                .map(|c| format!("{:?}", Text(c)))
                .collect::<Vec<_>>()
        };
        match self {
            Outcome::Response {
                status,
                headers,
                chunks,
            } => f
                .debug_struct("Response")
                .field("status", status)
                .field("headers", headers)
                .field("chunks", &texts(chunks))
                .finish(),
            Outcome::Local {
                status,
                headers,
                body,
                details,
            } => f
                .debug_struct("Local")
                .field("status", status)
                .field("headers", headers)
                .field("body", &Text(body))
                .field("details", details)
                .finish(),
            Outcome::Reset {
                status,
                headers,
                chunks,
            } => f
                .debug_struct("Reset")
                .field("status", status)
                .field("headers", headers)
                .field("chunks", &texts(chunks))
                .finish(),
            Outcome::Closed { at } => f.debug_struct("Closed").field("at", at).finish(),
        }
    }
}

/// One exchange, played through.
#[derive(Debug)]
pub struct Exchange {
    pub outcome: Outcome,
    /// The messages sent, in order.
    pub sent: Vec<Step>,
    /// The replies got, in order.
    pub replies: Vec<ProcessingResponse>,
    pub forwarded: Option<Forwarded>,
    /// What Envoy ignored, as Envoy does.
    pub ignored: Vec<String>,
}

impl Exchange {
    /// The client's response from the upstream; panics on anything else.
    pub fn response(&self) -> (u16, &Headers, Vec<u8>) {
        match &self.outcome {
            Outcome::Response {
                status,
                headers,
                chunks,
            } => (*status, headers, chunks.concat()),
            other => panic!("expected the upstream's response, got {other:?}\n{self:#?}"),
        }
    }

    /// Envoy's local reply; panics on anything else.
    pub fn local(&self) -> (u16, &Headers, serde_json::Value) {
        match &self.outcome {
            Outcome::Local {
                status,
                headers,
                body,
                ..
            } => (
                *status,
                headers,
                serde_json::from_slice(body).unwrap_or_else(|e| {
                    panic!(
                        "local reply body is not JSON ({e}): {}",
                        String::from_utf8_lossy(body)
                    )
                }),
            ),
            other => panic!("expected a local reply, got {other:?}\n{self:#?}"),
        }
    }

    pub fn is_local(&self) -> bool {
        matches!(self.outcome, Outcome::Local { .. })
    }

    /// The reply to `step`.
    pub fn reply_to(&self, step: Step) -> Option<&ProcessingResponse> {
        let i = self.sent.iter().position(|s| *s == step)?;
        self.replies.get(i)
    }

    pub fn sent_response_body(&self) -> bool {
        self.sent.iter().any(|s| matches!(s, Step::ResponseBody(_)))
    }
}

/// A reply Envoy would not accept, or a stream it would fail.
pub struct Violation(pub String);

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Debug for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The fake Envoy: one gRPC channel to the ext_proc server.
#[derive(Clone)]
pub struct FakeEnvoy {
    client: ExternalProcessorClient<Channel>,
    pub message_timeout: Duration,
}

impl FakeEnvoy {
    pub async fn connect(endpoint: String) -> FakeEnvoy {
        let channel = Channel::from_shared(endpoint)
            .unwrap()
            .connect()
            .await
            .unwrap();
        FakeEnvoy {
            client: ExternalProcessorClient::new(channel),
            message_timeout: MESSAGE_TIMEOUT,
        }
    }

    /// Plays one exchange; a violation of Envoy's rules fails the test.
    pub async fn run(
        &self,
        request: HttpRequest,
        upstream: impl FnOnce(&Forwarded) -> UpstreamResponse,
    ) -> Exchange {
        match self.exchange(request, upstream).await {
            Ok(x) => x,
            Err(v) => panic!("Envoy would not accept this:\n{v}"),
        }
    }

    /// Plays one exchange.
    pub async fn exchange(
        &self,
        request: HttpRequest,
        upstream: impl FnOnce(&Forwarded) -> UpstreamResponse,
    ) -> Result<Exchange, Violation> {
        let mut run = Run::open(self, &request).await?;
        let result = run.play(request, upstream).await;
        match result {
            Ok(outcome) => {
                let closed_early = matches!(outcome, Outcome::Closed { .. });
                run.close(closed_early).await?;
                Ok(Exchange {
                    outcome,
                    sent: run.sent,
                    replies: run.replies,
                    forwarded: run.forwarded,
                    ignored: run.ignored,
                })
            }
            Err(v) => Err(Violation(format!(
                "{v}\nlast message sent: {}\nmessages sent: {:?}\nreplies got: {:?}",
                run.last_sent, run.sent, run.replies
            ))),
        }
    }
}

/// What a reply turned out to be.
enum Answer {
    Reply(Box<ProcessingResponse>),
    /// The server ended the stream with a non-OK status. Envoy, with
    /// `failure_mode_allow: false`, answers 500 before the response has
    /// started and resets it after (ext_proc.cc, `onGrpcError`).
    GrpcError(tonic::Status),
    /// The server ended the stream cleanly. Envoy takes that as "no more
    /// processing" and lets the rest of the exchange through untouched
    /// (ext_proc.cc, `onGrpcClose`).
    Closed,
}

/// The filter's state for one exchange.
struct Run {
    tx: Option<mpsc::Sender<ProcessingRequest>>,
    rx: Option<tonic::Streaming<ProcessingResponse>>,
    message_timeout: Duration,
    first: bool,
    /// Whether the stream is still processing (false once the server
    /// closed it, or said CONTINUE_AND_REPLACE for the rest).
    processing: bool,
    send_response_headers: bool,
    /// Header values go in `value`, not `raw_value`.
    values_in_value: bool,
    request_body_mode: BodySendMode,
    response_body_mode: BodySendMode,
    sent: Vec<Step>,
    /// The last message sent, described.
    last_sent: String,
    replies: Vec<ProcessingResponse>,
    forwarded: Option<Forwarded>,
    ignored: Vec<String>,
}

/// Headers Envoy's default mutation rules do not let a processor set: the
/// routing headers (`allow_all_routing: false`) and Envoy's own
/// (`allow_envoy: false`). api/envoy/service/ext_proc/v3/external_processor.proto,
/// `HeaderMutation.set_headers`: "Attempts to set the value of any x-envoy
/// header, and attempts to set the :method, :authority, :scheme, or host
/// headers will be ignored"; api/envoy/config/common/mutation_rules/v3/mutation_rules.proto.
fn protected_from_set(name: &str) -> bool {
    matches!(name, ":method" | ":authority" | ":scheme" | "host") || name.starts_with("x-envoy-")
}

/// `HeaderMutation.remove_headers`: "Attempts to remove system headers --
/// any header starting with `:`, plus `host` -- will be ignored."
fn protected_from_remove(name: &str) -> bool {
    name.starts_with(':') || name == "host" || name.starts_with("x-envoy-")
}

/// RFC 9110 token characters, and a leading `:` for pseudo-headers
/// (Http::HeaderUtility::headerNameIsValid).
fn valid_name(name: &str) -> bool {
    let rest = name.strip_prefix(':').unwrap_or(name);
    !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// No NUL, CR or LF (Http::HeaderUtility::headerValueIsValid).
fn valid_value(value: &[u8]) -> bool {
    !value.iter().any(|b| matches!(b, 0 | b'\r' | b'\n'))
}

/// Applies a header mutation as Envoy's
/// source/extensions/filters/http/ext_proc/mutation_utils.cc
/// (`MutationUtils::applyHeaderMutations`) does: removals first, then sets.
/// A header with both `value` and `raw_value` is an error there ("Only one
/// of value or raw_value in the HeaderValue message should be set"); one
/// with `value` alone is read through `raw_value` (the
/// `send_header_raw_value` guard) and would be set empty, so it is refused
/// here too. An invalid name or value is an error (`rejected_header_mutations`).
fn apply_mutation(
    mutation: &HeaderMutation,
    headers: &mut Headers,
    ignored: &mut Vec<String>,
    what: &str,
) -> Result<(), String> {
    for name in &mutation.remove_headers {
        let name = name.to_ascii_lowercase();
        if !valid_name(&name) {
            return Err(format!(
                "{what}: remove_headers names an invalid header {name:?} (mutation_utils.cc rejects it)"
            ));
        }
        if protected_from_remove(&name) {
            ignored.push(format!("{what}: removing {name}"));
            continue;
        }
        headers.remove(&name);
    }
    for option in &mutation.set_headers {
        let Some(h) = &option.header else { continue };
        let name = h.key.to_ascii_lowercase();
        if !h.value.is_empty() && !h.raw_value.is_empty() {
            return Err(format!(
                "{what}: header {name:?} sets both `value` ({:?}) and `raw_value`; \
                 mutation_utils.cc rejects it (\"Only one of value or raw_value in the \
                 HeaderValue message should be set\") and Envoy answers 500",
                h.value
            ));
        }
        if !h.value.is_empty() {
            return Err(format!(
                "{what}: header {name:?} is set in `value` ({:?}), not `raw_value`; Envoy \
                 (send_header_raw_value, the default since 1.27) reads only `raw_value`, so \
                 the header would be set empty",
                h.value
            ));
        }
        if !valid_name(&name) || !valid_value(&h.raw_value) {
            return Err(format!(
                "{what}: header {name:?}: {:?} has invalid characters; mutation_utils.cc \
                 rejects it and Envoy answers 500",
                String::from_utf8_lossy(&h.raw_value)
            ));
        }
        if protected_from_set(&name) {
            ignored.push(format!("{what}: setting {name}"));
            continue;
        }
        let value = h.raw_value.clone();
        #[allow(deprecated)]
        let append = option.append.map(|b| b.value);
        // `append` defaults to false in HeaderMutation (external_processor.proto,
        // `set_headers`); when it is unset, `append_action` decides, and its
        // default, APPEND_IF_EXISTS_OR_ADD, with append false, overwrites.
        match append {
            Some(true) => headers.add(&name, value),
            Some(false) => headers.set(&name, value),
            None => match HeaderAppendAction::try_from(option.append_action) {
                Ok(HeaderAppendAction::AddIfAbsent) => {
                    if !headers.contains(&name) {
                        headers.add(&name, value)
                    }
                }
                Ok(HeaderAppendAction::OverwriteIfExists) => {
                    if headers.contains(&name) {
                        headers.set(&name, value)
                    }
                }
                Ok(_) => headers.set(&name, value),
                Err(_) => {
                    return Err(format!(
                        "{what}: header {name:?} has an unknown append_action {}",
                        option.append_action
                    ))
                }
            },
        }
    }
    Ok(())
}

/// The new body a body mutation gives, if any.
fn mutated_body(common: &CommonResponse, what: &str) -> Result<Option<Vec<u8>>, String> {
    match common
        .body_mutation
        .as_ref()
        .and_then(|m| m.mutation.as_ref())
    {
        None => Ok(None),
        Some(Mutation::Body(b)) => Ok(Some(b.clone())),
        Some(Mutation::ClearBody(true)) => Ok(Some(Vec::new())),
        Some(Mutation::ClearBody(false)) => Ok(None),
        // external_processor.proto, BodyMutation.streamed_response: "Must be
        // used when the BodySendMode is FULL_DUPLEX_STREAMED or GRPC", and
        // only then.
        Some(Mutation::StreamedResponse(_)) => Err(format!(
            "{what}: a streamed_response body mutation outside FULL_DUPLEX_STREAMED/GRPC"
        )),
    }
}

fn describe(m: &Option<Msg>) -> String {
    match m {
        Some(Msg::RequestHeaders(h)) | Some(Msg::ResponseHeaders(h)) => format!(
            "{} headers (end_of_stream: {}): {:?}",
            if matches!(m, Some(Msg::RequestHeaders(_))) {
                "request"
            } else {
                "response"
            },
            h.end_of_stream,
            h.headers
                .as_ref()
                .map(|m| m
                    .headers
                    .iter()
                    .map(|h| if h.raw_value.is_empty() {
                        format!("{}: {} (in value)", h.key, h.value)
                    } else {
                        format!("{}: {}", h.key, String::from_utf8_lossy(&h.raw_value))
                    })
                    .collect::<Vec<_>>())
                .unwrap_or_default()
        ),
        Some(Msg::RequestBody(b)) | Some(Msg::ResponseBody(b)) => format!(
            "{} body (end_of_stream: {}): {:?}",
            if matches!(m, Some(Msg::RequestBody(_))) {
                "request"
            } else {
                "response"
            },
            b.end_of_stream,
            String::from_utf8_lossy(&b.body)
        ),
        other => format!("{other:?}"),
    }
}

/// Envoy's local reply from an ImmediateResponse (ext_proc.cc,
/// `sendImmediateResponse`): a status below 200 is replaced by 200
/// ("Ignoring attempt to set invalid HTTP status"); the body goes with
/// Envoy's default `content-type: text/plain`, which the response's header
/// mutation may then replace (external_processor.proto,
/// `ImmediateResponse.headers`: "Apply changes to the default headers,
/// which will include content-type").
fn local_reply(i: &ImmediateResponse, ignored: &mut Vec<String>) -> Result<Outcome, String> {
    let code = i.status.map(|s| s.code).unwrap_or(200);
    let status = if code < 200 { 200 } else { code as u16 };
    let mut headers = Headers::default();
    headers.add(":status", status.to_string().into_bytes());
    if !i.body.is_empty() {
        headers.add("content-type", b"text/plain".to_vec());
    }
    headers.add("content-length", i.body.len().to_string().into_bytes());
    if let Some(m) = &i.headers {
        apply_mutation(m, &mut headers, ignored, "immediate_response.headers")?;
    }
    Ok(Outcome::Local {
        status,
        headers,
        body: i.body.clone(),
        details: i.details.clone(),
    })
}

impl Run {
    async fn open(envoy: &FakeEnvoy, request: &HttpRequest) -> Result<Run, Violation> {
        let (tx, rx) = mpsc::channel(4);
        let mut call = tonic::Request::new(ReceiverStream::new(rx));
        for (k, v) in &request.route_metadata {
            call.metadata_mut().insert(
                tonic::metadata::MetadataKey::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let mut client = envoy.client.clone();
        let stream = match tokio::time::timeout(Duration::from_secs(5), client.process(call)).await
        {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => {
                return Err(Violation(format!(
                    "the server refused the Process stream: {status:?} (Envoy answers 500 with \
                     failure_mode_allow: false)"
                )))
            }
            Err(_) => return Err(Violation("Process did not open within 5 s".to_string())),
        };
        Ok(Run {
            tx: Some(tx),
            rx: Some(stream),
            message_timeout: envoy.message_timeout,
            first: true,
            processing: true,
            send_response_headers: true,
            values_in_value: request.values_in_value,
            request_body_mode: BodySendMode::Buffered,
            response_body_mode: BodySendMode::Streamed,
            sent: Vec::new(),
            last_sent: String::new(),
            replies: Vec::new(),
            forwarded: None,
            ignored: Vec::new(),
        })
    }

    /// Sends one message and waits for its one reply (non-duplex modes:
    /// "for every received ProcessingRequest, the server must send back
    /// exactly one ProcessingResponse message", external_processor.proto,
    /// `ProcessingResponse`). Envoy sends the next message only once this
    /// reply is in, under BUFFERED; under STREAMED it may send several
    /// chunks ahead, and this fake plays the slow-chunk schedule, one at a
    /// time.
    async fn call(&mut self, step: Step, msg: Msg) -> Result<Answer, String> {
        let rx = self.rx.as_mut().expect("stream open");
        // A reply with nothing outstanding is a spurious message: Envoy
        // counts it (spurious_msgs_received) and stops processing the
        // stream (ext_proc.cc, `onReceiveMessage`).
        match tokio::time::timeout(Duration::ZERO, rx.message()).await {
            Err(_) => {}
            Ok(Ok(Some(r))) => {
                return Err(format!(
                    "before {step:?}, a reply nobody asked for: {r:?} (external_processor.proto: \
                     exactly one response per request; Envoy drops it as spurious and stops \
                     processing)"
                ))
            }
            Ok(Ok(None)) => {
                self.ignored
                    .push(format!("the server closed the stream before {step:?}"));
                self.processing = false;
                return Ok(Answer::Closed);
            }
            Ok(Err(status)) => return Ok(Answer::GrpcError(status)),
        }
        let request = Some(msg);
        let description = describe(&request);
        self.last_sent = description.clone();
        let message = ProcessingRequest {
            request,
            // Sent on the first message of a stream (newer Envoy,
            // external_processor.proto, `protocol_config`).
            protocol_config: self.first.then_some(ProtocolConfiguration {
                request_body_mode: BodySendMode::Buffered as i32,
                response_body_mode: BodySendMode::Streamed as i32,
                send_body_without_waiting_for_header_response: false,
            }),
            observability_mode: false,
            ..Default::default()
        };
        self.first = false;
        self.sent.push(step);
        if self.tx.as_ref().unwrap().send(message).await.is_err() {
            return Err(format!("{step:?}: the request stream is gone"));
        }
        match tokio::time::timeout(self.message_timeout, rx.message()).await {
            Err(_) => Err(format!(
                "no reply to {step:?} within message_timeout {:?} (ext_proc.cc, onMessageTimeout: \
                 with failure_mode_allow false Envoy fails the request)",
                self.message_timeout
            )),
            Ok(Ok(Some(r))) => {
                self.replies.push(r.clone());
                Ok(Answer::Reply(Box::new(r)))
            }
            Ok(Ok(None)) => {
                self.ignored.push(format!(
                    "the server closed the stream instead of replying to {step:?}; Envoy lets the \
                     rest through unprocessed (ext_proc.cc, onGrpcClose)"
                ));
                self.processing = false;
                Ok(Answer::Closed)
            }
            Ok(Err(status)) => Ok(Answer::GrpcError(status)),
        }
    }

    /// Honours `mode_override` in a reply to a headers message only:
    /// external_processor.proto, `ProcessingResponse.mode_override`: "If set
    /// in a response to body or trailer requests, it will be ignored"; the
    /// ext_proc filter docs: it "only applies in response to a headers
    /// message". Envoy applies the whole mode to both directions
    /// (ext_proc.cc, `onReceiveMessage`; processor_state.cc,
    /// `setProcessingModeInternal`): a header mode of DEFAULT keeps the
    /// configured one, while a body mode is taken as it is (NONE is 0).
    fn mode_override(&mut self, reply: &ProcessingResponse, to_headers: bool, step: Step) {
        let Some(mode) = &reply.mode_override else {
            return;
        };
        if !to_headers {
            self.ignored
                .push(format!("mode_override in the reply to {step:?}: {mode:?}"));
            return;
        }
        let ProcessingMode {
            response_header_mode,
            request_body_mode,
            response_body_mode,
            ..
        } = *mode;
        match HeaderSendMode::try_from(response_header_mode) {
            Ok(HeaderSendMode::Send) => self.send_response_headers = true,
            Ok(HeaderSendMode::Skip) => self.send_response_headers = false,
            _ => {}
        }
        self.request_body_mode =
            BodySendMode::try_from(request_body_mode).unwrap_or(BodySendMode::None);
        self.response_body_mode =
            BodySendMode::try_from(response_body_mode).unwrap_or(BodySendMode::None);
    }

    /// Stops at the pause or closes at `step`, as the request says.
    async fn after(
        &mut self,
        step: Step,
        close_after: Option<Step>,
        pause: &mut Option<(Step, PausePoint)>,
    ) -> bool {
        if pause.as_ref().is_some_and(|(s, _)| *s == step) {
            let (_, p) = pause.take().unwrap();
            let _ = p.reached.send(());
            let _ = p.resume.await;
        }
        close_after == Some(step)
    }

    async fn play(
        &mut self,
        request: HttpRequest,
        upstream: impl FnOnce(&Forwarded) -> UpstreamResponse,
    ) -> Result<Outcome, String> {
        let HttpRequest {
            method,
            path,
            authority,
            headers: client_headers,
            mut body,
            close_after,
            mut pause_after,
            ..
        } = request;
        // The request headers as the ext_proc filter sees them: pseudo
        // headers first, the client's, then what the connection manager
        // adds (x-forwarded-proto, x-request-id).
        let mut headers = Headers::default();
        headers.add(":authority", authority.into_bytes());
        headers.add(":path", path.into_bytes());
        headers.add(":method", method.into_bytes());
        headers.add(":scheme", b"http".to_vec());
        for (k, v) in &client_headers {
            headers.add(&k.to_ascii_lowercase(), v.as_bytes().to_vec());
        }
        if !body.is_empty() && !headers.contains("content-length") {
            headers.add("content-length", body.len().to_string().into_bytes());
        }
        headers.add("x-forwarded-proto", b"http".to_vec());
        headers.add("x-request-id", request_id().into_bytes());
        let has_body = !body.is_empty();

        // 1. Request headers, end_of_stream when there is no body
        // (external_processor.proto, HttpHeaders.end_of_stream).
        let step = Step::RequestHeaders;
        let msg = Msg::RequestHeaders(HttpHeaders {
            headers: Some(headers.to_proto(self.values_in_value)),
            end_of_stream: !has_body,
            ..Default::default()
        });
        let mut body_replaced = false;
        match self.call(step, msg).await? {
            Answer::Closed => {}
            Answer::GrpcError(s) => return Ok(grpc_error_reply(&s)),
            Answer::Reply(r) => match &r.response {
                Some(Reply::RequestHeaders(h)) => {
                    self.mode_override(&r, true, step);
                    let common = h.response.clone().unwrap_or_default();
                    if let Some(m) = &common.header_mutation {
                        apply_mutation(
                            m,
                            &mut headers,
                            &mut self.ignored,
                            "request_headers reply",
                        )?;
                    }
                    body_replaced =
                        self.headers_body_mutation(&common, &mut headers, &mut body, step)?;
                }
                Some(Reply::ImmediateResponse(i)) => {
                    return local_reply(i, &mut self.ignored);
                }
                other => return Err(spurious(step, other)),
            },
        }
        if self.after(step, close_after, &mut pause_after).await {
            return Ok(Outcome::Closed { at: step });
        }

        // 2. The request body, whole, in one message with end_of_stream
        // (BUFFERED: processing_mode.proto, "Buffer the message body in
        // memory and send the entire body at once").
        let step = Step::RequestBody;
        if self.processing
            && has_body
            && !body_replaced
            && self.request_body_mode != BodySendMode::None
        {
            let msg = Msg::RequestBody(HttpBody {
                body: body.clone(),
                end_of_stream: true,
                ..Default::default()
            });
            match self.call(step, msg).await? {
                Answer::Closed => {}
                Answer::GrpcError(s) => return Ok(grpc_error_reply(&s)),
                Answer::Reply(r) => match &r.response {
                    Some(Reply::RequestBody(b)) => {
                        self.mode_override(&r, false, step);
                        let common = b.response.clone().unwrap_or_default();
                        self.buffered_body_reply(&common, &mut headers, &mut body, step)?;
                    }
                    Some(Reply::ImmediateResponse(i)) => {
                        return local_reply(i, &mut self.ignored);
                    }
                    other => return Err(spurious(step, other)),
                },
            }
            if self.after(step, close_after, &mut pause_after).await {
                return Ok(Outcome::Closed { at: step });
            }
        }

        // The request goes upstream: its content-length must be its body's.
        if let Some(cl) = headers.get("content-length") {
            if cl.parse::<usize>().ok() != Some(body.len()) {
                return Err(format!(
                    "the request goes upstream with content-length {cl} and a body of {} bytes",
                    body.len()
                ));
            }
        }
        let forwarded = Forwarded {
            headers: headers.clone(),
            body: body.clone(),
        };
        let answer = upstream(&forwarded);
        self.forwarded = Some(forwarded);

        // 3. The response headers, with what the router adds.
        let mut response = Headers::default();
        response.add(":status", answer.status.to_string().into_bytes());
        for (k, v) in &answer.headers {
            response.add(&k.to_ascii_lowercase(), v.as_bytes().to_vec());
        }
        response.add("x-envoy-upstream-service-time", b"12".to_vec());
        let mut chunks = answer.chunks.clone();
        if answer.separate_end {
            chunks.push(Vec::new());
        }
        let has_response_body = !chunks.is_empty();
        let step = Step::ResponseHeaders;
        let mut status = answer.status;
        if self.processing && self.send_response_headers {
            let msg = Msg::ResponseHeaders(HttpHeaders {
                headers: Some(response.to_proto(self.values_in_value)),
                end_of_stream: !has_response_body,
                ..Default::default()
            });
            match self.call(step, msg).await? {
                Answer::Closed => {}
                // Nothing has gone downstream yet: a local reply.
                Answer::GrpcError(s) => return Ok(grpc_error_reply(&s)),
                Answer::Reply(r) => match &r.response {
                    Some(Reply::ResponseHeaders(h)) => {
                        self.mode_override(&r, true, step);
                        let common = h.response.clone().unwrap_or_default();
                        if let Some(m) = &common.header_mutation {
                            apply_mutation(
                                m,
                                &mut response,
                                &mut self.ignored,
                                "response_headers reply",
                            )?;
                        }
                        let mut whole = chunks.concat();
                        if self.headers_body_mutation(&common, &mut response, &mut whole, step)? {
                            chunks = vec![whole];
                        }
                        if let Some(s) = response.get(":status").and_then(|s| s.parse().ok()) {
                            status = s;
                        }
                    }
                    // The response has not started downstream: Envoy
                    // sends the local reply in its place.
                    Some(Reply::ImmediateResponse(i)) => {
                        return local_reply(i, &mut self.ignored);
                    }
                    other => return Err(spurious(step, other)),
                },
            }
            if self.after(step, close_after, &mut pause_after).await {
                return Ok(Outcome::Closed { at: step });
            }
        }
        // The headers go downstream now; from here on a local reply can
        // only reset the stream (external_processor.proto,
        // ImmediateResponse: "If a response has already started ... this
        // will either ship the reply directly to the downstream codec, or
        // reset the stream").

        // 4. The response body. STREAMED: each chunk as it arrives, the last
        // with end_of_stream (processing_mode.proto, STREAMED). BUFFERED
        // (after a mode_override): the whole body at once.
        if matches!(
            self.response_body_mode,
            BodySendMode::Buffered | BodySendMode::BufferedPartial
        ) && chunks.len() > 1
        {
            chunks = vec![chunks.concat()];
        }
        let last = chunks.len().saturating_sub(1);
        let mut delivered = Vec::new();
        for (i, mut chunk) in chunks.into_iter().enumerate() {
            let step = Step::ResponseBody(i);
            if self.processing && self.response_body_mode != BodySendMode::None {
                let msg = Msg::ResponseBody(HttpBody {
                    body: chunk.clone(),
                    end_of_stream: i == last,
                    ..Default::default()
                });
                match self.call(step, msg).await? {
                    Answer::Closed => {}
                    Answer::GrpcError(_) => {
                        return Ok(Outcome::Reset {
                            status,
                            headers: response,
                            chunks: delivered,
                        })
                    }
                    Answer::Reply(r) => match &r.response {
                        Some(Reply::ResponseBody(b)) => {
                            self.mode_override(&r, false, step);
                            let common = b.response.clone().unwrap_or_default();
                            // CommonResponse.header_mutation: "When responding to
                            // an HttpBody request, header mutations will only take
                            // effect if the current processing mode for the body
                            // is BUFFERED"; the headers are gone downstream.
                            if common.header_mutation.as_ref().is_some_and(|m| {
                                !m.set_headers.is_empty() || !m.remove_headers.is_empty()
                            }) {
                                self.ignored.push(format!(
                                    "header_mutation in the reply to streamed {step:?}"
                                ));
                            }
                            if let Some(new) = mutated_body(&common, "response_body reply")? {
                                chunk = new;
                            }
                            if common.status == ResponseStatus::ContinueAndReplace as i32 {
                                self.processing = false;
                            }
                        }
                        Some(Reply::ImmediateResponse(_)) => {
                            return Ok(Outcome::Reset {
                                status,
                                headers: response,
                                chunks: delivered,
                            })
                        }
                        other => return Err(spurious(step, other)),
                    },
                }
            }
            delivered.push(chunk);
            if self.after(step, close_after, &mut pause_after).await {
                return Ok(Outcome::Closed { at: step });
            }
        }
        Ok(Outcome::Response {
            status,
            headers: response,
            chunks: delivered,
        })
    }

    /// A body mutation in a headers reply, which takes effect only with
    /// CONTINUE_AND_REPLACE (external_processor.proto,
    /// `CommonResponse.body_mutation`); that status also ends the messages
    /// for this direction (`ResponseStatus.CONTINUE_AND_REPLACE`). Returns
    /// whether the body was replaced.
    fn headers_body_mutation(
        &mut self,
        common: &CommonResponse,
        headers: &mut Headers,
        body: &mut Vec<u8>,
        step: Step,
    ) -> Result<bool, String> {
        let replace = common.status == ResponseStatus::ContinueAndReplace as i32;
        let new = mutated_body(common, "headers reply")?;
        if !replace {
            if new.is_some() {
                self.ignored.push(format!(
                    "body_mutation without CONTINUE_AND_REPLACE in the reply to {step:?}"
                ));
            }
            return Ok(false);
        }
        if let Some(new) = new {
            headers.set("content-length", new.len().to_string().into_bytes());
            *body = new;
        }
        Ok(true)
    }

    /// The reply to the buffered request body, as processor_state.cc
    /// (`handleBodyResponse`, BufferedBodyCallback) applies it: the header
    /// mutation first (CommonResponse.header_mutation takes effect on a
    /// body reply under BUFFERED), then the body mutation, refused when the
    /// request's content-length does not match the new body ("mismatch
    /// between content length and the length of the mutated body": Envoy
    /// answers with a local 500; processing_mode.proto, BodySendMode: "In
    /// BUFFERED BodySendMode + SEND HeaderSendMode ... it is the external
    /// processor's responsibility to set the content length correctly").
    fn buffered_body_reply(
        &mut self,
        common: &CommonResponse,
        headers: &mut Headers,
        body: &mut Vec<u8>,
        step: Step,
    ) -> Result<(), String> {
        if let Some(m) = &common.header_mutation {
            apply_mutation(m, headers, &mut self.ignored, "request_body reply")?;
        }
        if let Some(new) = mutated_body(common, "request_body reply")? {
            if let Some(cl) = headers.get("content-length") {
                if let Ok(n) = cl.parse::<usize>() {
                    if n != new.len() {
                        return Err(format!(
                            "{step:?} reply: the body mutation is {} bytes but content-length is \
                             {n}: processor_state.cc rejects it (\"mismatch between content length \
                             and the length of the mutated body\") and Envoy answers 500\nnew body: {}",
                            new.len(),
                            String::from_utf8_lossy(&new)
                        ));
                    }
                }
            }
            *body = new;
        }
        Ok(())
    }

    /// Ends the stream as Envoy does once the exchange is over (or the
    /// client went away): a half-close, then a reset
    /// (source/extensions/filters/http/ext_proc/client_impl.cc,
    /// `ExternalProcessorStreamImpl::close`: closeStream, then
    /// resetStream). After a complete exchange, the fake first waits
    /// briefly for the server to end its side, failing on any reply it did
    /// not ask for.
    async fn close(&mut self, early: bool) -> Result<(), Violation> {
        self.tx = None;
        let Some(mut rx) = self.rx.take() else {
            return Ok(());
        };
        if early {
            drop(rx);
            return Ok(());
        }
        match tokio::time::timeout(DRAIN, rx.message()).await {
            Ok(Ok(Some(r))) => Err(Violation(format!(
                "after the exchange ended, a reply nobody asked for: {r:?}\nmessages sent: {:?}",
                self.sent
            ))),
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => Ok(()),
        }
    }
}

fn spurious(step: Step, got: &Option<Reply>) -> String {
    format!(
        "the reply to {step:?} is of the wrong kind: {got:?}; Envoy counts it as spurious \
         (spurious_msgs_received), ignores it and stops processing the stream, so the rest of \
         the exchange would pass unprocessed (ext_proc.cc, onReceiveMessage; \
         external_processor.proto: the server must send back the matching response)"
    )
}

/// What Envoy does when the stream fails before the response has started,
/// with failure_mode_allow false: a local 500 (ext_proc.cc, onGrpcError).
fn grpc_error_reply(status: &tonic::Status) -> Outcome {
    Outcome::Local {
        status: 500,
        headers: Headers::from_pairs(&[(":status", "500")]),
        body: Vec::new(),
        details: format!("ext_proc_error_gRPC_error_{}", status.code() as i32),
    }
}

/// An x-request-id as the connection manager makes one (a UUID v4 shape).
fn request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let p = u64::from(std::process::id());
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        p as u32,
        (n >> 16) as u16,
        n & 0xfff,
        (n >> 12) & 0xfff,
        n
    )
}

/// A `redis-server` that writes every change to its append-only file in
/// `dir` before answering (`appendfsync always`), so that one killed and
/// started again on the same port and directory comes back with the data
/// it acknowledged, as a durable Redis does after a crash.
pub fn durable_redis(port: u16, dir: &std::path::Path) -> super::RedisServer {
    let child = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("redis-server must be installed for these tests: {e}"));
    let mut server = super::RedisServer {
        child,
        port,
        _dir: tempfile::tempdir().unwrap(),
    };
    assert!(
        server.wait_ready(),
        "redis-server exited at start on port {port}"
    );
    server
}

/// A server on `policy`, with the fake Envoy connected to it.
pub async fn start(
    policy: &str,
    extra: &[&str],
) -> (super::TollgateProcess, FakeEnvoy, tempfile::TempDir) {
    let dir = super::policy_dir(&[("p.yaml", policy)]);
    let mut args = vec!["--policies", dir.path().to_str().unwrap()];
    args.extend_from_slice(extra);
    let tollgate = super::TollgateProcess::start(&args);
    let envoy = FakeEnvoy::connect(tollgate.endpoint()).await;
    (tollgate, envoy, dir)
}

/// `used` of `rule`'s counter(s), summed, from `/v1/usage`; `None` when
/// the server cannot say (the store is down) or tracks none yet.
pub async fn used(http_port: u16, rule: &str) -> Option<u64> {
    used_as(http_port, rule).await
}

/// [`used`], read as `T` (`f64` for spend, which is in dollars).
pub async fn used_as<T>(http_port: u16, rule: &str) -> Option<T>
where
    T: std::str::FromStr + std::iter::Sum + Send + 'static,
{
    let rule = rule.to_string();
    tokio::task::spawn_blocking(move || {
        let (code, body) = super::http_get(http_port, "/v1/usage").ok()?;
        if code != 200 {
            return None;
        }
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        let rows: Vec<T> = json["counters"]
            .as_array()?
            .iter()
            .filter(|c| c["rule"] == rule.as_str())
            .filter_map(|c| c["used"].as_str()?.parse().ok())
            .collect();
        (!rows.is_empty()).then(|| rows.into_iter().sum())
    })
    .await
    .unwrap()
}

/// Waits until `rule`'s counter reads `want`; panics with the last value
/// seen after `within`.
pub async fn wait_used(http_port: u16, rule: &str, want: u64, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let now = used(http_port, rule).await;
        if now == Some(want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{rule}: used is {now:?} after {within:?}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
