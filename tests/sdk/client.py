"""Calls an AI API through tollgate with an official SDK, for tests/sdk_clients.rs.

    client.py openai|anthropic BASE_URL ACTION_ID CALLS

Makes CALLS calls in turn with the SDK's default retry settings, all with
`x-tollgate-action-id: ACTION_ID`, and prints one JSON object: for each call
whether it succeeded, the SDK's error class and status if not, the wall time
it took, and every HTTP attempt the SDK made for it (status and headers).
"""

import json
import sys
import time

import anthropic
import openai

sdk, base_url, action, calls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

attempts = []


def record(response):
    attempt = {"status": response.status_code, "headers": {k.lower(): v for k, v in response.headers.items()}}
    attempts.append(attempt)
    # As it happens, for a test that has to kill a script asleep before a retry.
    print("attempt", json.dumps(attempt), file=sys.stderr, flush=True)


headers = {"x-tollgate-action-id": action}
if sdk == "openai":
    client = openai.OpenAI(
        base_url=base_url + "/v1",
        api_key="sk-test",
        default_headers=headers,
        http_client=openai.DefaultHttpxClient(event_hooks={"response": [record]}),
    )

    def call():
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
        return raw.retries_taken, raw.parse().choices[0].message.content

elif sdk == "anthropic":
    client = anthropic.Anthropic(
        base_url=base_url,
        api_key="sk-ant-test",
        default_headers=headers,
        http_client=anthropic.DefaultHttpxClient(event_hooks={"response": [record]}),
    )

    def call():
        raw = client.messages.with_raw_response.create(
            model="claude-sonnet-4", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        )
        return raw.retries_taken, raw.parse().content[0].text

else:
    sys.exit(f"unknown sdk {sdk!r}")

results = []
for _ in range(calls):
    del attempts[:]
    start = time.monotonic()
    result = {}
    try:
        retries_taken, text = call()
        result.update(ok=True, retries_taken=retries_taken, text=text)
    except (openai.APIStatusError, anthropic.APIStatusError) as e:
        result.update(
            ok=False,
            error=type(e).__name__,
            rate_limit=isinstance(e, (openai.RateLimitError, anthropic.RateLimitError)),
            status=e.response.status_code,
            headers={k.lower(): v for k, v in e.response.headers.items()},
            body=e.response.text,
        )
    result["elapsed"] = time.monotonic() - start
    result["attempts"] = list(attempts)
    results.append(result)
    print("call", json.dumps(result), file=sys.stderr, flush=True)

print(json.dumps({"sdk": sdk, "calls": results}))
