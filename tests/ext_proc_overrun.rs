//! A response that streams past what its reservation covered, through
//! Envoy ext_proc (driven by the fake Envoy of
//! tests/common/envoy_ext_proc.rs against a real `tollgate serve`): the
//! reservation is topped up as the stream grows, off the reply path; when
//! no more fits, the rule's `on_overrun` either lets the stream finish
//! (charged what it used) or cuts it with an error event the official
//! SDKs raise, and the stream is reset.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::envoy_ext_proc::{
    start, used, wait_used, Exchange, FakeEnvoy, HttpRequest, Outcome, Step, UpstreamResponse,
};

/// How long a settle (off the response path) may take to show.
const SETTLE_DEADLINE: Duration = Duration::from_secs(5);

/// Output tokens each content chunk of the streams below counts as: 80
/// characters, one token per four.
const TOKENS_PER_CHUNK: u64 = 20;

/// Content chunks in a stream: 600 output tokens.
const CONTENT_CHUNKS: usize = 30;

/// What the first reservation covers: the requests' `max_tokens`.
const MAX_TOKENS: u64 = 100;

fn budget(limit: u64, on_overrun: Option<&str>) -> String {
    let on_overrun = on_overrun
        .map(|v| format!("    on_overrun: {v}\n"))
        .unwrap_or_default();
    format!(
        "
rules:
  - id: output-daily
    limit: {{ output_tokens: {limit}, window: daily }}
{on_overrun}"
    )
}

/// 80 characters of generated text, different per chunk.
fn text(i: usize) -> String {
    format!(
        "{:<80}",
        format!("Part {i} of a long answer, streamed on and on;")
    )
}

#[derive(Clone, Copy, Debug)]
enum Format {
    OpenAiChat,
    Anthropic,
}

/// A long answer, one event per chunk: the chunks, and the index of each
/// chunk's content (None for framing events).
struct LongAnswer {
    request: HttpRequest,
    /// The upstream's answer to the forwarded request.
    upstream: Box<dyn FnOnce(&common::envoy_ext_proc::Forwarded) -> UpstreamResponse + Send>,
    /// Chunks before the first content chunk.
    framing: usize,
}

/// An OpenAI chat stream of [`CONTENT_CHUNKS`] content deltas; the last
/// chunk reports the usage when the forwarded request asks for it.
/// `client_asks_usage`: the client itself asks (else tollgate does).
fn openai_long(client_asks_usage: bool) -> LongAnswer {
    let mut body = serde_json::json!({
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "Tell me everything."}],
        "max_tokens": MAX_TOKENS,
        "stream": true,
    });
    if client_asks_usage {
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    let request = HttpRequest::post("/v1/chat/completions", &body.to_string())
        .header("authorization", "Bearer sk-test-overrun");
    let upstream = move |fwd: &common::envoy_ext_proc::Forwarded| {
        let with_usage = fwd.json()["stream_options"]["include_usage"] == true;
        let event = |choices: serde_json::Value, usage: Option<serde_json::Value>| {
            let mut chunk = serde_json::json!({
                "id": "chatcmpl-long",
                "object": "chat.completion.chunk",
                "created": 1_700_000_000,
                "model": "gpt-4o-2024-08-06",
                "choices": choices,
            });
            if with_usage {
                chunk["usage"] = usage.unwrap_or(serde_json::Value::Null);
            }
            format!("data: {chunk}\n\n")
        };
        let delta = |d: serde_json::Value, finish: serde_json::Value| serde_json::json!([{"index": 0, "delta": d, "finish_reason": finish}]);
        let mut chunks = vec![event(
            delta(
                serde_json::json!({"role": "assistant", "content": ""}),
                serde_json::Value::Null,
            ),
            None,
        )];
        for i in 0..CONTENT_CHUNKS {
            chunks.push(event(
                delta(
                    serde_json::json!({"content": text(i)}),
                    serde_json::Value::Null,
                ),
                None,
            ));
        }
        chunks.push(event(delta(serde_json::json!({}), "stop".into()), None));
        if with_usage {
            let output = TOKENS_PER_CHUNK * CONTENT_CHUNKS as u64;
            chunks.push(event(
                serde_json::json!([]),
                Some(serde_json::json!({"prompt_tokens": 12, "completion_tokens": output, "total_tokens": 12 + output})),
            ));
        }
        chunks.push("data: [DONE]\n\n".to_string());
        let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
        UpstreamResponse::sse(&refs, false)
    };
    LongAnswer {
        request,
        upstream: Box::new(upstream),
        // The role chunk.
        framing: 1,
    }
}

