"""Writes fuzz/corpus/meter: real response bodies and event streams of each
API (from src/server/meter/tests.rs), each behind the two bytes the target
reads first: the API (| 0x80 for an event stream) and a split seed."""
import json, os, sys

OUT = os.path.join(os.path.dirname(__file__), "..", "corpus", "meter")
CHAT, COMPLETIONS, RESPONSES, EMBEDDINGS, IMAGES, ANTHROPIC, GEMINI = range(7)

def sse(events, end="\n\n"):
    return "".join(e + end for e in events)

def chat_chunk(delta, finish, usage):
    return ('data: {"id":"chatcmpl-AZ9","object":"chat.completion.chunk","created":1730000000,'
            '"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_0ba0d124f1","choices":[{"index":0,'
            f'"delta":{delta},"logprobs":null,"finish_reason":{finish}}}],"usage":{usage}}}')

def lit(s):
    return json.dumps(s, ensure_ascii=False)

chat = sse([
    chat_chunk('{"role":"assistant","content":"","refusal":null}', "null", "null"),
    chat_chunk('{"content":%s}' % lit("Hello"), "null", "null"),
    chat_chunk('{"content":%s}' % lit(' wörld, "quoted" 😀\n'), "null", "null"),
    chat_chunk('{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]}', "null", "null"),
    chat_chunk('{"tool_calls":[{"index":0,"function":{"arguments":%s}}]}' % lit('{"city":"Paris"}'), "null", "null"),
    chat_chunk("{}", '"tool_calls"', "null"),
    'data: {"id":"chatcmpl-AZ9","object":"chat.completion.chunk","created":1730000000,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_0ba0d124f1","choices":[],"usage":{"prompt_tokens":1200,"completion_tokens":340,"total_tokens":1540,"prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":128,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}',
    "data: [DONE]",
])

responses = sse([
    'event: response.created\ndata: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1","object":"response","created_at":1741290958,"status":"in_progress","error":null,"model":"gpt-4.1-2025-04-14","output":[],"usage":null,"metadata":{}}}',
    'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":2,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hi","logprobs":[]}',
    'event: response.audio.delta\ndata: {"type":"response.audio.delta","sequence_number":4,"response_id":"resp_1","delta":"UklGRiQAAABXQVZFZm10IBAAAAABAAEA"}',
    'event: response.function_call_arguments.delta\ndata: {"type":"response.function_call_arguments.delta","sequence_number":5,"item_id":"fc_1","output_index":1,"delta":"{\\"a\\":1}"}',
    'event: response.completed\ndata: {"type":"response.completed","sequence_number":7,"response":{"id":"resp_1","object":"response","status":"completed","model":"gpt-4.1-2025-04-14","output":[],"usage":{"input_tokens":37,"input_tokens_details":{"cached_tokens":5},"output_tokens":11,"output_tokens_details":{"reasoning_tokens":3},"total_tokens":48},"metadata":{}}}',
])

anthropic = sse([
    'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5-20250929","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":100,"cache_read_input_tokens":2000,"output_tokens":1}}}',
    'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":"","signature":""}}',
    'event: ping\ndata: {"type": "ping"}',
    'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"Let me think."}}',
    'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"Hello, ünïcode 😀!"}}',
    'event: content_block_delta\ndata: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{\\"location\\": \\"San Fra"}}',
    'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":42}}',
    'event: message_stop\ndata: {"type":"message_stop"}',
])

gemini = sse([
    'data: {"candidates": [{"content": {"parts": [{"text": "The"}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 10,"totalTokenCount": 10},"modelVersion": "gemini-2.5-flash","responseId": "a1"}',
    'data: {"candidates": [{"content": {"parts": [{"text": " jumps."}],"role": "model"},"finishReason": "STOP","index": 0}],"usageMetadata": {"promptTokenCount": 10,"cachedContentTokenCount": 6,"candidatesTokenCount": 7,"totalTokenCount": 49,"toolUsePromptTokenCount": 2,"thoughtsTokenCount": 30},"modelVersion": "gemini-2.5-flash","responseId": "a1"}',
], end="\r\n\r\n")

images_sse = sse([
    'event: image_generation.partial_image\ndata: {"type":"image_generation.partial_image","b64_json":"iVBORw0KGgo=","partial_image_index":0}',
    'event: image_generation.completed\ndata: {"type":"image_generation.completed","b64_json":"iVBORw0KGgo=","usage":{"input_tokens":50,"input_tokens_details":{"text_tokens":50,"image_tokens":0},"output_tokens":4160,"total_tokens":4210}}',
])

bodies = {
    "chat.json": (CHAT, False, '{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"Hi! How can I help?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}'),
    "completions.json": (COMPLETIONS, False, '{"id":"cmpl-1","object":"text_completion","model":"gpt-3.5-turbo-instruct","choices":[{"text":"\\n\\nThis is a test.","index":0,"finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}'),
    "responses.json": (RESPONSES, False, '{"id":"resp_1","object":"response","status":"completed","model":"gpt-4.1-2025-04-14","output":[{"type":"message","content":[{"type":"output_text","text":"Hi there"}]}],"usage":{"input_tokens":37,"input_tokens_details":{"cached_tokens":5},"output_tokens":11,"output_tokens_details":{"reasoning_tokens":3},"total_tokens":48}}'),
    "embeddings.json": (EMBEDDINGS, False, '{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.0023064255,-0.009327292,-0.0028842222]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}'),
    "images.json": (IMAGES, False, '{"created":1713833628,"data":[{"b64_json":"iVBORw0KGgo="},{"b64_json":"iVBORw0KGgo="}],"usage":{"total_tokens":100,"input_tokens":50,"output_tokens":50,"input_tokens_details":{"text_tokens":10,"image_tokens":40}}}'),
    "anthropic.json": (ANTHROPIC, False, '{"id":"msg_1","type":"message","role":"assistant","model":"claude-opus-4-20250514","content":[{"type":"text","text":"Hello!"}],"stop_reason":"end_turn","usage":{"input_tokens":12,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":6}}'),
    "gemini.json": (GEMINI, False, '[{"candidates":[{"content":{"parts":[{"text":"The"}],"role":"model"}}],"modelVersion":"gemini-2.5-pro"},{"candidates":[{"content":{"parts":[{"text":" end."}],"role":"model"},"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":2,"totalTokenCount":6},"modelVersion":"gemini-2.5-pro"}]'),
    "chat.sse": (CHAT, True, chat),
    "chat-cut.sse": (CHAT, True, chat[: len(chat) // 2]),
    "responses.sse": (RESPONSES, True, responses),
    "anthropic.sse": (ANTHROPIC, True, anthropic),
    "gemini.sse": (GEMINI, True, gemini),
    "images.sse": (IMAGES, True, images_sse),
}

os.makedirs(OUT, exist_ok=True)
for name, (api, is_sse, body) in bodies.items():
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(bytes([api | (0x80 if is_sse else 0), 0]) + body.encode())
