//! The meter against the providers' documented response shapes, fed
//! split at every byte, and against hostile streams.

use super::*;

/// Characters of `text` as tokens, the way the meter counts them.
fn tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(CHARS_PER_TOKEN)
}

/// `text` as a JSON string literal.
fn lit(text: &str) -> String {
    serde_json::to_string(text).unwrap()
}

fn run(api: Api, sse: bool, chunks: &[&[u8]]) -> Metered {
    let mut m = Meter::new(api, sse);
    for c in chunks {
        m.feed(c);
        assert!(m.held_bytes() <= MAX_HELD);
    }
    m.finish()
}

/// The result of metering `body` whole, asserting that every split into
/// two chunks and 1-byte chunks give the same.
fn every_split(api: Api, sse: bool, body: &[u8]) -> Metered {
    let whole = run(api, sse, &[body]);
    for at in 0..=body.len() {
        let (a, b) = body.split_at(at);
        assert_eq!(run(api, sse, &[a, b]), whole, "{api:?} split at {at}");
    }
    let ones: Vec<&[u8]> = body.chunks(1).collect();
    assert_eq!(run(api, sse, &ones), whole, "{api:?} in 1-byte chunks");
    assert_eq!(whole.bytes, body.len() as u64);
    whole
}

struct Case {
    name: &'static str,
    api: Api,
    sse: bool,
    body: String,
    reported: Option<Reported>,
    model: Option<&'static str>,
    /// The generated text the meter should count.
    text: String,
    complete: bool,
}

fn reported(input: u64, cached: u64, output: u64, reasoning: u64, images: u64) -> Option<Reported> {
    Some(Reported {
        input_tokens: input,
        cached_input_tokens: cached,
        output_tokens: output,
        reasoning_tokens: reasoning,
        cache_write_tokens: 0,
        images,
    })
}

/// [`reported`], with `written` of the input tokens written to the cache.
fn with_cache_write(r: Option<Reported>, written: u64) -> Option<Reported> {
    r.map(|r| Reported {
        cache_write_tokens: written,
        ..r
    })
}

/// `data:` events, each followed by a blank line.
fn sse(events: &[String]) -> String {
    events.iter().map(|e| format!("{e}\n\n")).collect()
}

fn chat_chunk(delta: &str, finish: &str, usage: &str) -> String {
    format!(
        r#"data: {{"id":"chatcmpl-AZ9","object":"chat.completion.chunk","created":1730000000,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_0ba0d124f1","choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}],"usage":{usage}}}"#
    )
}