/// An Anthropic Messages stream of [`CONTENT_CHUNKS`] text deltas.
fn anthropic_long() -> LongAnswer {
    let body = serde_json::json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": MAX_TOKENS,
        "stream": true,
        "messages": [{"role": "user", "content": "Tell me everything."}],
    });
    let request = HttpRequest::post("/v1/messages", &body.to_string())
        .header("x-api-key", "sk-ant-overrun")
        .header("anthropic-version", "2023-06-01");
    let upstream = |_: &common::envoy_ext_proc::Forwarded| {
        let event =
            |name: &str, data: serde_json::Value| format!("event: {name}\ndata: {data}\n\n");
        let mut chunks = vec![
            event(
                "message_start",
                serde_json::json!({"type": "message_start", "message": {
                    "id": "msg_long", "type": "message", "role": "assistant", "content": [],
                    "model": "claude-sonnet-4-5-20250929", "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": 12, "output_tokens": 1}
                }}),
            ),
            event(
                "content_block_start",
                serde_json::json!({"type": "content_block_start", "index": 0,
                                   "content_block": {"type": "text", "text": ""}}),
            ),
        ];
        for i in 0..CONTENT_CHUNKS {
            chunks.push(event(
                "content_block_delta",
                serde_json::json!({"type": "content_block_delta", "index": 0,
                                   "delta": {"type": "text_delta", "text": text(i)}}),
            ));
        }
        chunks.push(event(
            "content_block_stop",
            serde_json::json!({"type": "content_block_stop", "index": 0}),
        ));
        chunks.push(event(
            "message_delta",
            serde_json::json!({"type": "message_delta",
                               "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                               "usage": {"output_tokens": TOKENS_PER_CHUNK * CONTENT_CHUNKS as u64}}),
        ));
        chunks.push(event(
            "message_stop",
            serde_json::json!({"type": "message_stop"}),
        ));
        let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
        UpstreamResponse::sse(&refs, false)
    };
    LongAnswer {
        request,
        upstream: Box::new(upstream),
        // `message_start` and `content_block_start`.
        framing: 2,
    }
}

/// Plays `answer`, pausing once its top-up has started until `while_paused`
/// is done: the upstream thinking between two chunks, long enough for the
/// top-up's answer to be in when the stream goes on.
async fn play<F>(
    envoy: &FakeEnvoy,
    answer: LongAnswer,
    while_paused: F,
) -> (Exchange, UpstreamResponse)
where
    F: std::future::Future<Output = ()>,
{
    let LongAnswer {
        request,
        upstream,
        framing,
    } = answer;
    // At 20 tokens a chunk, the 4th content chunk brings the counted
    // output to 80, past three quarters of the 100 covered: a top-up
    // starts.
    let top_up_at = framing + 3;
    let (request, mut paused) = request.pause_after(Step::ResponseBody(top_up_at));
    let (served_tx, served_rx) = std::sync::mpsc::channel();
    let envoy = envoy.clone();
    let run = tokio::spawn(async move {
        envoy
            .run(request, move |fwd| {
                let response = upstream(fwd);
                served_tx.send(response.clone()).unwrap();
                response
            })
            .await
    });
    paused.reached().await;
    while_paused.await;
    paused.resume();
    let x = run.await.unwrap();
    (x, served_rx.recv().unwrap())
}

