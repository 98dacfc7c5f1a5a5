//! The Envoy ext_proc path against a real `tollgate serve`, driven by a
//! fake Envoy (tests/common/envoy_ext_proc.rs) that sends every message as
//! Envoy does under the shipped processing mode and refuses any reply
//! Envoy would refuse: one stream per exchange, the request decided on its
//! body, the response metered as it streams, the reservation settled at
//! what the upstream reports.

mod common;

use std::time::{Duration, Instant};

use common::envoy_ext_proc::{
    durable_redis, start, used, wait_used, Exchange, FakeEnvoy, Forwarded, Headers, HttpRequest,
    Outcome, Step, UpstreamResponse,
};
use common::RedisServer;
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Reply;

/// How long a settle (off the response path) may take to show.
const SETTLE_DEADLINE: Duration = Duration::from_secs(5);

fn chat_body(max_tokens: u32, stream: bool) -> String {
    let mut body = serde_json::json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello to the team."}
        ],
        "max_tokens": max_tokens,
    });
    if stream {
        body["stream"] = true.into();
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    body.to_string()
}

fn chat(max_tokens: u32, stream: bool) -> HttpRequest {
    HttpRequest::post("/v1/chat/completions", &chat_body(max_tokens, stream))
        .header("authorization", "Bearer sk-test-ext-proc")
}

/// An OpenAI chat completion reporting `output` completion tokens.
fn chat_json(output: u64) -> UpstreamResponse {
    UpstreamResponse::json(
        &serde_json::json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": "gpt-4o-2024-08-06",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "Hello, team! Hope the week is going well."},
                "logprobs": null,
                "finish_reason": "stop"
            }],
            "usage": {
                "prompt_tokens": 14,
                "completion_tokens": output,
                "total_tokens": 14 + output
            },
            "system_fingerprint": "fp_1"
        })
        .to_string(),
    )
}