fn chat_sse(include_usage: bool) -> (String, String) {
    let (hello, world, args) = ("Hello", " wörld, \"quoted\" 😀\n", r#"{"city":"Paris"}"#);
    let mut events = vec![
        chat_chunk(
            r#"{"role":"assistant","content":"","refusal":null}"#,
            "null",
            "null",
        ),
        chat_chunk(&format!(r#"{{"content":{}}}"#, lit(hello)), "null", "null"),
        chat_chunk(&format!(r#"{{"content":{}}}"#, lit(world)), "null", "null"),
        chat_chunk(
            r#"{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]}"#,
            "null",
            "null",
        ),
        chat_chunk(
            &format!(
                r#"{{"tool_calls":[{{"index":0,"function":{{"arguments":{}}}}}]}}"#,
                lit(args)
            ),
            "null",
            "null",
        ),
        chat_chunk("{}", r#""tool_calls""#, "null"),
    ];
    if include_usage {
        events.push(r#"data: {"id":"chatcmpl-AZ9","object":"chat.completion.chunk","created":1730000000,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_0ba0d124f1","choices":[],"usage":{"prompt_tokens":1200,"completion_tokens":340,"total_tokens":1540,"prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":128,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}"#.to_string());
    }
    events.push("data: [DONE]".to_string());
    (sse(&events), format!("{hello}{world}{args}"))
}

/// A Responses API stream ending in `terminal`, whose response carries
/// the status, error and incomplete details that event comes with.
fn responses_sse(terminal: &str) -> String {
    let (status, error, incomplete) = match terminal {
        "response.incomplete" => ("incomplete", "null", r#"{"reason":"max_output_tokens"}"#),
        "response.failed" => (
            "failed",
            r#"{"code":"server_error","message":"The model failed to finish."}"#,
            "null",
        ),
        _ => ("completed", "null", "null"),
    };
    sse(&[
        r#"event: response.created
data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1","object":"response","created_at":1741290958,"status":"in_progress","error":null,"model":"gpt-4.1-2025-04-14","output":[],"usage":null,"metadata":{}}}"#.to_string(),
        r#"event: response.output_item.added
data: {"type":"response.output_item.added","sequence_number":1,"output_index":0,"item":{"id":"msg_1","type":"message","status":"in_progress","role":"assistant","content":[]}}"#.to_string(),
        r#"event: response.output_text.delta
data: {"type":"response.output_text.delta","sequence_number":2,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hi","logprobs":[]}"#.to_string(),
        r#"event: response.output_text.delta
data: {"type":"response.output_text.delta","sequence_number":3,"item_id":"msg_1","output_index":0,"content_index":0,"delta":" there, ünïcode","logprobs":[]}"#.to_string(),
        r#"event: response.audio.delta
data: {"type":"response.audio.delta","sequence_number":4,"response_id":"resp_1","delta":"UklGRiQAAABXQVZFZm10IBAAAAABAAEA"}"#.to_string(),
        r#"event: response.function_call_arguments.delta
data: {"type":"response.function_call_arguments.delta","sequence_number":5,"item_id":"fc_1","output_index":1,"delta":"{\"a\":1}"}"#.to_string(),
        r#"event: response.output_text.done
data: {"type":"response.output_text.done","sequence_number":6,"item_id":"msg_1","output_index":0,"content_index":0,"text":"Hi there, ünïcode","logprobs":[]}"#.to_string(),
        format!(
            r#"event: {terminal}
data: {{"type":"{terminal}","sequence_number":7,"response":{{"id":"resp_1","object":"response","created_at":1741290958,"status":"{status}","error":{error},"incomplete_details":{incomplete},"model":"gpt-4.1-2025-04-14","output":[{{"id":"msg_1","type":"message","status":"completed","role":"assistant","content":[{{"type":"output_text","text":"Hi there, ünïcode","annotations":[]}}]}}],"temperature":1.0,"usage":{{"input_tokens":37,"input_tokens_details":{{"cached_tokens":5}},"output_tokens":11,"output_tokens_details":{{"reasoning_tokens":3}},"total_tokens":48}},"metadata":{{}}}}}}"#
        ),
    ])
}

fn anthropic_sse(delta_usage: &str) -> String {
    sse(&[
        r#"event: message_start
data: {"type":"message_start","message":{"id":"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5-20250929","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":100,"cache_read_input_tokens":2000,"output_tokens":1}}}"#.to_string(),
        r#"event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":"","signature":""}}"#.to_string(),
        "event: ping\ndata: {\"type\": \"ping\"}".to_string(),
        r#"event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"Let me think."}}"#.to_string(),
        r#"event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"}}"#.to_string(),
        r#"event: content_block_stop
data: {"type":"content_block_stop","index":0}"#.to_string(),
        r#"event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"Hello, ünïcode 😀!"}}"#.to_string(),
        r#"event: content_block_delta
data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{\"location\": \"San Fra"}}"#.to_string(),
        format!(
            r#"event: message_delta
data: {{"type":"message_delta","delta":{{"stop_reason":"end_turn","stop_sequence":null}},"usage":{delta_usage}}}"#
        ),
        "event: message_stop\ndata: {\"type\":\"message_stop\"}".to_string(),
    ])
}

const ANTHROPIC_TEXT: &str = "Let me think.Hello, ünïcode 😀!{\"location\": \"San Fra";

/// Gemini's stream, with its CRLF line ends.
fn gemini_sse() -> String {
    [
        r#"data: {"candidates": [{"content": {"parts": [{"text": "The"}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 10,"totalTokenCount": 10},"modelVersion": "gemini-2.5-flash","responseId": "a1"}"#,
        r#"data: {"candidates": [{"content": {"parts": [{"text": " quick brown fox"}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 10,"candidatesTokenCount": 4,"totalTokenCount": 44,"thoughtsTokenCount": 30},"modelVersion": "gemini-2.5-flash","responseId": "a1"}"#,
        r#"data: {"candidates": [{"content": {"parts": [{"text": " jumps."}],"role": "model"},"finishReason": "STOP","index": 0}],"usageMetadata": {"promptTokenCount": 10,"cachedContentTokenCount": 6,"candidatesTokenCount": 7,"totalTokenCount": 49,"toolUsePromptTokenCount": 2,"thoughtsTokenCount": 30,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 10}]},"modelVersion": "gemini-2.5-flash","responseId": "a1"}"#,
    ]
    .iter()
    .map(|e| format!("{e}\r\n\r\n"))
    .collect()
}

fn floats(n: usize) -> String {
    let v: Vec<String> = (0..n)
        .map(|i| format!("{:.9}", (i as f64 * 0.37).sin() / 7.0))
        .collect();
    format!("[{}]", v.join(","))
}

fn cases() -> Vec<Case> {
    let (chat_stream, chat_text) = chat_sse(true);
    let (chat_stream_no_usage, _) = chat_sse(false);
    vec![
        Case {
            name: "openai chat json",
            api: Api::OpenAiChat,
            sse: false,
            body: r#"{"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion","created":1741570283,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"The image shows a wooden boardwalk.","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":1117,"completion_tokens":46,"total_tokens":1163,"prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":12,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":"fp_fc9f1d7035"}"#.to_string(),
            reported: reported(1117, 1024, 46, 12, 0),
            model: Some("gpt-4o-2024-08-06"),
            text: "The image shows a wooden boardwalk.".to_string(),
            complete: true,
        },
        Case {
            name: "openai chat sse with include_usage",
            api: Api::OpenAiChat,
            sse: true,
            body: chat_stream,
            reported: reported(1200, 1024, 340, 128, 0),
            model: Some("gpt-4o-mini-2024-07-18"),
            text: chat_text.clone(),
            complete: true,
        },
        Case {
            name: "openai chat sse without usage",
            api: Api::OpenAiChat,
            sse: true,
            body: chat_stream_no_usage,
            reported: None,
            model: Some("gpt-4o-mini-2024-07-18"),
            text: chat_text,
            complete: true,
        },
        Case {
            name: "openai completions json",
            api: Api::OpenAiCompletions,
            sse: false,
            body: r#"{"id":"cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7","object":"text_completion","created":1589478378,"model":"gpt-3.5-turbo-instruct","system_fingerprint":"fp_44709d6fcb","choices":[{"text":"\n\nThis is indeed a test","index":0,"logprobs":null,"finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#.to_string(),
            reported: reported(5, 0, 7, 0, 0),
            model: Some("gpt-3.5-turbo-instruct"),
            text: "\n\nThis is indeed a test".to_string(),
            complete: true,
        },
        Case {
            name: "openai completions sse",
            api: Api::OpenAiCompletions,
            sse: true,
            body: sse(&[
                r#"data: {"id":"cmpl-1","object":"text_completion","created":1,"choices":[{"text":"Hi","index":0,"logprobs":null,"finish_reason":null}],"model":"gpt-3.5-turbo-instruct","usage":null}"#.to_string(),
                r#"data: {"id":"cmpl-1","object":"text_completion","created":1,"choices":[{"text":" you","index":0,"logprobs":null,"finish_reason":"stop"}],"model":"gpt-3.5-turbo-instruct","usage":null}"#.to_string(),
                r#"data: {"id":"cmpl-1","object":"text_completion","created":1,"choices":[],"model":"gpt-3.5-turbo-instruct","usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#.to_string(),
                "data: [DONE]".to_string(),
            ]),
            reported: reported(3, 0, 2, 0, 0),
            model: Some("gpt-3.5-turbo-instruct"),
            text: "Hi you".to_string(),
            complete: true,
        },
        Case {
            name: "openai responses json",
            api: Api::OpenAiResponses,
            sse: false,
            body: r#"{"id":"resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41","object":"response","created_at":1741476777,"status":"completed","error":null,"incomplete_details":null,"instructions":null,"max_output_tokens":null,"model":"o4-mini-2025-04-16","output":[{"type":"reasoning","id":"rs_1","summary":[{"type":"summary_text","text":"Thinking it over."}]},{"type":"message","id":"msg_1","status":"completed","role":"assistant","content":[{"type":"output_text","text":"In a peaceful grove beneath a silver moon.","annotations":[]}]},{"type":"function_call","id":"fc_1","call_id":"call_1","name":"f","arguments":"{\"x\":2}"}],"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{"effort":"medium","summary":"auto"},"store":true,"temperature":1.0,"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":10},"output_tokens":187,"output_tokens_details":{"reasoning_tokens":128},"total_tokens":223},"user":null,"metadata":{}}"#.to_string(),
            reported: reported(36, 10, 187, 128, 0),
            model: Some("o4-mini-2025-04-16"),
            text: "Thinking it over.In a peaceful grove beneath a silver moon.{\"x\":2}".to_string(),
            complete: true,
        },
        Case {
            name: "openai responses sse completed",
            api: Api::OpenAiResponses,
            sse: true,
            body: responses_sse("response.completed"),
            reported: reported(37, 5, 11, 3, 0),
            model: Some("gpt-4.1-2025-04-14"),
            text: "Hi there, ünïcode{\"a\":1}".to_string(),
            complete: true,
        },
        Case {
            name: "openai responses sse incomplete",
            api: Api::OpenAiResponses,
            sse: true,
            body: responses_sse("response.incomplete"),
            reported: reported(37, 5, 11, 3, 0),
            model: Some("gpt-4.1-2025-04-14"),
            text: "Hi there, ünïcode{\"a\":1}".to_string(),
            complete: true,
        },
        Case {
            name: "openai responses sse failed",
            api: Api::OpenAiResponses,
            sse: true,
            body: responses_sse("response.failed"),
            reported: reported(37, 5, 11, 3, 0),
            model: Some("gpt-4.1-2025-04-14"),
            text: "Hi there, ünïcode{\"a\":1}".to_string(),
            complete: true,
        },
        Case {
            name: "openai embeddings json",
            api: Api::OpenAiEmbeddings,
            sse: false,
            body: format!(
                r#"{{"object":"list","data":[{{"object":"embedding","index":0,"embedding":{}}},{{"object":"embedding","index":1,"embedding":{}}}],"model":"text-embedding-3-small","usage":{{"prompt_tokens":8,"total_tokens":8}}}}"#,
                floats(64),
                floats(64)
            ),
            reported: reported(8, 0, 0, 0, 0),
            model: Some("text-embedding-3-small"),
            text: String::new(),
            complete: true,
        },
        Case {
            name: "openai images json without usage",
            api: Api::OpenAiImages,
            sse: false,
            body: r#"{"created":1713833628,"data":[{"revised_prompt":"A cute otter","url":"https://example.invalid/a.png"},{"url":"https://example.invalid/b.png"}]}"#.to_string(),
            reported: reported(0, 0, 0, 0, 2),
            model: None,
            text: String::new(),
            complete: true,
        },
        Case {
            name: "openai images json with usage",
            api: Api::OpenAiImages,
            sse: false,
            body: format!(
                r#"{{"created":1713833628,"background":"transparent","data":[{{"b64_json":"{}"}}],"output_format":"png","quality":"high","size":"1024x1024","usage":{{"total_tokens":4210,"input_tokens":50,"output_tokens":4160,"input_tokens_details":{{"text_tokens":10,"image_tokens":40}}}}}}"#,
                "iVBORw0KGgo".repeat(40)
            ),
            reported: reported(50, 0, 4160, 0, 1),
            model: None,
            text: String::new(),
            complete: true,
        },
        Case {
            name: "openai images sse",
            api: Api::OpenAiImages,
            sse: true,
            body: sse(&[
                format!(
                    "event: image_generation.partial_image\ndata: {{\"type\":\"image_generation.partial_image\",\"b64_json\":\"{}\",\"partial_image_index\":0}}",
                    "AAAA".repeat(30)
                ),
                format!(
                    "event: image_generation.completed\ndata: {{\"type\":\"image_generation.completed\",\"b64_json\":\"{}\",\"created_at\":1,\"size\":\"1024x1024\",\"quality\":\"high\",\"background\":\"opaque\",\"output_format\":\"png\",\"usage\":{{\"total_tokens\":100,\"input_tokens\":50,\"output_tokens\":50,\"input_tokens_details\":{{\"text_tokens\":10,\"image_tokens\":40}}}}}}",
                    "BBBB".repeat(30)
                ),
            ]),
            reported: reported(50, 0, 50, 0, 1),
            model: None,
            text: String::new(),
            complete: true,
        },
        Case {
            name: "anthropic json",
            api: Api::Anthropic,
            sse: false,
            body: r#"{"id":"msg_013Zva2CMHLNnXjNJJKqJ2EF","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[{"type":"thinking","thinking":"Let me think.","signature":"EqQB"},{"type":"text","text":"Hi! My name is Claude."},{"type":"tool_use","id":"toolu_1","name":"get_weather","input":{"text":"not counted"}}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":2095,"cache_creation_input_tokens":100,"cache_read_input_tokens":1800,"output_tokens":503,"service_tier":"standard","server_tool_use":{"web_search_requests":0}}}"#.to_string(),
            reported: with_cache_write(reported(3995, 1800, 503, 0, 0), 100),
            model: Some("claude-sonnet-4-5-20250929"),
            text: "Let me think.Hi! My name is Claude.".to_string(),
            complete: true,
        },
        Case {
            name: "anthropic sse",
            api: Api::Anthropic,
            sse: true,
            body: anthropic_sse(r#"{"output_tokens":15}"#),
            reported: with_cache_write(reported(2125, 2000, 15, 0, 0), 100),
            model: Some("claude-sonnet-4-5-20250929"),
            text: ANTHROPIC_TEXT.to_string(),
            complete: true,
        },
        Case {
            name: "anthropic sse with cumulative counts repeated",
            api: Api::Anthropic,
            sse: true,
            body: anthropic_sse(
                r#"{"input_tokens":30,"cache_creation_input_tokens":null,"cache_read_input_tokens":2000,"output_tokens":15,"server_tool_use":null}"#,
            ),
            reported: with_cache_write(reported(2130, 2000, 15, 0, 0), 100),
            model: Some("claude-sonnet-4-5-20250929"),
            text: ANTHROPIC_TEXT.to_string(),
            complete: true,
        },
        Case {
            name: "gemini json",
            api: Api::Gemini,
            sse: false,
            body: r#"{"candidates":[{"content":{"parts":[{"text":"Okay, "},{"text":"here's a story."}],"role":"model"},"finishReason":"STOP","avgLogprobs":-0.2}],"usageMetadata":{"promptTokenCount":10,"cachedContentTokenCount":4,"candidatesTokenCount":50,"totalTokenCount":90,"thoughtsTokenCount":30,"promptTokensDetails":[{"modality":"TEXT","tokenCount":10}]},"modelVersion":"gemini-2.5-pro","responseId":"abc"}"#.to_string(),
            reported: reported(10, 4, 80, 30, 0),
            model: Some("gemini-2.5-pro"),
            text: "Okay, here's a story.".to_string(),
            complete: true,
        },
        Case {
            name: "gemini sse",
            api: Api::Gemini,
            sse: true,
            body: gemini_sse(),
            reported: reported(12, 6, 37, 30, 0),
            model: Some("gemini-2.5-flash"),
            text: "The quick brown fox jumps.".to_string(),
            complete: true,
        },
        Case {
            name: "gemini json array (streamGenerateContent without alt=sse)",
            api: Api::Gemini,
            sse: false,
            body: r#"[{"candidates": [{"content": {"parts": [{"text": "The"}],"role": "model"}}],"usageMetadata": {"promptTokenCount": 8,"totalTokenCount": 8},"modelVersion": "gemini-2.0-flash"}
,
{"candidates": [{"content": {"parts": [{"text": " end"}],"role": "model"},"finishReason": "STOP"}],"usageMetadata": {"promptTokenCount": 8,"candidatesTokenCount": 2,"totalTokenCount": 10},"modelVersion": "gemini-2.0-flash"}
]"#.to_string(),
            reported: reported(8, 0, 2, 0, 0),
            model: Some("gemini-2.0-flash"),
            text: "The end".to_string(),
            complete: true,
        },
    ]
}

#[test]
fn usage_of_every_api_in_json_and_sse_at_every_split() {
    for case in cases() {
        let got = every_split(case.api, case.sse, case.body.as_bytes());
        let want = Metered {
            reported: case.reported.clone(),
            model: case.model.map(str::to_string),
            counted_output_tokens: tokens(&case.text),
            bytes: case.body.len() as u64,
            complete: case.complete,
        };
        assert_eq!(got, want, "{}", case.name);
    }
}

/// A small xorshift generator, so the splits are random but repeatable.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[test]
fn random_splits_give_the_same_result() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for case in cases() {
        let body = case.body.as_bytes();
        let whole = run(case.api, case.sse, &[body]);
        for _ in 0..200 {
            let mut chunks = Vec::new();
            let mut rest = body;
            while !rest.is_empty() {
                // Mostly small pieces, sometimes large ones, sometimes empty.
                let len = match rng.below(4) {
                    0 => rng.below(4),
                    1 | 2 => rng.below(40),
                    _ => rng.below(rest.len() + 1),
                }
                .min(rest.len());
                let (a, b) = rest.split_at(len);
                chunks.push(a);
                rest = b;
            }
            assert_eq!(run(case.api, case.sse, &chunks), whole, "{}", case.name);
        }
    }
}

#[test]
fn crlf_and_cr_line_ends_read_as_lf() {
    for case in cases().into_iter().filter(|c| c.sse) {
        let lf = case.body.replace("\r\n", "\n");
        let want = run(case.api, true, &[lf.as_bytes()]);
        for ending in ["\r\n", "\r"] {
            let body = lf.replace('\n', ending);
            let got = every_split(case.api, true, body.as_bytes());
            assert_eq!(
                Metered {
                    bytes: want.bytes,
                    ..got
                },
                want,
                "{} with {ending:?}",
                case.name
            );
        }
    }
}

#[test]
fn comments_other_fields_and_multi_line_data_are_read_as_sse_says() {
    let stream = ": keep-alive\n\
        : OPENROUTER PROCESSING\n\
        id: 1\n\
        retry: 3000\n\
        event: message\n\
        data: {\"model\":\"gpt-4o\",\n\
        data:\"choices\":[{\"delta\":{\"content\":\"abcd\"}}],\n\
        data: \"usage\":\n\
        data: {\"prompt_tokens\":3,\"completion_tokens\":1}}\n\
        \n\
        :\n\
        data: [DONE]\n\n";
    let got = every_split(Api::OpenAiChat, true, stream.as_bytes());
    assert_eq!(got.reported, reported(3, 0, 1, 0, 0));
    assert_eq!(got.model.as_deref(), Some("gpt-4o"));
    assert_eq!(got.counted_output_tokens, 1);
}

#[test]
fn text_split_inside_a_utf8_character_is_counted_once_per_character() {
    let text = "héllo wörld — 日本語 😀🎉 ok";
    let body = sse(&[chat_chunk(
        &format!(r#"{{"content":{}}}"#, lit(text)),
        "null",
        "null",
    )]);
    let got = every_split(Api::OpenAiChat, true, body.as_bytes());
    assert_eq!(got.counted_output_tokens, tokens(text));
    // The same text with `\uXXXX` escapes for every character that has
    // one counts the same.
    let escaped: String = text
        .chars()
        .map(|c| match u16::try_from(c as u32) {
            Ok(u) => format!("\\u{u:04x}"),
            Err(_) => c.to_string(),
        })
        .collect();
    let body = format!(r#"{{"choices":[{{"message":{{"content":"{escaped}"}}}}]}}"#);
    let got = every_split(Api::OpenAiChat, false, body.as_bytes());
    assert_eq!(got.counted_output_tokens, tokens(text));
}

#[test]
fn counted_output_grows_while_the_stream_runs() {
    let (stream, text) = chat_sse(false);
    let mut m = Meter::new(Api::OpenAiChat, true);
    let mut last = 0;
    for chunk in stream.as_bytes().chunks(7) {
        m.feed(chunk);
        assert!(m.counted_output_tokens() >= last);
        last = m.counted_output_tokens();
    }
    assert_eq!(last, tokens(&text));
}

#[test]
fn a_stream_cut_short_keeps_what_it_read() {
    // Chat cut before its usage chunk: only the counted estimate.
    let (stream, _) = chat_sse(true);
    let cut = &stream[..stream.find("\"usage\":{").unwrap()];
    let got = run(Api::OpenAiChat, true, &[cut.as_bytes()]);
    assert_eq!(got.reported, None);
    assert!(!got.complete);
    assert!(got.counted_output_tokens > 0);

    // Anthropic cut after message_start: its input counts, and the greater
    // of its output so far and the counted estimate.
    let stream = anthropic_sse(r#"{"output_tokens":15}"#);
    let cut = &stream[..stream.find("event: message_delta").unwrap()];
    let got = every_split(Api::Anthropic, true, cut.as_bytes());
    assert_eq!(
        got.reported,
        with_cache_write(reported(2125, 2000, tokens(ANTHROPIC_TEXT), 0, 0), 100)
    );
    assert!(!got.complete);

    // A cut in the middle of the usage record keeps none of it.
    let cut = &stream[..stream.find("\"output_tokens\":15").unwrap() + 17];
    let got = run(Api::Anthropic, true, &[cut.as_bytes()]);
    assert_eq!(got.reported.unwrap().output_tokens, tokens(ANTHROPIC_TEXT));

    // A JSON body cut short.
    let body = r#"{"model":"gpt-4o","choices":[{"message":{"content":"abcdefgh and more"#;
    let got = every_split(Api::OpenAiChat, false, body.as_bytes());
    assert_eq!(got.reported, None);
    assert_eq!(got.model.as_deref(), Some("gpt-4o"));
    assert_eq!(got.counted_output_tokens, tokens("abcdefgh and more"));
    assert!(!got.complete);
}

#[test]
fn gemini_cut_before_finish_reason_takes_the_greater_output() {
    let stream = gemini_sse();
    let cut = &stream[..stream.find(" jumps.").unwrap()];
    let got = every_split(Api::Gemini, true, cut.as_bytes());
    // 4 candidates + 30 thoughts reported so far, against 19 characters.
    assert_eq!(got.reported, reported(10, 0, 34, 30, 0));
    assert!(!got.complete);
}

#[test]
fn an_event_with_invalid_json_does_not_stop_the_next() {
    let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"abcd\"}}],,,\n\n\
        data: {\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":\"x\"}} trailing\n\n\
        data: \u{1}\u{2}{{{{[[[[\"\n\n\
        data: {\"model\":\"m\u{ff}\"}\n\n\
        data: {\"choices\":[{\"delta\":{\"content\":\"efgh\"}}],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n";
    let got = every_split(Api::OpenAiChat, true, stream.as_bytes());
    assert_eq!(got.reported, reported(9, 0, 2, 0, 0));
    assert_eq!(got.counted_output_tokens, 2);
    assert_eq!(got.model.as_deref(), Some("m\u{ff}"));

    // Invalid UTF-8 in a model name is no model; in text it still counts.
    let mut bytes = br#"data: {"model":"bad"#.to_vec();
    bytes.extend_from_slice(&[0xFF, 0xC3]);
    bytes.extend_from_slice(b"\",\"choices\":[{\"delta\":{\"content\":\"ab");
    bytes.extend_from_slice(&[0xFF, 0xFE, 0xC3]);
    bytes.extend_from_slice(b"\"}}]}\n\n");
    let got = every_split(Api::OpenAiChat, true, &bytes);
    assert_eq!(got.model, None);
    // a, b and three bytes that each start a (broken) character.
    assert_eq!(got.counted_output_tokens, 2);
}

#[test]
fn model_names_with_escapes_are_decoded() {
    let got = every_split(
        Api::OpenAiChat,
        false,
        br#"{"model":"gpt\u002d4o\/x","usage":{"prompt_tokens":1}}"#,
    );
    assert_eq!(got.model.as_deref(), Some("gpt-4o/x"));
}

/// Feeds `total` bytes made by `fill` in chunks of `chunk` bytes, checking
/// the meter's held bytes after each.
fn feed_lazily(m: &mut Meter, total: usize, chunk: usize, mut fill: impl FnMut(&mut [u8])) {
    let mut buf = vec![0u8; chunk];
    let mut fed = 0;
    while fed < total {
        let n = chunk.min(total - fed);
        fill(&mut buf[..n]);
        m.feed(&buf[..n]);
        fed += n;
        assert!(m.held_bytes() <= MAX_HELD, "held {}", m.held_bytes());
    }
}

const HUNDRED_MB: usize = 100 << 20;

#[test]
fn a_100_mb_event_without_newlines_stays_bounded_and_is_counted() {
    let mut m = Meter::new(Api::OpenAiChat, true);
    m.feed(br#"data: {"model":"gpt-4o","choices":[{"delta":{"content":""#);
    feed_lazily(&mut m, HUNDRED_MB, 256 << 10, |b| b.fill(b'a'));
    let got = m.finish();
    assert_eq!(got.reported, None);
    assert_eq!(got.model.as_deref(), Some("gpt-4o"));
    assert_eq!(got.counted_output_tokens, (HUNDRED_MB as u64).div_ceil(4));
    assert!(!got.complete);
}

#[test]
fn a_100_mb_event_of_junk_stays_bounded_and_keeps_earlier_usage() {
    let mut m = Meter::new(Api::Anthropic, true);
    m.feed(anthropic_sse(r#"{"output_tokens":15}"#).as_bytes());
    m.feed(b"event: x\ndata: {\"delta\":{\"text\":\"abcd\"},\"k\":");
    let mut rng = XorShift(7);
    // Bytes that matter to SSE and JSON, and some that are not UTF-8;
    // no line ends, so it is all one line.
    let alphabet = b"{}[]\",:\\ae0 \x00\xff\xc3\xa9";
    feed_lazily(&mut m, HUNDRED_MB, 1 << 20, |b| {
        for x in b.iter_mut() {
            *x = alphabet[rng.below(alphabet.len())];
        }
    });
    let got = m.finish();
    assert_eq!(
        got.reported,
        with_cache_write(reported(2125, 2000, 15, 0, 0), 100)
    );
    assert!(got.counted_output_tokens > tokens(ANTHROPIC_TEXT));
}

#[test]
fn huge_values_inside_a_json_body_are_skipped_without_holding_them() {
    // An embeddings body with 8 MB of floats, and one with a deep array.
    let mut m = Meter::new(Api::OpenAiEmbeddings, false);
    m.feed(br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":["#);
    let mut i = 0u64;
    feed_lazily(&mut m, 8 << 20, 64 << 10, |b| {
        for x in b.iter_mut() {
            i += 1;
            *x = if i.is_multiple_of(12) {
                b','
            } else {
                b'0' + (i % 10) as u8
            };
        }
    });
    m.feed(
        br#"0]}],"model":"text-embedding-3-large","usage":{"prompt_tokens":8,"total_tokens":8}}"#,
    );
    let got = m.finish();
    assert_eq!(got.reported, reported(8, 0, 0, 0, 0));
    assert_eq!(got.model.as_deref(), Some("text-embedding-3-large"));
    assert!(got.complete);

    let mut m = Meter::new(Api::OpenAiChat, false);
    m.feed(br#"{"x":"#);
    feed_lazily(&mut m, 8 << 20, 64 << 10, |b| b.fill(b'['));
    feed_lazily(&mut m, 8 << 20, 64 << 10, |b| b.fill(b']'));
    m.feed(br#","usage":{"prompt_tokens":4,"completion_tokens":2}}"#);
    assert_eq!(m.finish().reported, reported(4, 0, 2, 0, 0));
}

#[test]
fn random_bytes_never_panic_nor_hold_more_than_the_bound() {
    let mut rng = XorShift(0xDEAD_BEEF);
    let pieces: [&[u8]; 24] = [
        b"data: ",
        b"event: ",
        b"data:",
        b"\n",
        b"\r\n",
        b"\r",
        b"\n\n",
        b": c\n",
        b"{",
        b"}",
        b"[",
        b"]",
        b"\"",
        b"\\",
        b":",
        b",",
        b"\"usage\":{\"prompt_tokens\":",
        b"12",
        b"\"content\":\"",
        b"\"model\":\"",
        b"\xff\xfe",
        b"\xe2\x82",
        b"null",
        b"\"delta\":{",
    ];
    let apis = [
        Api::OpenAiChat,
        Api::OpenAiCompletions,
        Api::OpenAiResponses,
        Api::OpenAiEmbeddings,
        Api::OpenAiImages,
        Api::Anthropic,
        Api::Gemini,
    ];
    for round in 0..3000 {
        let mut body = Vec::new();
        for _ in 0..rng.below(200) {
            body.extend_from_slice(pieces[rng.below(pieces.len())]);
        }
        let api = apis[round % apis.len()];
        for sse in [false, true] {
            let whole = run(api, sse, &[&body]);
            let at = rng.below(body.len() + 1);
            let (a, b) = body.split_at(at);
            assert_eq!(run(api, sse, &[a, b]), whole, "{api:?} {body:?} at {at}");
            if let Some(r) = &whole.reported {
                assert!(r.cached_input_tokens <= r.input_tokens);
                assert!(r.reasoning_tokens <= r.output_tokens);
            }
        }
    }
}

#[test]
fn the_meter_holds_a_fixed_size() {
    // Everything it keeps is inline; feeding never allocates.
    assert!(
        std::mem::size_of::<Meter>() <= 2048,
        "{}",
        std::mem::size_of::<Meter>()
    );
}

const _: () = assert!(MAX_HELD <= 256);

#[test]
fn apis_by_path() {
    let cases = [
        ("/v1/chat/completions", Some(Api::OpenAiChat)),
        ("/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21", Some(Api::OpenAiChat)),
        ("/api/v1/chat/completions/", Some(Api::OpenAiChat)),
        ("/v1/completions", Some(Api::OpenAiCompletions)),
        ("/v1/responses", Some(Api::OpenAiResponses)),
        ("/v1/embeddings", Some(Api::OpenAiEmbeddings)),
        ("/v1/images/generations", Some(Api::OpenAiImages)),
        ("/v1/images/edits", Some(Api::OpenAiImages)),
        ("/v1/images/variations", Some(Api::OpenAiImages)),
        ("/v1/messages", Some(Api::Anthropic)),
        ("/v1beta/models/gemini-2.5-pro:generateContent", Some(Api::Gemini)),
        ("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", Some(Api::Gemini)),
        (
            "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.0-flash:generateContent",
            Some(Api::Gemini),
        ),
        (
            "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5:streamRawPredict",
            Some(Api::Anthropic),
        ),
        ("/v1/messages/count_tokens", None),
        ("/v1/messages/batches", None),
        ("/v1/responses/resp_123", None),
        ("/v1beta/models/gemini-2.5-pro:countTokens", None),
        ("/v1/models", None),
        ("/v1/audio/speech", None),
        ("", None),
    ];
    for (path, want) in cases {
        assert_eq!(Api::from_path(path), want, "{path}");
    }
}