/// The top-up's answer is in: give it a moment off the reply path.
async fn settle_down() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// (a) A long answer within its budget is never stopped: the reservation
/// covers 100 output tokens, the answer runs to 600, the budget is 10,000.
/// The top-up shows on the counter while the stream runs, every byte
/// reaches the client, and the net charge is the usage reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_answer_within_budget_is_topped_up_and_charged_what_it_used() {
    let (tollgate, envoy, _dir) = start(&budget(10_000, Some("cut")), &[]).await;
    let port = tollgate.http_port;
    for answer in [openai_long(true), anthropic_long()] {
        let before = used(port, "output-daily").await.unwrap_or(0);
        let (x, upstream) = play(&envoy, answer, async {
            // The reservation's 100, and a top-up of 1,000 more.
            wait_used(
                port,
                "output-daily",
                before + MAX_TOKENS + 1_000,
                SETTLE_DEADLINE,
            )
            .await;
        })
        .await;
        let (status, _, body) = x.response();
        assert_eq!(status, 200);
        assert_eq!(
            String::from_utf8(body).unwrap(),
            String::from_utf8(upstream.chunks.concat()).unwrap(),
            "the client gets every byte"
        );
        assert!(x.ignored.is_empty(), "Envoy ignored {:?}", x.ignored);
        // The reservation settles at the usage reported; the top-up is
        // given back whole.
        wait_used(
            port,
            "output-daily",
            before + TOKENS_PER_CHUNK * CONTENT_CHUNKS as u64,
            SETTLE_DEADLINE,
        )
        .await;
    }
}

/// The client's chunks of a cut stream: every chunk it got, the last the
/// error event, then the reset.
fn cut_chunks(x: &Exchange) -> Vec<Vec<u8>> {
    match &x.outcome {
        Outcome::Reset { status, chunks, .. } => {
            assert_eq!(*status, 200);
            chunks.clone()
        }
        other => panic!("expected the stream reset after its error event, got {other:?}"),
    }
}