/// An OpenAI chat stream as the API sends it: content deltas, and with
/// `stream_options.include_usage` a `"usage":null` in each chunk and a
/// last chunk with empty choices and the usage, then `[DONE]`.
fn chat_sse_text(include_usage: bool, output: u64) -> String {
    let event = |choices: serde_json::Value, usage: Option<serde_json::Value>| {
        let mut chunk = serde_json::json!({
            "id": "chatcmpl-2",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": "gpt-4o-2024-08-06",
            "system_fingerprint": "fp_1",
            "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        format!("data: {chunk}\n\n")
    };
    let delta = |d: serde_json::Value, finish: serde_json::Value| serde_json::json!([{"index": 0, "delta": d, "logprobs": null, "finish_reason": finish}]);
    let null = || include_usage.then_some(serde_json::Value::Null);
    let mut events = vec![
        event(
            delta(
                serde_json::json!({"role": "assistant", "content": ""}),
                serde_json::Value::Null,
            ),
            null(),
        ),
        event(
            delta(
                serde_json::json!({"content": "Hello"}),
                serde_json::Value::Null,
            ),
            null(),
        ),
        event(
            delta(
                serde_json::json!({"content": ", team!"}),
                serde_json::Value::Null,
            ),
            null(),
        ),
        event(delta(serde_json::json!({}), "stop".into()), null()),
    ];
    if include_usage {
        events.push(event(
            serde_json::json!([]),
            Some(serde_json::json!({"prompt_tokens": 14, "completion_tokens": output, "total_tokens": 14 + output})),
        ));
    }
    events.push("data: [DONE]\n\n".to_string());
    events.concat()
}

/// [`chat_sse_text`] with the usage, split across chunks in the middle of
/// events, as TCP delivers them, and ended by a separate chunked
/// terminator.
fn chat_sse(output: u64) -> UpstreamResponse {
    split(&chat_sse_text(true, output), 3, true)
}

/// An Anthropic Messages stream: the input count in `message_start`, the
/// output count in `message_delta`.
fn anthropic_sse(output: u64) -> UpstreamResponse {
    let event = |name: &str, data: serde_json::Value| format!("event: {name}\ndata: {data}\n\n");
    let text = [
        event(
            "message_start",
            serde_json::json!({"type": "message_start", "message": {
                "id": "msg_1", "type": "message", "role": "assistant", "content": [],
                "model": "claude-sonnet-4-5-20250929", "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 12, "cache_creation_input_tokens": 0,
                          "cache_read_input_tokens": 0, "output_tokens": 1}
            }}),
        ),
        event(
            "content_block_start",
            serde_json::json!({"type": "content_block_start", "index": 0,
                               "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", serde_json::json!({"type": "ping"})),
        event(
            "content_block_delta",
            serde_json::json!({"type": "content_block_delta", "index": 0,
                               "delta": {"type": "text_delta", "text": "Hello, team!"}}),
        ),
        event(
            "content_block_stop",
            serde_json::json!({"type": "content_block_stop", "index": 0}),
        ),
        event(
            "message_delta",
            serde_json::json!({"type": "message_delta",
                               "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                               "usage": {"output_tokens": output}}),
        ),
        event("message_stop", serde_json::json!({"type": "message_stop"})),
    ]
    .concat();
    split(&text, 4, false)
}

/// `text` as an event stream in `n` chunks of about equal size, cut
/// anywhere.
fn split(text: &str, n: usize, separate_end: bool) -> UpstreamResponse {
    let bytes = text.as_bytes();
    let size = bytes.len().div_ceil(n);
    let chunks: Vec<&str> = bytes
        .chunks(size)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    UpstreamResponse::sse(&chunks, separate_end)
}

/// The allowed exchange's response, with every chunk the upstream sent.
fn assert_served(x: &Exchange, upstream: &UpstreamResponse) {
    let (status, _, body) = x.response();
    assert_eq!(status, upstream.status);
    assert_eq!(body, upstream.chunks.concat(), "the client gets every byte");
    assert!(x.ignored.is_empty(), "Envoy ignored {:?}", x.ignored);
}

fn forwarded(x: &Exchange) -> &Forwarded {
    x.forwarded.as_ref().expect("the request went upstream")
}

/// 1. Each call reserves its 900-token maximum and settles at what the
/// upstream reports, whether the report is in a JSON body, a final OpenAI
/// stream chunk or Anthropic's `message_delta`: three fit in 1,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_900_token_calls_fit_a_1000_token_budget_by_settling_at_real_usage() {
    let policy = "
rules:
  - id: output-daily
    limit: { output_tokens: 1000, window: daily }
";
    let (tollgate, envoy, _dir) = start(policy, &[]).await;
    let port = tollgate.http_port;

    // OpenAI chat, JSON: 900 reserved, 20 used.
    let upstream = chat_json(20);
    let x = envoy.run(chat(900, false), |_| upstream.clone()).await;
    assert_served(&x, &upstream);
    let (_, headers, _) = x.response();
    assert_eq!(
        headers.get("x-ratelimit-remaining-output-tokens"),
        Some("100"),
        "{headers:?}"
    );
    let sent = forwarded(&x);
    assert_eq!(sent.headers.get("x-tollgate-decision"), Some("allow"));
    assert_eq!(
        sent.body,
        chat_body(900, false).as_bytes(),
        "the body is untouched"
    );
    assert!(
        x.sent.contains(&Step::ResponseBody(0)),
        "a metered response is read"
    );
    wait_used(port, "output-daily", 20, SETTLE_DEADLINE).await;

    // OpenAI chat, SSE with the usage in its last chunk: 20 + 21.
    let upstream = chat_sse(21);
    let x = envoy.run(chat(900, true), |_| upstream.clone()).await;
    assert_served(&x, &upstream);
    assert_eq!(
        x.sent.last(),
        Some(&Step::ResponseBody(upstream.chunks.len())),
        "the chunked terminator goes as an empty chunk with end_of_stream"
    );
    wait_used(port, "output-daily", 41, SETTLE_DEADLINE).await;

    // Anthropic Messages, SSE: 41 + 22.
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":900,"stream":true,"system":"Be brief.","messages":[{"role":"user","content":"Say hello to the team."}]}"#;
    let request = HttpRequest::post("/v1/messages", body)
        .header("x-api-key", "sk-ant-test")
        .header("anthropic-version", "2023-06-01");
    let upstream = anthropic_sse(22);
    let x = envoy.run(request, |_| upstream.clone()).await;
    assert_served(&x, &upstream);
    wait_used(port, "output-daily", 63, SETTLE_DEADLINE).await;

    // One that uses all it asked for: 63 + 900.
    let upstream = chat_json(900);
    let x = envoy.run(chat(900, false), |_| upstream.clone()).await;
    assert_served(&x, &upstream);
    wait_used(port, "output-daily", 963, SETTLE_DEADLINE).await;

    // 963 + 40 would not fit: Envoy answers for tollgate, and the
    // upstream never sees the call.
    let x = envoy
        .run(chat(40, false), |_| {
            panic!("a denied call must not reach the upstream")
        })
        .await;
    let (status, headers, body) = x.local();
    assert_eq!(status, 429);
    assert_eq!(headers.get("content-type"), Some("application/json"));
    assert_eq!(headers.get("x-should-retry"), Some("false"));
    assert_eq!(headers.get("x-tollgate-rule"), Some("output-daily"));
    assert_eq!(body["error"]["code"], "budget_exceeded");
    assert_eq!(body["error"]["type"], "insufficient_quota");
    assert_eq!(x.sent, [Step::RequestHeaders, Step::RequestBody]);
    assert_eq!(
        used(port, "output-daily").await,
        Some(963),
        "a denial costs nothing"
    );
}

/// 1b. An OpenAI stream that does not ask for its usage is made to (the
/// forwarded body, with its content-length, asks), settles at it, and the
/// client still gets the stream it asked for: no usage chunk, no
/// `"usage":null`, every other byte, however the chunks split.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_stream_is_asked_for_its_usage_and_the_client_sees_the_stream_it_asked_for() {
    let policy = "
rules:
  - id: output-daily
    limit: { output_tokens: 1000, window: daily }
";
    let (tollgate, envoy, _dir) = start(policy, &[]).await;
    let mut total = 0;
    for (output, pieces, separate_end) in [(15, 3, true), (16, 5, false), (17, 1, false)] {
        let mut body: serde_json::Value = serde_json::from_str(&chat_body(900, true)).unwrap();
        body.as_object_mut().unwrap().remove("stream_options");
        let request = HttpRequest::post("/v1/chat/completions", &body.to_string());
        let x = envoy
            .run(request, |fwd| {
                let asked = fwd.json()["stream_options"]["include_usage"] == true;
                split(&chat_sse_text(asked, output), pieces, separate_end)
            })
            .await;
        let sent = forwarded(&x);
        let mut asked = body.clone();
        asked["stream_options"] = serde_json::json!({"include_usage": true});
        assert_eq!(sent.json(), asked, "only include_usage is added");
        assert_eq!(
            sent.headers.get("content-length"),
            Some(&*sent.body.len().to_string())
        );
        let (status, _, got) = x.response();
        assert_eq!(status, 200);
        assert_eq!(
            String::from_utf8(got).unwrap(),
            chat_sse_text(false, output),
            "in {pieces} pieces"
        );
        assert!(x.ignored.is_empty(), "Envoy ignored {:?}", x.ignored);
        total += output;
        wait_used(tollgate.http_port, "output-daily", total, SETTLE_DEADLINE).await;
    }
}

/// 2. A `concurrent` slot is held from the decision to the end of the
/// exchange, and given back when it completes or when Envoy closes the
/// stream part-way through the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_slot_is_held_for_the_exchange_and_given_back_at_its_end_or_when_cut() {
    let policy = "
rules:
  - id: one-at-a-time
    limit: { concurrent: 1 }
";
    let (_tollgate, envoy, _dir) = start(policy, &[]).await;
    let denied_busy = |x: &Exchange| {
        let (status, headers, body) = x.local();
        assert_eq!(status, 429);
        assert_eq!(headers.get("x-should-retry"), Some("true"), "{headers:?}");
        assert_eq!(headers.get("x-tollgate-rule"), Some("one-at-a-time"));
        assert_eq!(headers.get("content-type"), Some("application/json"));
        assert_eq!(body["error"]["code"], "concurrency_limit");
    };
    // Polls until a call is allowed again, and plays it through.
    let until_allowed = |what: &'static str| {
        let envoy = envoy.clone();
        async move {
            let deadline = Instant::now() + SETTLE_DEADLINE;
            loop {
                let upstream = chat_json(5);
                let x = envoy.run(chat(50, false), |_| upstream.clone()).await;
                if !x.is_local() {
                    assert_served(&x, &upstream);
                    return;
                }
                denied_busy(&x);
                assert!(
                    Instant::now() < deadline,
                    "the slot was not given back {what}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    // Held while the upstream thinks.
    let (first, mut paused) = chat(50, false).pause_after(Step::RequestBody);
    let held = tokio::spawn({
        let envoy = envoy.clone();
        async move { envoy.run(first, |_| chat_json(5)).await }
    });
    paused.reached().await;
    let second = envoy
        .run(chat(50, false), |_| panic!("the slot is taken"))
        .await;
    denied_busy(&second);
    paused.resume();
    let first = held.await.unwrap();
    assert_eq!(first.response().0, 200);
    until_allowed("after the exchange completed").await;

    // Held mid-body, and given back when Envoy closes the stream there (the
    // client went away after the first chunk).
    let (cut, mut paused) = chat(50, true)
        .close_after(Step::ResponseBody(0))
        .pause_after(Step::ResponseBody(0));
    let closing = tokio::spawn({
        let envoy = envoy.clone();
        async move { envoy.run(cut, |_| chat_sse(5)).await }
    });
    paused.reached().await;
    let meanwhile = envoy
        .run(chat(50, false), |_| panic!("the slot is taken"))
        .await;
    denied_busy(&meanwhile);
    paused.resume();
    let cut = closing.await.unwrap();
    assert!(
        matches!(
            cut.outcome,
            Outcome::Closed {
                at: Step::ResponseBody(0)
            }
        ),
        "{:?}",
        cut.outcome
    );
    until_allowed("after Envoy closed the stream mid-body").await;

    // Closed at every other phase after the decision: the slot comes back.
    for at in [Step::RequestBody, Step::ResponseHeaders] {
        let x = envoy
            .run(chat(50, true).close_after(at), |_| chat_sse(5))
            .await;
        assert!(
            matches!(x.outcome, Outcome::Closed { at: a } if a == at),
            "{:?}",
            x.outcome
        );
        until_allowed("after Envoy closed the stream").await;
    }
}

/// 3. Route attributes arrive as the stream's initial gRPC metadata
/// (`ExtProcPerRoute.overrides.grpc_initial_metadata`); a client header
/// cannot stand in for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_attributes_come_from_stream_metadata_never_from_client_headers() {
    let policy = "
rules:
  - id: agent-requests
    match: { workflow: research-agent }
    limit: { requests: 1, window: daily }
";
    let (_tollgate, envoy, _dir) = start(policy, &[]).await;
    let agent = || chat(10, false).route("workflow", "research-agent");

    let x = envoy.run(agent(), |_| chat_json(3)).await;
    assert_eq!(x.response().0, 200);
    let (_, headers, _) = x.response();
    assert_eq!(headers.get("x-tollgate-rule"), Some("agent-requests"));

    // The route's one request is spent, whatever the client claims.
    let x = envoy
        .run(
            agent().header("x-tollgate-workflow", "something-else"),
            |_| panic!("over the route's budget"),
        )
        .await;
    let (status, headers, _) = x.local();
    assert_eq!(status, 429);
    assert_eq!(headers.get("x-tollgate-rule"), Some("agent-requests"));

    // A client claiming the workflow without the route is not counted
    // under it, nor is a route that names another workflow.
    for request in [
        chat(10, false).header("x-tollgate-workflow", "research-agent"),
        chat(10, false)
            .route("workflow", "batch")
            .header("x-tollgate-workflow", "research-agent"),
        chat(10, false).header("x-tollgate-route-workflow", "research-agent"),
    ] {
        let upstream = chat_json(3);
        let x = envoy.run(request, |_| upstream.clone()).await;
        assert_served(&x, &upstream);
        let (_, headers, _) = x.response();
        assert_eq!(headers.get("x-tollgate-rule"), None, "{headers:?}");
    }
}

/// 4. Past a premium cap with `on_exceed: downgrade`, the forwarded body
/// names the cheaper model, with a content-length that matches it (which
/// the fake Envoy enforces, as Envoy does), and the model header is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downgrade_rewrites_the_forwarded_body_with_a_matching_content_length() {
    let policy = r#"
pricing:
  models:
    gpt-5: { input_per_mtok: 1.25, output_per_mtok: 10.00 }
    gpt-4o-mini: { input_per_mtok: 0.15, output_per_mtok: 0.60 }
  families:
    premium: ["gpt-5*"]
rules:
  - id: premium
    match: { model_family: premium }
    limit: { requests: 1, window: daily }
    on_exceed: { downgrade: gpt-4o-mini }
"#;
    let (_tollgate, envoy, _dir) = start(policy, &[]).await;
    // Spacing and non-ASCII text, so that a rewrite changes the length.
    let body = "{ \"model\": \"gpt-5\",\n  \"input\": \"Résumé ✓ — summarise this\",\n  \"max_output_tokens\": 64 }";
    let request = || HttpRequest::post("/v1/responses", body);
    let reply = |model: &str| {
        UpstreamResponse::json(
            &serde_json::json!({
                "id": "resp_1", "object": "response", "model": model, "status": "completed",
                "output": [{"type": "message", "role": "assistant",
                            "content": [{"type": "output_text", "text": "Done."}]}],
                "usage": {"input_tokens": 9, "output_tokens": 2, "total_tokens": 11}
            })
            .to_string(),
        )
    };

    let x = envoy.run(request(), |_| reply("gpt-5")).await;
    let sent = forwarded(&x);
    assert_eq!(sent.headers.get("x-tollgate-decision"), Some("allow"));
    assert_eq!(
        sent.body,
        body.as_bytes(),
        "within the cap, the body is untouched"
    );
    assert_eq!(sent.headers.get("x-tollgate-model"), None);

    let x = envoy.run(request(), |_| reply("gpt-4o-mini")).await;
    assert_eq!(x.response().0, 200);
    let sent = forwarded(&x);
    assert_eq!(sent.headers.get("x-tollgate-decision"), Some("downgrade"));
    assert_eq!(sent.headers.get("x-tollgate-model"), Some("gpt-4o-mini"));
    assert_eq!(
        sent.headers.get("content-length"),
        Some(&*sent.body.len().to_string())
    );
    assert_eq!(sent.headers.all("content-length").len(), 1);
    let json = sent.json();
    assert_eq!(json["model"], "gpt-4o-mini");
    let mut expected: serde_json::Value = serde_json::from_str(body).unwrap();
    expected["model"] = "gpt-4o-mini".into();
    assert_eq!(json, expected, "only the model changes");
    // The rewrite is in the reply to the body, the only one Envoy applies
    // a buffered body mutation from.
    let reply = x.reply_to(Step::RequestBody).unwrap();
    assert!(matches!(&reply.response, Some(Reply::RequestBody(b))
        if b.response.as_ref().is_some_and(|c| c.body_mutation.is_some())));

    // A Gemini call names its model in its path, which no body rewrite
    // changes: past the cap it is refused, never reported as downgraded
    // while the premium model runs.
    let gemini = HttpRequest::post(
        "/v1beta/models/gpt-5:generateContent",
        r#"{"contents":[{"parts":[{"text":"Summarise this"}]}]}"#,
    );
    let x = envoy
        .run(gemini, |_| panic!("past the cap with no rewrite"))
        .await;
    let (status, headers, _) = x.local();
    assert_eq!(status, 429);
    assert_eq!(headers.get("x-tollgate-rule"), Some("premium"));
}

/// 5. A call no rule meters has nothing to settle: the reply to its
/// response headers turns the response body off, and Envoy sends none of
/// it; a metered call's body is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_with_nothing_to_settle_turns_the_response_body_off() {
    let policy = "
rules:
  - id: agent-output
    match: { workflow: research-agent }
    limit: { output_tokens: 100000, window: daily }
";
    let (_tollgate, envoy, _dir) = start(policy, &[]).await;
    let upstream = chat_sse(7);

    let x = envoy.run(chat(100, true), |_| upstream.clone()).await;
    assert_served(&x, &upstream);
    let reply = x
        .reply_to(Step::ResponseHeaders)
        .expect("response headers sent");
    let mode = reply
        .mode_override
        .as_ref()
        .unwrap_or_else(|| panic!("no mode_override in {reply:?}"));
    assert_eq!(mode.response_body_mode, BodySendMode::None as i32);
    assert!(!x.sent_response_body(), "sent {:?}", x.sent);
    assert_eq!(
        x.sent,
        [
            Step::RequestHeaders,
            Step::RequestBody,
            Step::ResponseHeaders
        ]
    );

    let metered = envoy
        .run(chat(100, true).route("workflow", "research-agent"), |_| {
            upstream.clone()
        })
        .await;
    assert_served(&metered, &upstream);
    let reply = metered.reply_to(Step::ResponseHeaders).unwrap();
    assert!(reply.mode_override.is_none(), "{reply:?}");
    assert_eq!(
        metered.sent.len(),
        3 + upstream.chunks.len() + 1,
        "every chunk, and the terminator: {:?}",
        metered.sent
    );
}

/// 6. Redis dies after the request was decided. The response still
/// streams to its end; the settle waits for Redis, lands once it is back,
/// and is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settle_outlives_a_redis_outage_and_is_applied_once() {
    let policy = "
rules:
  - id: output-daily
    limit: { output_tokens: 1000, window: daily }
";
    // A Redis that keeps what it acknowledged through a crash: one that
    // comes back empty has lost the reservation, and with it anything a
    // settle could apply.
    let data = tempfile::tempdir().unwrap();
    let redis_port = common::free_port();
    let mut redis: RedisServer = durable_redis(redis_port, data.path());
    let url = redis.url();
    let (tollgate, envoy, _dir) = start(policy, &["--redis", &url]).await;
    let port = tollgate.http_port;

    let upstream = chat_sse(20);
    let (request, mut paused) = chat(500, true).pause_after(Step::RequestBody);
    let exchange = tokio::spawn({
        let envoy = envoy.clone();
        let upstream = upstream.clone();
        async move { envoy.run(request, move |_| upstream).await }
    });
    paused.reached().await;
    wait_used(port, "output-daily", 500, SETTLE_DEADLINE).await;
    redis.kill();
    paused.resume();

    // Every reply still comes within message_timeout, and the client
    // gets the whole stream.
    let x = exchange.await.unwrap();
    assert_served(&x, &upstream);
    assert!(used(port, "output-daily").await.is_none(), "Redis is down");

    let _redis = durable_redis(redis_port, data.path());
    wait_used(port, "output-daily", 20, Duration::from_secs(10)).await;
    // Once: a second application would have taken another 480 off.
    let again = chat_json(1);
    let x = envoy.run(chat(10, false), |_| again.clone()).await;
    assert_served(&x, &again);
    wait_used(port, "output-daily", 21, SETTLE_DEADLINE).await;
}

/// An ext_authz CheckRequest for the same request, as Envoy builds it.
fn authz_request(
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    context: &[(&str, &str)],
) -> envoy_types::pb::envoy::service::auth::v3::CheckRequest {
    let mut all: std::collections::HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    all.insert(":path".into(), path.into());
    all.insert(":method".into(), "POST".into());
    all.insert(":authority".into(), "api.example.com".into());
    all.insert("content-length".into(), body.len().to_string());
    all.insert(
        "x-request-id".into(),
        format!("authz-{}", std::process::id()),
    );
    common::envoy_authz::check_request(all["x-request-id"].clone(), path, all, body, context)
}

/// The headers a denial carries, whoever sends it, without what Envoy
/// adds to any local reply.
fn denial_headers(headers: &Headers) -> Vec<(String, String)> {
    headers
        .sorted()
        .into_iter()
        .filter(|(k, _)| k != ":status" && k != "content-length")
        .collect()
}

/// 7. A denial over ext_proc is the same response as over ext_authz:
/// status, headers and JSON body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_is_the_same_response_as_ext_authz_sends() {
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
    let policy = r#"
rules:
  - id: agent-requests
    match: { workflow: research-agent }
    limit: { requests: 1, window: daily }
  - id: no-preview-models
    match: { model: "*-preview" }
    limit: { requests: 0, window: daily }
"#;
    let (tollgate, envoy, _dir) = start(policy, &[]).await;
    let channel = tonic::transport::Channel::from_shared(tollgate.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut authz = AuthorizationClient::new(channel);
    let client_headers = [
        ("content-type", "application/json"),
        ("authorization", "Bearer sk-test-ext-proc"),
    ];
    let proc_request = |body: &str, route: &[(&str, &str)]| {
        let mut r = HttpRequest::post("/v1/chat/completions", body);
        r.headers = client_headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in route {
            r = r.route(k, v);
        }
        r
    };

    let agent = [("workflow", "research-agent")];
    let body = chat_body(10, false);
    let x = envoy
        .run(proc_request(&body, &agent), |_| chat_json(2))
        .await;
    assert_eq!(x.response().0, 200);

    let preview = r#"{"model":"gpt-5-preview","messages":[{"role":"user","content":"hi"}]}"#;
    for (body, route, timed) in [(&*body, &agent[..], true), (preview, &[][..], false)] {
        let x = envoy
            .run(proc_request(body, route), |_| panic!("denied"))
            .await;
        let (status, headers, json) = x.local();
        let check = authz
            .check(authz_request(
                "/v1/chat/completions",
                &client_headers,
                body,
                route,
            ))
            .await
            .unwrap()
            .into_inner();
        let Some(HttpResponse::DeniedResponse(denied)) = check.http_response else {
            panic!("ext_authz must deny too: {check:?}")
        };
        assert_eq!(
            i32::from(status),
            denied.status.unwrap().code,
            "the same HTTP status"
        );
        let authz_json: serde_json::Value = serde_json::from_str(&denied.body).unwrap();
        assert_eq!(json, authz_json, "the same JSON body");
        let mut authz_headers: Vec<(String, String)> = denied
            .headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect();
        authz_headers.sort();
        let mut proc_headers = denial_headers(headers);
        if timed {
            // Seconds until the daily reset, read a moment apart.
            let retry_after = |h: &mut Vec<(String, String)>| -> i64 {
                let i = h.iter().position(|(k, _)| k == "retry-after").unwrap();
                h.remove(i).1.parse().unwrap()
            };
            let (a, b) = (
                retry_after(&mut proc_headers),
                retry_after(&mut authz_headers),
            );
            assert!((a - b).abs() <= 1, "retry-after {a} and {b}");
        }
        assert_eq!(proc_headers, authz_headers, "the same headers");
        assert!(proc_headers.contains(&("content-type".into(), "application/json".into())));
    }
}

/// The fake Envoy itself: against a processor scripted to break Envoy's
/// rules, it refuses what Envoy refuses and ignores what Envoy ignores.
mod the_fake_envoy {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
    use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::ProcessingMode;
    use envoy_types::pb::envoy::r#type::v3::HttpStatus;
    use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
        ExternalProcessor, ExternalProcessorServer,
    };
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Msg;
    use envoy_types::pb::envoy::service::ext_proc::v3::{
        body_mutation, BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse,
        ImmediateResponse, ProcessingRequest, ProcessingResponse,
    };
    use std::sync::Arc;

    /// The replies to one message: none (the processor stays silent), one,
    /// or more.
    type Script = Arc<dyn Fn(&Msg) -> Vec<ProcessingResponse> + Send + Sync>;

    struct Scripted(Script);

    #[tonic::async_trait]
    impl ExternalProcessor for Scripted {
        type ProcessStream =
            tokio_stream::wrappers::ReceiverStream<Result<ProcessingResponse, tonic::Status>>;

        async fn process(
            &self,
            request: tonic::Request<tonic::Streaming<ProcessingRequest>>,
        ) -> Result<tonic::Response<Self::ProcessStream>, tonic::Status> {
            let mut inbound = request.into_inner();
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            let script = self.0.clone();
            tokio::spawn(async move {
                while let Ok(Some(m)) = inbound.message().await {
                    for reply in script(m.request.as_ref().unwrap()) {
                        if tx.send(Ok(reply)).await.is_err() {
                            return;
                        }
                    }
                }
            });
            Ok(tonic::Response::new(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
        }
    }

    async fn envoy_for(script: Script) -> FakeEnvoy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ExternalProcessorServer::new(Scripted(script)))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        FakeEnvoy::connect(format!("http://{addr}")).await
    }

    fn reply(r: Reply) -> ProcessingResponse {
        ProcessingResponse {
            response: Some(r),
            ..Default::default()
        }
    }

    /// The plain reply to each message: continue, unchanged.
    fn pass(m: &Msg) -> ProcessingResponse {
        reply(match m {
            Msg::RequestHeaders(_) => Reply::RequestHeaders(HeadersResponse::default()),
            Msg::RequestBody(_) => Reply::RequestBody(BodyResponse::default()),
            Msg::ResponseHeaders(_) => Reply::ResponseHeaders(HeadersResponse::default()),
            Msg::ResponseBody(_) => Reply::ResponseBody(BodyResponse::default()),
            other => panic!("not in this mode: {other:?}"),
        })
    }

    fn header(key: &str, value: &str, raw: &str) -> HeaderValueOption {
        HeaderValueOption {
            header: Some(HeaderValue {
                key: key.into(),
                value: value.into(),
                raw_value: raw.as_bytes().to_vec(),
            }),
            ..Default::default()
        }
    }

    fn common(set: Vec<HeaderValueOption>, body: Option<&str>) -> CommonResponse {
        CommonResponse {
            header_mutation: Some(HeaderMutation {
                set_headers: set,
                remove_headers: Vec::new(),
            }),
            body_mutation: body.map(|b| BodyMutation {
                mutation: Some(body_mutation::Mutation::Body(b.as_bytes().to_vec())),
            }),
            ..Default::default()
        }
    }

    /// A processor that answers the request body with `body_reply`.
    fn on_request_body(body_reply: impl Fn() -> CommonResponse + Send + Sync + 'static) -> Script {
        Arc::new(move |m| match m {
            Msg::RequestBody(_) => vec![reply(Reply::RequestBody(BodyResponse {
                response: Some(body_reply()),
            }))],
            m => vec![pass(m)],
        })
    }

    async fn violation(script: Script) -> String {
        let envoy = envoy_for(script).await;
        match envoy.exchange(chat(10, true), |_| chat_sse(3)).await {
            Ok(x) => panic!("the fake accepted what Envoy refuses: {x:#?}"),
            Err(v) => v.to_string(),
        }
    }

    #[tokio::test]
    async fn refuses_header_values_outside_raw_value() {
        let v = violation(on_request_body(|| {
            common(vec![header("x-a", "1", "")], None)
        }))
        .await;
        assert!(v.contains("not `raw_value`"), "{v}");
        let v = violation(on_request_body(|| {
            common(vec![header("x-a", "1", "1")], None)
        }))
        .await;
        assert!(v.contains("Only one of value or raw_value"), "{v}");
        let v = violation(on_request_body(|| {
            common(vec![header("x-a", "", "a\r\nb")], None)
        }))
        .await;
        assert!(v.contains("invalid characters"), "{v}");
    }

    /// Header values go in `raw_value`, or, when asked, in `value` alone,
    /// in the request and the response headers alike.
    #[tokio::test]
    async fn sends_header_values_in_raw_value_or_when_asked_in_value() {
        for in_value in [false, true] {
            let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
            let record = seen.clone();
            let envoy = envoy_for(Arc::new(move |m| {
                if let Msg::RequestHeaders(h) | Msg::ResponseHeaders(h) = m {
                    let headers = h.headers.clone().unwrap_or_default().headers;
                    record.lock().unwrap().extend(headers);
                }
                vec![pass(m)]
            }))
            .await;
            let request = if in_value {
                chat(10, true).values_in_value()
            } else {
                chat(10, true)
            };
            let upstream = chat_sse(3);
            let x = envoy.run(request, |_| upstream.clone()).await;
            assert_served(&x, &upstream);
            let seen = seen.lock().unwrap();
            for key in [":path", ":status", "authorization", "content-type"] {
                let h = seen.iter().find(|h| h.key == key).unwrap();
                assert_eq!(
                    (h.value.is_empty(), h.raw_value.is_empty()),
                    (!in_value, in_value),
                    "{h:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn refuses_a_mutated_body_whose_content_length_does_not_match() {
        let v = violation(on_request_body(|| common(Vec::new(), Some("{}")))).await;
        assert!(v.contains("mismatch between content length"), "{v}");
        // With the matching length, it goes upstream.
        let envoy = envoy_for(on_request_body(|| {
            common(vec![header("content-length", "", "2")], Some("{}"))
        }))
        .await;
        let x = envoy.run(chat(10, true), |_| chat_sse(3)).await;
        assert_eq!(forwarded(&x).body, b"{}");
    }

    #[tokio::test]
    async fn refuses_replies_of_the_wrong_kind_extra_replies_and_silence() {
        let v = violation(Arc::new(|m| match m {
            Msg::RequestBody(_) => vec![reply(Reply::RequestHeaders(HeadersResponse::default()))],
            m => vec![pass(m)],
        }))
        .await;
        assert!(v.contains("wrong kind"), "{v}");
        let v = violation(Arc::new(|m| match m {
            Msg::RequestHeaders(_) => vec![pass(m), pass(m)],
            m => vec![pass(m)],
        }))
        .await;
        // Caught before the next message, or taken as the reply to it.
        assert!(
            v.contains("nobody asked for") || v.contains("wrong kind"),
            "{v}"
        );
        let v = violation(Arc::new(|m| match m {
            Msg::ResponseHeaders(_) => Vec::new(),
            m => vec![pass(m)],
        }))
        .await;
        assert!(v.contains("message_timeout"), "{v}");
    }

    #[tokio::test]
    async fn honours_mode_override_only_in_a_headers_reply() {
        let off = || ProcessingMode {
            response_body_mode: BodySendMode::None as i32,
            ..Default::default()
        };
        let in_body_reply: Script = Arc::new(move |m| {
            let mut r = pass(m);
            if matches!(m, Msg::ResponseBody(_)) {
                r.mode_override = Some(off());
            }
            vec![r]
        });
        let envoy = envoy_for(in_body_reply).await;
        let upstream = chat_sse(3);
        let x = envoy.run(chat(10, true), |_| upstream.clone()).await;
        assert_eq!(
            x.sent
                .iter()
                .filter(|s| matches!(s, Step::ResponseBody(_)))
                .count(),
            upstream.chunks.len() + 1,
            "every chunk is still sent"
        );
        assert!(
            x.ignored.iter().any(|i| i.contains("mode_override")),
            "{:?}",
            x.ignored
        );

        let in_headers_reply: Script = Arc::new(move |m| {
            let mut r = pass(m);
            if matches!(m, Msg::ResponseHeaders(_)) {
                r.mode_override = Some(off());
            }
            vec![r]
        });
        let envoy = envoy_for(in_headers_reply).await;
        let x = envoy.run(chat(10, true), |_| upstream.clone()).await;
        assert!(!x.sent_response_body(), "{:?}", x.sent);
        assert_served(&x, &upstream);
    }

    #[tokio::test]
    async fn an_immediate_response_is_a_local_reply_before_the_response_and_a_reset_after() {
        let immediate = || {
            reply(Reply::ImmediateResponse(ImmediateResponse {
                status: Some(HttpStatus { code: 429 }),
                headers: Some(HeaderMutation {
                    set_headers: vec![header("content-type", "", "application/json")],
                    remove_headers: Vec::new(),
                }),
                body: br#"{"error":{}}"#.to_vec(),
                ..Default::default()
            }))
        };
        let envoy = envoy_for(Arc::new(move |m| match m {
            Msg::RequestBody(_) => vec![immediate()],
            m => vec![pass(m)],
        }))
        .await;
        let x = envoy
            .run(chat(10, true), |_| panic!("answered locally"))
            .await;
        let (status, headers, _) = x.local();
        assert_eq!(status, 429);
        assert_eq!(headers.all("content-type"), [b"application/json"]);

        let envoy = envoy_for(Arc::new(move |m| match m {
            Msg::ResponseBody(_) => vec![immediate()],
            m => vec![pass(m)],
        }))
        .await;
        let x = envoy.run(chat(10, true), |_| chat_sse(3)).await;
        assert!(
            matches!(&x.outcome, Outcome::Reset { status: 200, chunks, .. } if chunks.is_empty()),
            "{:?}",
            x.outcome
        );
    }
}

/// An upstream error that reports no usage is charged only the attempt by
/// default, and the estimate under `on_upstream_error: keep_estimate`;
/// its concurrency slot comes back either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_are_charged_as_the_policy_says() {
    for (setting, want) in [("charge_reported", 0), ("keep_estimate", 900)] {
        let policy = format!(
            "
attributes:
  on_upstream_error: {setting}
rules:
  - id: output-daily
    limit: {{ output_tokens: 100000, window: daily }}
  - id: one-at-a-time
    limit: {{ concurrent: 1 }}
"
        );
        let (tollgate, envoy, _dir) = start(&policy, &[]).await;
        let failed = UpstreamResponse {
            status: 503,
            headers: vec![("content-type".to_string(), "application/json".to_string())],
            chunks: vec![br#"{"error":{"message":"overloaded","type":"server_error"}}"#.to_vec()],
            separate_end: false,
        };
        let x = envoy.run(chat(900, false), |_| failed.clone()).await;
        assert_eq!(x.response().0, 503, "{setting}");
        wait_used(tollgate.http_port, "output-daily", want, SETTLE_DEADLINE).await;
        // The slot came back: the next call goes through.
        let ok = chat_json(5);
        let next = envoy.run(chat(10, false), |_| ok.clone()).await;
        assert!(!next.is_local(), "{setting}: the slot was not given back");
    }
}

/// A request with no body (a GET, or a POST with `content-length: 0`), as
/// Envoy sends it: one headers message with `end_of_stream`.
fn bodiless(method: &str, path: &str) -> HttpRequest {
    let mut request = HttpRequest::post(path, "");
    request.method = method.to_string();
    request.headers = vec![(
        "authorization".to_string(),
        "Bearer sk-test-ext-proc".to_string(),
    )];
    if method == "POST" {
        request = request.header("content-length", "0");
    }
    request
}

/// A request without a body is decided in the reply to its headers, since
/// no body message follows: allowed, that reply carries the header
/// mutations (the decision for the upstream, the client's model header
/// taken off) and the response is metered and settled; over the cap, it is
/// the `ImmediateResponse`, and the upstream never sees the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_a_body_is_decided_at_its_headers() {
    let policy = r#"
rules:
  - id: requests-daily
    limit: { requests: 2, window: daily }
  - id: no-preview-models
    match: { model: "*-preview" }
    limit: { requests: 0, window: daily }
"#;
    let (tollgate, envoy, _dir) = start(policy, &[]).await;
    let port = tollgate.http_port;
    let models = UpstreamResponse::json(r#"{"object":"list","data":[{"id":"gpt-4o"}]}"#);
    let denied_at_headers = |x: &Exchange, want: (u16, &str), rule: &str| {
        let (status, headers, body) = x.local();
        assert_eq!((status, body["error"]["code"].as_str().unwrap()), want);
        assert_eq!(headers.get("x-tollgate-rule"), Some(rule));
        assert_eq!(headers.get("content-type"), Some("application/json"));
        assert_eq!(x.sent, [Step::RequestHeaders]);
        assert!(matches!(
            x.reply_to(Step::RequestHeaders).unwrap().response,
            Some(Reply::ImmediateResponse(_))
        ));
    };

    // A model no call may use, declared in the header of a bodiless call.
    let preview =
        bodiless("POST", "/v1/chat/completions").header("x-tollgate-model", "gpt-5-preview");
    let x = envoy
        .run(preview, |_| {
            panic!("a denied call must not reach the upstream")
        })
        .await;
    denied_at_headers(&x, (403, "blocked"), "no-preview-models");

    for request in [
        bodiless("GET", "/v1/models").header("x-tollgate-model", "gpt-4o"),
        bodiless("POST", "/v1/chat/completions"),
    ] {
        let x = envoy.run(request, |_| models.clone()).await;
        assert_served(&x, &models);
        assert_eq!(x.sent[..2], [Step::RequestHeaders, Step::ResponseHeaders]);
        assert!(!x.sent.contains(&Step::RequestBody), "{:?}", x.sent);
        let reply = x.reply_to(Step::RequestHeaders).unwrap();
        let Some(Reply::RequestHeaders(h)) = &reply.response else {
            panic!("the headers are answered with a headers reply: {reply:?}")
        };
        let mutation = h
            .response
            .as_ref()
            .and_then(|c| c.header_mutation.as_ref())
            .unwrap_or_else(|| panic!("the decision's headers are in this reply: {reply:?}"));
        assert!(!mutation.set_headers.is_empty(), "{mutation:?}");
        let sent = forwarded(&x);
        assert_eq!(sent.headers.get("x-tollgate-decision"), Some("allow"));
        assert!(sent.headers.contains("x-tollgate-reservation"));
        assert!(
            !sent.headers.contains("x-tollgate-model"),
            "the client's model header is taken off: {:?}",
            sent.headers
        );
        assert!(sent.body.is_empty());
        let (_, headers, _) = x.response();
        assert_eq!(headers.get("x-tollgate-rule"), Some("requests-daily"));
    }
    wait_used(port, "requests-daily", 2, SETTLE_DEADLINE).await;

    // Over the cap: denied at the headers.
    let x = envoy
        .run(bodiless("GET", "/v1/models"), |_| {
            panic!("a denied call must not reach the upstream")
        })
        .await;
    denied_at_headers(&x, (429, "budget_exceeded"), "requests-daily");
    assert_eq!(
        used(port, "requests-daily").await,
        Some(2),
        "a denial costs nothing"
    );
}

/// Header values in `value` rather than `raw_value`, as Envoy sent them
/// before 1.27, decide as they do in `raw_value`: the key (authorization)
/// names the team, a trusted header the workflow, the declared model of a
/// bodiless call its rule, and the response's `:status` and content type
/// still let tollgate take out of a stream the usage it asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_values_in_value_as_older_envoy_sent_them_decide_the_same() {
    let policy = r#"
keys:
  - id: checkout-prod
    sha256: "f526f809ed1da4ee5db2c5b3b4f8e220c330abc60856cbf4ca07182795c98042"
    team: growth
attributes:
  trusted_headers: { workflow: x-workflow }
rules:
  - id: growth-agent
    match: { team: growth, workflow: research-agent }
    limit: { requests: 1, window: daily }
  - id: output-daily
    limit: { output_tokens: 100000, window: daily }
  - id: no-preview-models
    match: { model: "*-preview" }
    limit: { requests: 0, window: daily }
"#;
    for in_value in [false, true] {
        let (tollgate, envoy, _dir) = start(policy, &[]).await;
        let play = |r: HttpRequest| if in_value { r.values_in_value() } else { r };
        // A stream that does not ask for its usage: tollgate asks.
        let mut body: serde_json::Value = serde_json::from_str(&chat_body(900, true)).unwrap();
        body.as_object_mut().unwrap().remove("stream_options");
        let agent = || {
            play(
                HttpRequest::post("/v1/chat/completions", &body.to_string())
                    .header("authorization", "Bearer sk-test-ext-proc")
                    .header("x-workflow", "research-agent"),
            )
        };

        let x = envoy
            .run(agent(), |fwd| {
                let asked = fwd.json()["stream_options"]["include_usage"] == true;
                split(&chat_sse_text(asked, 25), 3, true)
            })
            .await;
        let (status, headers, got) = x.response();
        assert_eq!(status, 200, "in value: {in_value}");
        assert_eq!(headers.get("x-tollgate-rule"), Some("growth-agent"));
        assert_eq!(
            String::from_utf8(got).unwrap(),
            chat_sse_text(false, 25),
            "in value: {in_value}: the usage tollgate asked for is taken out"
        );
        wait_used(tollgate.http_port, "output-daily", 25, SETTLE_DEADLINE).await;

        // The team's agent has had its one request.
        let x = envoy.run(agent(), |_| panic!("over growth-agent")).await;
        let (status, headers, _) = x.local();
        assert_eq!(status, 429, "in value: {in_value}");
        assert_eq!(headers.get("x-tollgate-rule"), Some("growth-agent"));

        // Another workflow of the same team is not under it; an
        // unregistered key is refused.
        let upstream = chat_json(3);
        let other = play(chat(10, false).header("x-workflow", "batch"));
        let x = envoy.run(other, |_| upstream.clone()).await;
        assert_served(&x, &upstream);
        let unknown = play(
            HttpRequest::post("/v1/chat/completions", &chat_body(10, false))
                .header("authorization", "Bearer sk-someone-else")
                .header("x-workflow", "research-agent"),
        );
        let x = envoy.run(unknown, |_| panic!("an unknown key")).await;
        let (status, _, body) = x.local();
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (403, Some("unknown_key")),
            "in value: {in_value}"
        );

        // A bodiless call's declared model, and its path, from `value`.
        let preview = play(bodiless("GET", "/v1/models").header("x-tollgate-model", "o1-preview"));
        let x = envoy.run(preview, |_| panic!("a preview model")).await;
        let (status, headers, _) = x.local();
        assert_eq!(status, 403, "in value: {in_value}");
        assert_eq!(headers.get("x-tollgate-rule"), Some("no-preview-models"));
        wait_used(tollgate.http_port, "output-daily", 28, SETTLE_DEADLINE).await;
    }
}

/// The policy version `/status` reports.
async fn policy_version(http_port: u16) -> String {
    tokio::task::spawn_blocking(move || {
        let (code, body) = common::http_get(http_port, "/status").unwrap();
        assert_eq!(code, 200, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        json["version"].as_str().unwrap().to_string()
    })
    .await
    .unwrap()
}

/// `used` of `rule`'s counters, summed, as a decimal (spend is in dollars).
async fn used_amount(http_port: u16, rule: &str) -> Option<f64> {
    common::envoy_ext_proc::used_as(http_port, rule).await
}

/// Waits until `rule`'s counter reads `want` (to within a millionth of a
/// cent); panics with the last value seen.
async fn wait_amount(http_port: u16, rule: &str, want: f64) {
    let deadline = Instant::now() + SETTLE_DEADLINE;
    loop {
        let now = used_amount(http_port, rule).await;
        if now.is_some_and(|n| (n - want).abs() < 1e-8) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{rule}: used is {now:?} after {SETTLE_DEADLINE:?}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A call decided under one price and finished after a reload that
/// changed it is charged at the price it was decided under: the settle
/// uses the snapshot that made the decision. The next call, decided
/// after the reload, pays the new price.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settle_prices_on_the_snapshot_that_decided_even_across_a_reload() {
    let policy = |input: &str, output: &str| {
        format!(
            "
pricing:
  models:
    gpt-4o: {{ input_per_mtok: {input}, output_per_mtok: {output} }}
rules:
  - id: spend-daily
    match: {{ model: gpt-4o }}
    limit: {{ spend: 100, window: daily }}
"
        )
    };
    let (tollgate, envoy, dir) = start(&policy("2.50", "10.00"), &[]).await;
    let port = tollgate.http_port;
    let before = policy_version(port).await;

    // Decided at $2.50/$10 per million; the upstream thinks meanwhile.
    let upstream = chat_json(20);
    let (request, mut paused) = chat(900, false).pause_after(Step::RequestBody);
    let exchange = tokio::spawn({
        let envoy = envoy.clone();
        let upstream = upstream.clone();
        async move { envoy.run(request, move |_| upstream).await }
    });
    paused.reached().await;

    // Ten times the price, applied before the response comes back.
    std::fs::write(dir.path().join("p.yaml"), policy("25.00", "100.00")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while policy_version(port).await == before {
        assert!(
            Instant::now() < deadline,
            "the new policy was not applied within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    paused.resume();
    let x = exchange.await.unwrap();
    assert_served(&x, &upstream);
    // 14 input and 20 output tokens: 14 × 2.5e-6 + 20 × 1e-5.
    let old_price = 0.000235;
    wait_amount(port, "spend-daily", old_price).await;

    // Decided after the reload: 14 × 2.5e-5 + 20 × 1e-4 on top.
    let x = envoy.run(chat(900, false), |_| upstream.clone()).await;
    assert_served(&x, &upstream);
    wait_amount(port, "spend-daily", old_price + 0.00235).await;
}

/// Raw `Process` streams, message by message, for the sequences the fake
/// Envoy does not play: a request that never carries `end_of_stream` in a
/// message tollgate could wait on must still be decided before anything
/// reaches the upstream, and a response that begins with nothing decided
/// must fail the request (an error status: Envoy then applies
/// `failure_mode_allow: false`), never pass.
mod undecided {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Msg;
    use envoy_types::pb::envoy::service::ext_proc::v3::{
        HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest, ProcessingResponse,
    };
    use tokio_stream::wrappers::ReceiverStream;

    const BLOCKED: &str = "
rules:
  - id: nothing
    limit: { requests: 0, window: daily }
";

    fn headers(end_of_stream: bool) -> Msg {
        let pairs = [
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            (":authority", "api"),
            ("content-type", "application/json"),
            ("x-request-id", "raw-1"),
        ];
        Msg::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: pairs
                    .iter()
                    .map(|(k, v)| HeaderValue {
                        key: k.to_string(),
                        raw_value: v.as_bytes().to_vec(),
                        ..Default::default()
                    })
                    .collect(),
            }),
            end_of_stream,
            ..Default::default()
        })
    }

    /// Sends `messages` one at a time, each after the reply to the one
    /// before; returns the replies, and the status the stream ended with
    /// if it was an error.
    async fn exchange(
        endpoint: String,
        messages: Vec<Msg>,
    ) -> (Vec<ProcessingResponse>, Option<tonic::Status>) {
        let mut client = ExternalProcessorClient::connect(endpoint).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut replies = client
            .process(tonic::Request::new(ReceiverStream::new(rx)))
            .await
            .unwrap()
            .into_inner();
        let mut got = Vec::new();
        for m in messages {
            tx.send(ProcessingRequest {
                request: Some(m),
                ..Default::default()
            })
            .await
            .unwrap();
            match tokio::time::timeout(Duration::from_secs(5), replies.message()).await {
                Ok(Ok(Some(r))) => {
                    let immediate = matches!(r.response, Some(Reply::ImmediateResponse(_)));
                    got.push(r);
                    if immediate {
                        break;
                    }
                }
                Ok(Ok(None)) => break,
                Ok(Err(status)) => return (got, Some(status)),
                Err(_) => panic!("no reply within 5 s after {} replies", got.len()),
            }
        }
        (got, None)
    }

    fn is_denial(r: &ProcessingResponse) -> bool {
        matches!(&r.response, Some(Reply::ImmediateResponse(i))
            if i.status.as_ref().is_some_and(|s| s.code == 403 || s.code == 429))
    }

    /// A buffered body followed by trailers comes without `end_of_stream`
    /// (Envoy's ext_proc filter, `onTrailers`: the buffered body is sent
    /// with end_of_stream false), and with trailers skipped nothing
    /// follows it: it is decided there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_without_end_of_stream_is_decided() {
        let (tollgate, _envoy, _dir) = start(BLOCKED, &[]).await;
        let body = Msg::RequestBody(HttpBody {
            body: br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#.to_vec(),
            end_of_stream: false,
            ..Default::default()
        });
        let (replies, status) = exchange(tollgate.endpoint(), vec![headers(false), body]).await;
        assert!(status.is_none(), "{status:?}");
        assert_eq!(replies.len(), 2, "{replies:?}");
        assert!(
            is_denial(&replies[1]),
            "the body's reply refuses: {replies:?}"
        );
    }

    /// Headers, then trailers, and no body: the trailers are decided.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn trailers_after_headers_alone_are_decided() {
        let (tollgate, _envoy, _dir) = start(BLOCKED, &[]).await;
        let trailers = Msg::RequestTrailers(HttpTrailers::default());
        let (replies, status) = exchange(tollgate.endpoint(), vec![headers(false), trailers]).await;
        assert!(status.is_none(), "{status:?}");
        assert!(is_denial(replies.last().unwrap()), "{replies:?}");
    }

    /// Headers without `end_of_stream`, then straight to the response
    /// (trailers skipped, no body): nothing was decided, and the stream
    /// ends with an error rather than let the response through.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_response_to_an_undecided_call_fails_the_stream() {
        let (tollgate, _envoy, _dir) = start(BLOCKED, &[]).await;
        let response = Msg::ResponseHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![HeaderValue {
                    key: ":status".into(),
                    raw_value: b"200".to_vec(),
                    ..Default::default()
                }],
            }),
            end_of_stream: true,
            ..Default::default()
        });
        let (replies, status) = exchange(tollgate.endpoint(), vec![headers(false), response]).await;
        assert_eq!(
            replies.len(),
            1,
            "only the headers were answered: {replies:?}"
        );
        let status = status.expect("an error status");
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    }
}

