"""Writes the seed corpora of the fuzz targets other than the meter's:
shipped policies and the examples of docs/policies.md, the request bodies
of src/server/body.rs's tests, HTTP requests in the targets' text form,
the same as Envoy CheckRequests in protobuf, settle forms in JSON and
protobuf, and one input for each shape of the limits target."""
import os, re

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
CORPUS = os.path.join(HERE, "..", "corpus")

def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())

def read(path):
    with open(os.path.join(ROOT, path), "rb") as f:
        return f.read()

# policy_load: each shipped file, the shipped set as one input (files
# separated by NUL), the load generator's policy, and the docs' examples.
shipped = sorted(os.listdir(os.path.join(ROOT, "policies")))
for name in shipped:
    write("policy_load", "shipped-" + name, read("policies/" + name))
write("policy_load", "shipped-set", b"\0".join(read("policies/" + n) for n in shipped))
write("policy_load", "loadgen.yaml", read("examples/loadgen/policy.yaml"))
docs = read("docs/policies.md").decode()
for i, block in enumerate(re.findall(r"```yaml[^\n]*\n(.*?)```", docs, re.S)):
    write("policy_load", f"docs-{i:02d}.yaml", block)

# policy_limits: kind, three size bytes, then the bytes that pick lists
# or mappings; one per shape and size class.
for kind in range(10):
    for c in range(4):
        write("policy_limits", f"kind{kind}-size{c}", bytes([kind, 1, 0, c, 0x5a, 0xa5]))

# request_body: the bodies the unit tests of src/server/body.rs use.
src = read("src/server/body.rs").decode()
seen = []
for b in re.findall(r'r#"(\{.*?)"#', src):
    if "{{" not in b and b not in seen:
        seen.append(b)
for i, b in enumerate(seen):
    write("request_body", f"body-{i:02d}.json", b)

# HTTP requests in the text form (see TextRequest in fuzz/src/lib.rs).
CHAT = '{"model":"gpt-4o","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hello there!"}],"max_tokens":50,"stream":true}'
requests = {
    "openai-chat": f"POST /v1/chat/completions\nauthorization: Bearer sk-test-123\ncontent-type: application/json\n#id 6a1f-req\n\n{CHAT}",
    "anthropic": 'POST /v1/messages\nx-api-key: sk-ant-test\nanthropic-version: 2023-06-01\n=downgrade: header\n=team: growth\n\n{"model":"claude-opus-4","max_tokens":1024,"system":"You are terse.","messages":[{"role":"user","content":"Hi"}]}',
    "gemini": "POST /v1beta/models/gemini-2.5-pro:generateContent\nx-goog-api-key: AIza-test\n\n",
    "nginx-headers": "POST /v1/chat/completions\nauthorization: Bearer sk-test-123\nx-tollgate-model: gpt-5\nx-tollgate-input-tokens: 1200\nx-tollgate-max-tokens: 300\nx-tollgate-video-seconds: 8.5\nx-tollgate-team: growth\nx-tollgate-action: act-1\nx-tollgate-attempt-kind: retry",
    "partial-body": 'POST /v1/chat/completions\nauthorization: Bearer sk-test-123\nx-envoy-auth-partial-body: true\ncontent-length: 400000\n\n{"model":"gpt-4o","max_tokens":2048,"messages":[{"role":"user","content":"Lorem ipsum',
    "trusted": 'POST /v1/responses\nx-customer-id: cust-9\nx-customer-plan: free\nx-request-id: rid-1\nx-team: data\nx-tollgate-label-stage: final\nx-tollgate-workflow: research-agent\nauthorization: Bearer sk-x\n\n{"model":"gpt-5","instructions":"abcd","input":"efgh","max_output_tokens":300}',
    "image": 'POST /v2/generate-image\nauthorization: Bearer sk-x\nx-tollgate-label-stage: final\n\n{"model":"gpt-image-1","prompt":"a red fox","n":3,"quality":"high"}',
    "route-context": 'POST /agent/v1/chat/completions\nauthorization: bearer sk-x\n=settle: never\n=model: gpt-4o\n=environment: production\n=labels.plan: starter\n\n{"model":"o3","messages":[]}',
    "video": 'POST /v1/videos\nx-api-key: k\n=modality: video\n\n{"model":"sora-2","prompt":"waves","seconds":"12"}',
}
for name, text in requests.items():
    for flags in (0, 1):
        write("http_request", f"{name}-{flags}", bytes([flags]) + text.encode())
    for flags in (3, 6, 15):
        write("envoy_check", f"text-{name}-{flags}", bytes([flags]) + text.encode())

# Protobuf, field by field.
def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)

def field(tag, value):
    if isinstance(value, int):
        return varint(tag << 3) + varint(value)
    if isinstance(value, str):
        value = value.encode()
    return varint(tag << 3 | 2) + varint(len(value)) + value

def entry(tag, k, v):
    return field(tag, field(1, k) + field(2, v))

def parse_text(text):
    head, _, body = text.partition("\n\n")
    lines = head.split("\n")
    method, path = lines[0].split(" ", 1)
    headers, context, rid = [], [], ""
    for line in lines[1:]:
        if line.startswith("#id "):
            rid = line[4:]
        elif line.startswith("="):
            k, _, v = line[1:].partition(": ")
            context.append((k, v))
        else:
            k, _, v = line.partition(": ")
            headers.append((k, v))
    return method, path, headers, context, rid, (body if "\n\n" in text else None)

for name, text in requests.items():
    method, path, headers, context, rid, body = parse_text(text)
    for raw in (False, True):
        http = field(1, rid) if rid else b""
        http += field(2, method)
        if raw:
            hm = b"".join(field(1, field(1, k) + field(3, v)) for k, v in headers)
            http += field(13, hm)
        else:
            http += b"".join(entry(3, k, v) for k, v in headers)
        http += field(4, path)
        if body is not None:
            http += field(12 if raw else 11, body)
        ctx = field(4, field(2, http)) + b"".join(entry(10, k, v) for k, v in context)
        for flags in (0, 1):
            write("envoy_check", f"proto-{name}-{'raw' if raw else 'map'}-{flags}", bytes([flags]) + field(1, ctx))

# settle_form: JSON as POST /v1/settle reads it, protobuf as the native API.
forms = [
    '{"reservation_id":"r-1","usage":{"input_tokens":1200,"cached_input_tokens":1024,"output_tokens":340,"reasoning_tokens":128}}',
    '{"reservation_id":"r-2","usage":{"images":3,"image_quality":"high"}}',
    '{"reservation_id":"r-3","usage":{"video_seconds":8.5}}',
    '{"reservation_id":"r-4","usage":{"audio_seconds":"61.25"}}',
    '{"reservation_id":"r-5"}',
    '{"reservation_id":"r-6","usage":{"output_tokens":5,"video_seconds":2.5,"audio_seconds":"-0"}}',
    '{"reservation_id":"r-7","usage":{"input_tokens":18446744073709551615,"output_tokens":18446744073709551615}}',
]
for i, form in enumerate(forms):
    for model in range(6):
        write("settle_form", f"json-{i}-model{model}", bytes([model << 1]) + form.encode())
usages = [
    field(1, 1200) + field(2, 1024) + field(3, 340) + field(8, 128),
    field(4, 3) + field(5, "low"),
    field(6, "8") + field(7, "120.5"),
    b"",
]
for i, usage in enumerate(usages):
    req = field(1, f"r-{i}") + field(2, usage)
    for model in range(6):
        write("settle_form", f"proto-{i}-model{model}", bytes([model << 1 | 1]) + req)