/// (b) `on_overrun: cut` with a budget of 150: the top-up finds no room;
/// the first chunk past the 100 covered is replaced by the error event,
/// the stream is reset at the next, and the charge is what was streamed,
/// never more than the budget plus one chunk. Returns the bytes each
/// client got, for (d).
async fn cut_streams() -> Vec<(Format, Vec<u8>)> {
    let mut got = Vec::new();
    for (format, answer) in [
        (Format::OpenAiChat, openai_long(false)),
        (Format::Anthropic, anthropic_long()),
    ] {
        // A server of its own for each: a fresh budget.
        let (tollgate, envoy, _dir) = start(&budget(150, Some("cut")), &[]).await;
        let port = tollgate.http_port;
        let framing = answer.framing;
        let (x, upstream) = play(&envoy, answer, settle_down()).await;
        let chunks = cut_chunks(&x);
        let last = String::from_utf8(chunks.last().unwrap().clone()).unwrap();
        match format {
            Format::OpenAiChat => {
                assert!(last.starts_with("data: {\"error\":"), "{last:?}");
                let json: serde_json::Value =
                    serde_json::from_str(last.strip_prefix("data: ").unwrap().trim_end()).unwrap();
                assert_eq!(json["error"]["code"], "budget_exceeded");
                assert_eq!(json["error"]["type"], "insufficient_quota");
                assert!(json["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("`output-daily`"));
            }
            Format::Anthropic => {
                assert!(last.starts_with("event: error\ndata: "), "{last:?}");
                let json: serde_json::Value = serde_json::from_str(
                    last.strip_prefix("event: error\ndata: ")
                        .unwrap()
                        .trim_end(),
                )
                .unwrap();
                assert_eq!(json["type"], "error");
                assert_eq!(json["error"]["type"], "budget_exceeded");
            }
        }
        // Content chunks until the counted output passed the 100 covered
        // (the 6th, at 120), that one replaced by the error event, then the
        // reset at the next.
        let through = framing + (MAX_TOKENS / TOKENS_PER_CHUNK) as usize;
        assert_eq!(chunks.len(), through + 1, "{x:#?}");
        assert_eq!(x.sent.last(), Some(&Step::ResponseBody(through + 1)));
        for (i, chunk) in chunks[..through].iter().enumerate() {
            let sent = String::from_utf8(upstream.chunks[i].clone()).unwrap();
            // tollgate asked the OpenAI stream for its usage: what that
            // adds is taken out.
            let want = sent.replace(",\"usage\":null", "");
            assert_eq!(String::from_utf8(chunk.clone()).unwrap(), want, "chunk {i}");
        }
        // Charged what the meter read: through the replaced chunk.
        let charged = TOKENS_PER_CHUNK * (MAX_TOKENS / TOKENS_PER_CHUNK + 1);
        wait_used(port, "output-daily", charged, SETTLE_DEADLINE).await;
        assert!(charged <= 150 + TOKENS_PER_CHUNK);
        got.push((format, chunks.concat()));
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_overrun_cut_ends_the_stream_with_an_error_event_then_resets_it() {
    cut_streams().await;
}

/// (c) `finish`, the default: the top-up finds no room, and the stream
/// runs to its end anyway, charged all it used, past the budget: the
/// documented trade-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_overrun_finish_lets_the_stream_end_and_charges_what_it_used() {
    let (tollgate, envoy, _dir) = start(&budget(150, None), &[]).await;
    let port = tollgate.http_port;
    let (x, upstream) = play(&envoy, openai_long(true), settle_down()).await;
    let (status, _, body) = x.response();
    assert_eq!(status, 200);
    assert_eq!(body, upstream.chunks.concat(), "the client gets every byte");
    wait_used(
        port,
        "output-daily",
        TOKENS_PER_CHUNK * CONTENT_CHUNKS as u64,
        SETTLE_DEADLINE,
    )
    .await;
}

/// A rule's `on_overrun` is finish or cut; anything else is an error at
/// its place in the file.
#[test]
fn on_overrun_is_finish_or_cut() {
    for value in ["finish", "cut"] {
        common::policy(&budget(100, Some(value)));
    }
    let err = common::compile(&[("p.yaml", &budget(100, Some("stop")))])
        .expect_err("an unknown on_overrun is refused")
        .to_string();
    assert!(err.contains("`on_overrun` is finish or cut"), "{err}");
    assert!(err.contains("p.yaml:5"), "positioned: {err}");
}

/// Serves `body` as `text/event-stream` to every request, closing the
/// connection after it, on a port of its own.
fn replay_server(body: Vec<u8>) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let body = body.clone();
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // The headers, then the body by its content-length.
                let body_start = loop {
                    let Ok(n) = stream.read(&mut buf) else { return };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    if let Some(at) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                        break at + 4;
                    }
                };
                let head = String::from_utf8_lossy(&request[..body_start]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while request.len() < body_start + length {
                    let Ok(n) = stream.read(&mut buf) else { return };
                    if n == 0 {
                        break;
                    }
                    request.extend_from_slice(&buf[..n]);
                }
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n\
                      cache-control: no-cache\r\nconnection: close\r\n\r\n",
                );
                let _ = stream.write_all(&body);
                let _ = stream.flush();
            });
        }
    });
    port
}

const SDK_SCRIPT: &str = r#"
import json, sys
import openai, anthropic

kind, base = sys.argv[1], sys.argv[2]
out = {"raised": None}
try:
    if kind == "openai":
        client = openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0, timeout=10)
        stream = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Tell me everything."}],
            max_tokens=100, stream=True)
        out["text"] = ""
        for chunk in stream:
            if chunk.choices:
                out["text"] += chunk.choices[0].delta.content or ""
    else:
        client = anthropic.Anthropic(base_url=base, api_key="sk-ant", max_retries=0, timeout=10)
        stream = client.messages.create(
            model="claude-sonnet-4-5", max_tokens=100,
            messages=[{"role": "user", "content": "Tell me everything."}], stream=True)
        out["text"] = ""
        for event in stream:
            if event.type == "content_block_delta":
                out["text"] += event.delta.text
except Exception as e:
    out["raised"] = type(e).__module__ + "." + type(e).__qualname__
    out["message"] = str(e)
    out["openai_api_error"] = isinstance(e, openai.APIError)
    out["anthropic_api_error"] = isinstance(e, anthropic.APIError)
    out["anthropic_status_error"] = isinstance(e, anthropic.APIStatusError)
