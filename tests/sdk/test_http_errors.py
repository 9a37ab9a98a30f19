"""Raw HTTP (httpx) checks of what the SDKs cannot express: error shapes and status codes,
SSE framing, auth, tokenize/detokenize, metrics, body limits and client disconnects."""

from __future__ import annotations

import json
import re
import selectors
import socket
import subprocess
import time
from urllib.parse import urlsplit

import httpx
import pytest

from conftest import (
    API_KEYS,
    BRISE_BIN,
    IS_SMOLLM2,
    MODEL,
    REPO,
    SLOT_CONTEXT,
    chat_body,
    detokenize,
    fixture_json,
    metric,
    post_ok,
    scrape,
    tokenize,
)

CAPITAL = "What is the capital of France? Answer in one sentence."
COUNT = "Count from 1 to 1000, separated by commas."
BODY_LIMIT = 8 * 1024 * 1024


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    """An OpenAI-shaped error: {"error": {"message", "type", "param", "code"}}."""
    assert r.status_code == status, f"want {status}, got {r.status_code}: {r.text[:1000]}"
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    j = r.json()
    assert isinstance(j, dict) and isinstance(j.get("error"), dict), j
    e = j["error"]
    for k in ("message", "type", "param", "code"):
        assert k in e, f"error object lacks {k!r}: {e}"
    assert isinstance(e["message"], str) and e["message"], e
    assert isinstance(e["type"], str) and e["type"], e
    if param is not None:
        assert isinstance(e["param"], str) and param in e["param"], f"param should name {param!r}: {e}"
    return e


# ---- health, models


def test_health(http):
    r = http.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_models_endpoints(http):
    r = http.get("/v1/models")
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["object"] == "list"
    assert MODEL in [m["id"] for m in j["data"]], j
    r = http.get(f"/v1/models/{MODEL}")
    assert r.status_code == 200, r.text
    m = r.json()
    assert m["id"] == MODEL and m["object"] == "model", m
    assert isinstance(m["max_context_length"], int) and m["max_context_length"] > 0, m
    assert isinstance(m["capabilities"], dict), m


def test_unknown_model_card_is_404(http):
    e = assert_error(http.get("/v1/models/no-such-model"), 404)
    assert e["code"] == "model_not_found", e


# ---- request validation


def test_malformed_json(http):
    r = http.post("/v1/chat/completions", content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"})
    assert_error(r, 400)


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -1),
        ("top_p", 2),
        ("max_tokens", 0),
        ("n", 0),
    ],
)
def test_invalid_parameter(http, field, value):
    r = http.post("/v1/chat/completions", json=chat_body(CAPITAL, **{field: value}))
    assert_error(r, 400, field)


def test_messages_missing(http):
    assert_error(http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 4}), 400, "messages")


def test_messages_empty(http):
    assert_error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": [], "max_tokens": 4}), 400, "messages")


def test_unknown_role(http):
    body = {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 4}
    e = assert_error(http.post("/v1/chat/completions", json=body), 400)
    assert e["param"] and ("messages" in e["param"] or "role" in e["param"]), e


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_unknown_field(http, path):
    body = chat_body(CAPITAL, max_tokens=4) if "chat" in path else {"model": MODEL, "prompt": "Hi", "max_tokens": 4}
    body["frobnicate_level"] = 3
    e = assert_error(http.post(path, json=body), 400, "frobnicate_level")
    assert "frobnicate_level" in e["message"], e


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_unknown_model(http, path):
    body = chat_body(CAPITAL, max_tokens=4) if "chat" in path else {"model": MODEL, "prompt": "Hi", "max_tokens": 4}
    body["model"] = "no-such-model"
    e = assert_error(http.post(path, json=body), 404)
    assert e["code"] == "model_not_found", e


def _ints(s: str) -> set[int]:
    return {int(x.replace(",", "")) for x in re.findall(r"\d{1,3}(?:,\d{3})+(?!\d)|\d+", s)}