/// ext_proc settles every call, so a `settle: never` in the policy (meant
/// for ext_authz routes) does not apply to it: a `concurrent` rule is
/// enforced, not refused, and the slot comes back when the exchange ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_proc_settles_even_where_the_policy_says_nothing_settles() {
    let policy = "
attributes:
  settle: never
rules:
  - id: one-at-a-time
    limit: { concurrent: 1 }
";
    let (_tollgate, envoy, _dir) = start(policy, &[]).await;
    let upstream = chat_sse(5);
    for _ in 0..3 {
        let x = envoy.run(chat(100, true), |_| upstream.clone()).await;
        assert_served(&x, &upstream);
    }
}

/// A hostile stream through the whole exchange: a valid first chunk, then
/// an event of invalid JSON that runs 4 MiB with no newline, then bytes
/// that are not UTF-8. Nothing panics, the client gets every byte as the
/// upstream sent it, and with no usage reported the call settles at the
/// counted estimate: the input from the request body (four bytes a token)
/// and the output counted from the text that did stream, never zero and
/// never the reserved estimate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_stream_passes_and_settles_at_the_counted_estimate() {
    let policy = "
rules:
  - id: tokens-daily
    limit: { tokens: 100000000, window: daily }
";
    let (tollgate, envoy, _dir) = start(policy, &[]).await;
    let valid = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello there\"}}]}\n\n";
    let mut junk = b"data: {not json ".to_vec();
    junk.extend(std::iter::repeat_n(b'x', 4 << 20));
    let upstream = UpstreamResponse {
        status: 200,
        headers: vec![("content-type".into(), "text/event-stream".into())],
        chunks: vec![
            valid.as_bytes().to_vec(),
            junk,
            vec![0xff, 0xfe, b'\n', 0xc3],
        ],
        separate_end: true,
    };
    let request = chat(5000, true);
    let input = (chat_body(5000, true).len() as u64).div_ceil(4);
    let x = envoy.run(request, |_| upstream.clone()).await;
    let (status, _, body) = x.response();
    assert_eq!(status, 200);
    assert_eq!(body, upstream.chunks.concat(), "every byte, unchanged");
    // "Hello there": 11 characters, 3 tokens.
    wait_used(
        tollgate.http_port,
        "tokens-daily",
        input + 3,
        SETTLE_DEADLINE,
    )
    .await;
}