print(json.dumps(out))
"#;

fn run_sdk(kind: &str, port: u16) -> serde_json::Value {
    let mut cmd = common::sdk::python();
    cmd.args(["-c", SDK_SCRIPT, kind, &format!("http://127.0.0.1:{port}")]);
    let out = cmd.output().expect("run the SDK venv's python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the {kind} script failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// (d) The official SDKs raise the cut's error event: the bytes the client
/// got in (b), replayed as an event stream, make the OpenAI SDK raise its
/// `APIError` and the Anthropic SDK its `APIStatusError`, after the text
/// streamed before the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdks_raise_the_cut_error_event() {
    // Fails at once, before any server starts, if the SDKs are missing.
    common::sdk::python();
    for (format, bytes) in cut_streams().await {
        let port = replay_server(bytes);
        let kind = match format {
            Format::OpenAiChat => "openai",
            Format::Anthropic => "anthropic",
        };
        let got = tokio::task::spawn_blocking(move || run_sdk(kind, port))
            .await
            .unwrap();
        assert!(got["raised"].is_string(), "{kind} did not raise: {got}");
        assert!(
            got["message"].as_str().unwrap().contains("budget exceeded"),
            "{got}"
        );
        // The text streamed before the cut reached the application.
        let streamed: String = (0..(MAX_TOKENS / TOKENS_PER_CHUNK) as usize)
            .map(text)
            .collect();
        assert_eq!(got["text"], streamed.as_str(), "{got}");
        match format {
            Format::OpenAiChat => {
                assert_eq!(got["openai_api_error"], true, "{got}");
            }
            Format::Anthropic => {
                assert_eq!(got["anthropic_status_error"], true, "{got}");
                assert_eq!(got["anthropic_api_error"], true, "{got}");
            }
        }
    }
}

/// An OpenAI chat stream the client asks the usage of: a role chunk,
/// `chunks` content deltas of `chars` characters (`chars / 4` output
/// tokens each), the stop chunk, the usage chunk and `[DONE]`.
fn openai_stream(chunks: usize, chars: usize) -> (HttpRequest, UpstreamResponse) {
    let body = serde_json::json!({
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "Tell me everything."}],
        "max_tokens": MAX_TOKENS,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let request = HttpRequest::post("/v1/chat/completions", &body.to_string())
        .header("authorization", "Bearer sk-test-overrun");
    let event = |choices: serde_json::Value, usage: serde_json::Value| {
        let chunk = serde_json::json!({
            "id": "chatcmpl-long",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": "gpt-4o-2024-08-06",
            "choices": choices,
            "usage": usage,
        });
        format!("data: {chunk}\n\n")
    };
    let delta = |d: serde_json::Value, finish: serde_json::Value| serde_json::json!([{"index": 0, "delta": d, "finish_reason": finish}]);
    let null = serde_json::Value::Null;
    let mut events = vec![event(
        delta(
            serde_json::json!({"role": "assistant", "content": ""}),
            null.clone(),
        ),
        null.clone(),
    )];
    for i in 0..chunks {
        let content = format!("{:<chars$}", format!("Part {i} of a long answer;"));
        events.push(event(
            delta(serde_json::json!({ "content": content }), null.clone()),
            null.clone(),
        ));
    }
    events.push(event(
        delta(serde_json::json!({}), "stop".into()),
        null.clone(),
    ));
    let output = (chunks * chars / 4) as u64;
    events.push(event(
        serde_json::json!([]),
        serde_json::json!({"prompt_tokens": 12, "completion_tokens": output, "total_tokens": 12 + output}),
    ));
    events.push("data: [DONE]\n\n".to_string());
    let refs: Vec<&str> = events.iter().map(String::as_str).collect();
    (request, UpstreamResponse::sse(&refs, false))
}

/// `tollgate_ext_proc_top_ups_total` for one outcome.
async fn top_ups(http_port: u16, outcome: &str) -> f64 {
    let series = format!("tollgate_ext_proc_top_ups_total{{outcome=\"{outcome}\"}}");
    tokio::task::spawn_blocking(move || common::metric(http_port, &series))
        .await
        .unwrap()
}

/// A top-up follows the stream's rate: each reserves about what the
/// stream has used so far, so an answer of 20,000 output tokens past a
/// reservation of 100 is covered in a handful of store calls (about six:
/// 1,000, 1,000, then doubling), where a fixed step of 1,000 would take
/// about twenty. The net charge is still what the answer used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_ups_grow_with_the_stream_so_a_long_answer_needs_few() {
    let (tollgate, envoy, _dir) = start(&budget(1_000_000, Some("cut")), &[]).await;
    let port = tollgate.http_port;
    // 200 chunks of 100 output tokens.
    let (request, upstream) = openai_stream(200, 400);
    let served = upstream.clone();
    let x = envoy.run(request, move |_| served).await;
    let (status, _, body) = x.response();
    assert_eq!(status, 200);
    assert_eq!(body, upstream.chunks.concat(), "the client gets every byte");
    wait_used(port, "output-daily", 20_000, SETTLE_DEADLINE).await;
    let reserved = top_ups(port, "reserved").await;
    assert!(
        (2.0..=8.0).contains(&reserved),
        "{reserved} top-ups for 20,000 tokens"
    );
    assert_eq!(top_ups(port, "no_room").await, 0.0);
}