def test_prompt_over_context_completions(http):
    prompt = " ".join(["apple"] * 9000)
    counts = {len(tokenize(http, prompt, add_special=a)) for a in (False, True)}
    assert min(counts) > SLOT_CONTEXT
    e = assert_error(http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 8}), 400)
    nums = _ints(e["message"])
    assert SLOT_CONTEXT in nums, f"message should give the context size {SLOT_CONTEXT}: {e['message']}"
    assert nums & counts, f"message should give the prompt's token count {sorted(counts)}: {e['message']}"


def test_prompt_over_context_chat(http):
    body = chat_body(" ".join(["apple"] * 9000), max_tokens=8)
    e = assert_error(http.post("/v1/chat/completions", json=body), 400)
    nums = _ints(e["message"])
    assert SLOT_CONTEXT in nums, f"message should give the context size {SLOT_CONTEXT}: {e['message']}"
    assert any(n > 9000 * 0.9 for n in nums), f"message should give the prompt's token count: {e['message']}"


def test_prompt_plus_max_tokens_over_context(http):
    words = 1500
    for _ in range(3):  # aim at ~1500 tokens whatever the tokenizer
        prompt = " ".join(["apple"] * words)
        n = len(tokenize(http, prompt, add_special=True))
        if SLOT_CONTEXT // 2 <= n < SLOT_CONTEXT - 8:
            break
        words = max(1, words * 1500 // n)
    assert n < SLOT_CONTEXT - 8
    body = {"model": MODEL, "prompt": prompt, "max_tokens": SLOT_CONTEXT - n + 1}
    e = assert_error(http.post("/v1/completions", json=body), 400)
    nums = _ints(e["message"])
    assert SLOT_CONTEXT in nums, e["message"]
    assert nums & {n, n - 1, n + 1}, f"message should give the prompt's token count {n}: {e['message']}"


def _complete(resp: bytearray) -> bool:
    """Whether `resp` holds a whole HTTP response with a Content-Length body."""
    end = resp.find(b"\r\n\r\n")
    if end < 0:
        return False
    m = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", bytes(resp[:end]))
    return bool(m) and len(resp) - (end + 4) >= int(m.group(1))


def _post_oversized(base_url: str, path: str, size: int) -> tuple[int, bytes]:
    """POST a `size`-byte JSON body over a raw socket, reading the answer while sending.

    The headers go first: a server that rejects on Content-Length answers before the body
    is sent (so no reset loses its answer); otherwise the body follows while the socket is
    watched for the answer.
    """
    u = urlsplit(base_url)
    prefix = b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "'
    suffix = b'"}]}'
    fill = size - len(prefix) - len(suffix)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size}\r\nConnection: close\r\n\r\n"
    ).encode()
    s = socket.create_connection((u.hostname, u.port), timeout=30)
    resp = bytearray()
    try:
        s.sendall(head)
        s.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(s, selectors.EVENT_READ)
        pending = [prefix] + [b"a" * 65536] * (fill // 65536) + [b"a" * (fill % 65536), suffix]
        cur = b""
        sending_after = time.monotonic() + 1.0  # give a Content-Length check time to answer first
        deadline = time.monotonic() + 60
        eof = False
        while not eof and time.monotonic() < deadline:
            want_write = (cur or pending) and time.monotonic() >= sending_after and not resp
            sel.modify(s, selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0))
            for _, ev in sel.select(timeout=0.2):
                if ev & selectors.EVENT_READ:
                    try:
                        data = s.recv(65536)
                    except ConnectionResetError:
                        data = b""
                    if not data:
                        eof = True
                        break
                    resp += data
                    if _complete(resp):
                        eof = True
                        break
                if ev & selectors.EVENT_WRITE and want_write:
                    if not cur:
                        cur = pending.pop(0)
                    try:
                        cur = cur[s.send(cur):]
                    except (BrokenPipeError, ConnectionResetError):
                        pending, cur = [], b""
    finally:
        s.close()
    head_end = resp.find(b"\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 ") and head_end > 0, f"no HTTP answer to a {size}-byte body: {bytes(resp[:300])!r}"
    return int(resp.split(b" ", 2)[1]), bytes(resp[head_end + 4:])