/// A top-up that finds no room is counted by its outcome, as the ones
/// that reserve are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_with_no_room_is_counted() {
    let (tollgate, envoy, _dir) = start(&budget(150, None), &[]).await;
    let port = tollgate.http_port;
    let (request, upstream) = openai_stream(CONTENT_CHUNKS, 80);
    let served = upstream.clone();
    let x = envoy.run(request, move |_| served).await;
    assert_eq!(x.response().2, upstream.chunks.concat());
    wait_used(
        port,
        "output-daily",
        TOKENS_PER_CHUNK * CONTENT_CHUNKS as u64,
        SETTLE_DEADLINE,
    )
    .await;
    assert_eq!(top_ups(port, "no_room").await, 1.0);
    assert_eq!(top_ups(port, "reserved").await, 0.0);
}

/// Redis dies while a stream runs, just before its first top-up: the
/// top-up fails, and the rules' `on_store_error` says what follows.
/// Returns the exchange, what the upstream sent, and the server (with its
/// policy directory).
async fn top_up_on_a_dead_store(
    on_store_error: &str,
) -> (
    Exchange,
    UpstreamResponse,
    (common::TollgateProcess, tempfile::TempDir),
) {
    let policy = format!(
        "
rules:
  - id: output-daily
    limit: {{ output_tokens: 1000000, window: daily }}
    on_overrun: cut
    on_store_error: {on_store_error}
"
    );
    let mut redis = common::RedisServer::start();
    let url = redis.url();
    let (tollgate, envoy, dir) = start(&policy, &["--redis", &url]).await;
    // 300 chunks of 20 tokens: long enough for the failed top-up's answer
    // (within the store timeout) to come in while the stream runs.
    let (request, upstream) = openai_stream(300, 80);
    // The role chunk, then 20 tokens a chunk: the 4th content chunk
    // (index 4) brings the count to 80 of the 100 covered and starts the
    // first top-up. Redis dies before it.
    let (request, mut paused) = request.pause_after(Step::ResponseBody(3));
    let served = upstream.clone();
    let run = tokio::spawn(async move { envoy.run(request, move |_| served).await });
    paused.reached().await;
    redis.kill();
    paused.resume();
    let x = run.await.unwrap();
    (x, upstream, (tollgate, dir))
}

/// Fail closed and `on_overrun: cut`: the stream is cut past what its
/// reservation covered, with an error event that names the store, and the
/// fault is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_fault_in_a_top_up_cuts_a_fail_closed_stream() {
    let (x, upstream, (tollgate, _dir)) = top_up_on_a_dead_store("fail_closed").await;
    let chunks = cut_chunks(&x);
    assert!(chunks.len() < upstream.chunks.len(), "{x:#?}");
    let last = String::from_utf8(chunks.last().unwrap().clone()).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(last.strip_prefix("data: ").unwrap().trim_end()).unwrap();
    assert_eq!(json["error"]["code"], "store_unavailable", "{last}");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`output-daily`"),
        "{last}"
    );
    // Every chunk before the error event is the upstream's own.
    for (i, chunk) in chunks[..chunks.len() - 1].iter().enumerate() {
        assert_eq!(chunk, &upstream.chunks[i], "chunk {i}");
    }
    assert_eq!(top_ups(tollgate.http_port, "store_error").await, 1.0);
}

/// Fail open: the stream runs to its end, and the fault is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_fault_in_a_top_up_lets_a_fail_open_stream_finish() {
    let (x, upstream, (tollgate, _dir)) = top_up_on_a_dead_store("fail_open").await;
    let (status, _, body) = x.response();
    assert_eq!(status, 200);
    assert_eq!(body, upstream.chunks.concat(), "the client gets every byte");
    assert_eq!(top_ups(tollgate.http_port, "store_error").await, 1.0);
}

/// Runs `openai_stream(chunks, chars)` against `policy` with the decision
/// log on, stops the server (which flushes the log) and returns its lines.
async fn logged_stream(policy: &str, chunks: usize, chars: usize) -> Vec<serde_json::Value> {
    let out = tempfile::tempdir().unwrap();
    let log = out.path().join("audit.jsonl");
    let (mut tollgate, envoy, _dir) = start(policy, &["--audit-log", log.to_str().unwrap()]).await;
    let (request, upstream) = openai_stream(chunks, chars);
    let served = upstream.clone();
    let x = envoy.run(request, move |_| served).await;
    assert_eq!(x.response().2, upstream.chunks.concat());
    wait_used(
        tollgate.http_port,
        "output-daily",
        (chunks * chars / 4) as u64,
        SETTLE_DEADLINE,
    )
    .await;
    assert!(tollgate.signal_and_wait("TERM").success());
    std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Each top-up is a line of the decision log, after the call's decision
/// and with its request id: what it reserved, or the rule with no room
/// and what the stream does next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_ups_are_in_the_decision_log() {
    let lines = logged_stream(&budget(1_000_000, None), 200, 400).await;
    assert_eq!(lines[0]["event"], "decision", "{lines:#?}");
    assert_eq!(lines[0]["verdict"], "allow");
    let request_id = lines[0]["request_id"].as_str().unwrap();
    let top_ups = &lines[1..];
    assert!((2..=8).contains(&top_ups.len()), "{lines:#?}");
    let mut reserved = 0;
    for line in top_ups {
        assert_eq!(line["event"], "top_up", "{line}");
        assert_eq!(line["request_id"], request_id, "{line}");
        assert_eq!(line["verdict"], "allow", "{line}");
        assert_eq!(line["reason"], "topped_up", "{line}");
        assert_eq!(line["charged"], true, "{line}");
        assert_eq!(line["rules"], serde_json::json!(["output-daily"]), "{line}");
        let charge = &line["charge"][0];
        assert_eq!(charge["unit"], "output_tokens", "{line}");
        reserved += charge["amount"].as_str().unwrap().parse::<u64>().unwrap();
    }
    // Together with the first 100, the top-ups covered the 20,000 used.
    assert!(reserved + MAX_TOKENS >= 20_000, "{reserved}: {lines:#?}");

    let lines = logged_stream(&budget(150, None), CONTENT_CHUNKS, 80).await;
    let denied: Vec<_> = lines.iter().filter(|l| l["event"] == "top_up").collect();
    assert_eq!(denied.len(), 1, "{lines:#?}");
    let line = denied[0];
    assert_eq!(line["verdict"], "deny", "{line}");
    assert_eq!(line["reason"], "budget_exceeded", "{line}");
    assert_eq!(line["rule"], "output-daily", "{line}");
    assert_eq!(line["charged"], false, "{line}");
    let message = line["message"].as_str().unwrap();
    assert!(
        message.contains("under `output-daily`") && message.contains("on_overrun: finish"),
        "{message}"
    );
}