def test_body_over_limit_is_413(http, base_url):
    # One byte over: the byte that crosses the limit is the last one, so a server that
    # stops reading there has read everything and its close loses no answer to a reset.
    status, body = _post_oversized(base_url, "/v1/chat/completions", BODY_LIMIT + 1)
    assert status == 413, body[:500]
    assert http.get("/health").status_code == 200


# ---- headers and SSE framing


def test_ai_generated_header(http):
    r = http.post("/v1/chat/completions", json=chat_body(CAPITAL, temperature=0, max_tokens=4))
    assert r.status_code == 200, r.text
    assert r.headers.get("x-brise-ai-generated") == "true", dict(r.headers)
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "temperature": 0, "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.headers.get("x-brise-ai-generated") == "true", dict(r.headers)


def _sse_data(lines) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def test_sse_framing(http):
    body = chat_body(CAPITAL, temperature=0, max_tokens=8, stream=True, stream_options={"include_usage": True})
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers.get("content-type", "").startswith("text/event-stream"), r.headers
        assert r.headers.get("x-brise-ai-generated") == "true", dict(r.headers)
        lines = list(r.iter_lines())
    data = _sse_data(lines)
    assert data[-1] == "[DONE]", lines[-5:]
    chunks = [json.loads(d) for d in data[:-1]]
    assert len(chunks) >= 3
    assert chunks[-1]["choices"] == [] and set(chunks[-1]["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}
    for c in chunks[:-1]:
        assert c["object"] == "chat.completion.chunk"
        assert c["choices"][0]["index"] == 0
        # finish_reason is present (null until the last chunk): strict SDKs (mistralai) require it.
        assert "finish_reason" in c["choices"][0], c
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-2]] == [None] * (len(chunks) - 2)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    full = post_ok(http, "/v1/chat/completions", chat_body(CAPITAL, temperature=0, max_tokens=8))
    assert text == full["choices"][0]["message"]["content"]


# ---- client disconnect


def test_client_disconnect_stops_generation(http, base_url):
    before = metric(scrape(http), "brise_generated_tokens_total")
    params = dict(temperature=0, max_tokens=400, stream=True)
    if IS_SMOLLM2:
        params["logit_bias"] = {"0": -100, "2": -100}  # <|endoftext|>, <|im_end|>: no early stop
    got = 0
    with httpx.Client(base_url=base_url, timeout=60, trust_env=False) as c:
        with c.stream("POST", "/v1/chat/completions", json=chat_body(COUNT, **params)) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    got += 1
                    if got == 3:
                        break
    assert got == 3
    closed = time.monotonic()

    # Wait until nothing waits or runs (brise_queue_depth, and brise_active_sequences where
    # the server has it) and the token counter has not moved for a second: a server that
    # counts a request's tokens only when the request ends is then done with it too.
    def idle(samples):
        return all(v == 0 for n, _, v in samples if n in ("brise_queue_depth", "brise_active_sequences"))

    last, stable_since = metric(scrape(http), "brise_generated_tokens_total"), time.monotonic()
    while True:
        assert time.monotonic() - closed < 30, (
            "still generating (or brise_queue_depth / brise_active_sequences not 0) 30 s after the disconnect"
        )
        time.sleep(0.2)
        samples = scrape(http)
        now = metric(samples, "brise_generated_tokens_total")
        if now != last or not idle(samples):
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= 1.0:
            break
    generated = last - before
    assert generated < 300, f"{generated:.0f} tokens generated for a stream closed after 3 chunks (max_tokens 400)"

    t0 = time.monotonic()
    j = post_ok(http, "/v1/chat/completions", chat_body(CAPITAL, temperature=0, max_tokens=8))
    assert j["choices"][0]["message"]["content"]
    assert time.monotonic() - t0 < 30


# ---- auth


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {API_KEYS[0]}"}, {"authorization": "Bearer"}],
    ids=["none", "wrong-key", "not-bearer", "empty"],
)
def test_auth_rejects(auth_server, headers):
    with httpx.Client(base_url=auth_server.url, timeout=60, trust_env=False) as c:
        assert_error(c.post("/v1/chat/completions", json=chat_body(CAPITAL, max_tokens=2), headers=headers), 401)
        assert_error(c.get("/v1/models", headers=headers), 401)


@pytest.mark.parametrize("key", API_KEYS)
def test_auth_accepts(auth_server, key):
    with httpx.Client(base_url=auth_server.url, timeout=60, trust_env=False) as c:
        h = {"authorization": f"Bearer {key}"}
        assert c.get("/v1/models", headers=h).status_code == 200
        r = c.post("/v1/chat/completions", json=chat_body(CAPITAL, temperature=0, max_tokens=2), headers=h)
        assert r.status_code == 200, r.text


def test_auth_health_needs_no_key(auth_server):
    with httpx.Client(base_url=auth_server.url, timeout=60, trust_env=False) as c:
        r = c.get("/health")
        assert r.status_code == 200 and r.json() == {"status": "ok"}


# ---- tokenize / detokenize


def _cli_tokenize(text: str, *flags: str) -> list[int]:
    out = subprocess.run([str(BRISE_BIN), "tokenize", MODEL, text, *flags], capture_output=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    return json.loads(out.stdout)


def test_tokenize_roundtrip(http):
    text = "Hello world, this is brise."
    toks = tokenize(http, text, add_special=False)
    assert toks and detokenize(http, toks) == text
    with_model = post_ok(http, "/tokenize", {"content": text, "model": MODEL, "add_special": False})
    assert with_model["tokens"] == toks


def test_tokenize_matches_cli(http):
    text = "Hello world, this is brise."
    assert tokenize(http, text, add_special=False) == _cli_tokenize(text, "--no-special")
    assert tokenize(http, text, add_special=True) == _cli_tokenize(text)


@pytest.mark.skipif(not IS_SMOLLM2, reason="reference tokenizations are for smollm2:135m")
def test_tokenize_matches_llama_cpp(http):
    cases = [c for c in fixture_json("tokenize/smollm2.json")["cases"] if "<" not in c["text"]]
    assert len(cases) > 30
    for c in cases:
        assert tokenize(http, c["text"], add_special=False) == c["ids"], c["text"]
        assert detokenize(http, c["ids"]) == c["detok"], c["text"]


# ---- metrics


NAMES = [
    "brise_requests_total",
    "brise_prompt_tokens_total",
    "brise_generated_tokens_total",
    "brise_time_to_first_token_seconds",
    "brise_inter_token_latency_seconds",
    "brise_queue_depth",
    "brise_batch_size",
    "brise_kv_cache_usage_ratio",
]


def test_metrics(http):
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers.get("content-type", "").startswith("text/plain"), r.headers
    before = scrape(http)
    usage = post_ok(http, "/v1/chat/completions", chat_body(CAPITAL, temperature=0, max_tokens=8))["usage"]
    text = http.get("/metrics").text
    after = scrape(http)
    names = {n for n, _, _ in after}
    for name in NAMES:
        assert any(n == name or n.startswith(name + "_") for n in names), f"/metrics lacks {name}"
    assert re.search(r"^# TYPE brise_time_to_first_token_seconds histogram$", text, re.M), "ttft is not a histogram"
    for suffix in ("_bucket", "_sum", "_count"):
        assert "brise_time_to_first_token_seconds" + suffix in names

    def delta(name):
        return metric(after, name) - metric(before, name)

    assert delta("brise_requests_total") >= 1
    # Cached prompt prefixes may not count as processed, so only "some".
    assert delta("brise_prompt_tokens_total") >= 1
    assert delta("brise_generated_tokens_total") >= usage["completion_tokens"]
    assert delta("brise_time_to_first_token_seconds_count") >= 1
    inf = [v for n, lab, v in after if n == "brise_time_to_first_token_seconds_bucket" and 'le="+Inf"' in lab]
    assert inf, "histogram without a +Inf bucket"
    assert sum(inf) == metric(after, "brise_time_to_first_token_seconds_count"), "+Inf bucket must equal _count"
    assert all(0.0 <= v <= 1.0 for n, _, v in after if n == "brise_kv_cache_usage_ratio")
    assert all(v >= 0 for n, _, v in after if n in ("brise_queue_depth", "brise_batch_size"))
