"""On Qwen2.5-Coder: fill-in-the-middle (Mistral's /v1/fim/completions and OpenAI's
`suffix`) and tool calling; two models served by one process; Mistral's 422 shape."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from mistralai.client import Mistral, errors

from conftest import serve

QWEN = "qwen2.5-coder:0.5b"
SMOL = "smollm2:135m"
PREFIX = "def is_even(n):\n    "
SUFFIX = "\n\nprint(is_even(4))\n"


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    srv = serve(tmp_path_factory, "two", [], ["-t", "2", "--parallel", "2", "-c", "4096", SMOL, QWEN])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http2(two):
    with httpx.Client(base_url=two.url, timeout=120, trust_env=False) as c:
        yield c


def test_both_models_listed_and_served(http2):
    data = http2.get("/v1/models").json()["data"]
    cards = {m["id"]: m for m in data}
    assert set(cards) == {SMOL, QWEN}
    assert cards[QWEN]["capabilities"]["completion_fim"] is True
    assert cards[SMOL]["capabilities"]["completion_fim"] is False
    for model in (SMOL, QWEN):
        r = http2.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "Hi"}],
            "temperature": 0, "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model


def test_mistral_fim(two, http2):
    client = Mistral(api_key="x", server_url=two.url)
    r = client.fim.complete(model=QWEN, prompt=PREFIX, suffix=SUFFIX, temperature=0, max_tokens=16)
    text = r.choices[0].message.content
    assert isinstance(text, str) and text.strip(), r
    assert "return" in text, text
    # The same request through OpenAI's legacy `suffix` gives the same text.
    legacy = http2.post("/v1/completions", json={
        "model": QWEN, "prompt": PREFIX, "suffix": SUFFIX, "temperature": 0, "max_tokens": 16}).json()
    assert legacy["choices"][0]["text"] == text
    # And a FIM prompt differs from a plain completion of the prefix: the suffix is used.
    plain = http2.post("/v1/completions", json={
        "model": QWEN, "prompt": PREFIX, "temperature": 0, "max_tokens": 16}).json()
    assert plain["usage"]["prompt_tokens"] < legacy["usage"]["prompt_tokens"]


def test_fim_stream(two):
    client = Mistral(api_key="x", server_url=two.url)
    whole = client.fim.complete(model=QWEN, prompt=PREFIX, suffix=SUFFIX, temperature=0, max_tokens=12)
    parts = [ev.data.choices[0].delta.content or "" for ev in
             client.fim.stream(model=QWEN, prompt=PREFIX, suffix=SUFFIX, temperature=0, max_tokens=12)
             if ev.data.choices]
    assert "".join(parts) == whole.choices[0].message.content


def test_fim_errors_are_422_with_detail(two, http2):
    r = http2.post("/v1/fim/completions", json={"model": QWEN, "prompt": "x", "temperature": -1})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "temperature"]
    r = http2.post("/v1/fim/completions", json={"model": SMOL, "prompt": "x"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "model"]
    r = http2.post("/v1/fim/completions", json={"model": QWEN, "prompt": "x", "bogus": 1})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "bogus"]
    client = Mistral(api_key="x", server_url=two.url)
    with pytest.raises(errors.HTTPValidationError):
        client.fim.complete(model=SMOL, prompt="x")
    # The OpenAI route keeps OpenAI's 400.
    r = http2.post("/v1/completions", json={"model": SMOL, "prompt": "x", "suffix": "y"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"


def test_min_tokens(http2):
    body = {"model": SMOL, "messages": [{"role": "user", "content": "What is 2+2?"}],
            "temperature": 0, "max_tokens": 40}
    short = http2.post("/v1/chat/completions", json=body).json()
    n = short["usage"]["completion_tokens"]
    assert short["choices"][0]["finish_reason"] == "stop" and n < 30, short
    longer = http2.post("/v1/chat/completions", json={**body, "min_tokens": n + 5}).json()
    assert longer["usage"]["completion_tokens"] >= n + 5, longer
    bad = http2.post("/v1/chat/completions", json={**body, "min_tokens": 50})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "min_tokens"


# ---- tools (Qwen2.5-Coder's template renders them; calls are <tool_call> JSON)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def oai2(two):
    return openai.OpenAI(base_url=f"{two.url}/v1", api_key="x", max_retries=0)


def check_call(call, name):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == name
    args = json.loads(call.function.arguments)
    assert isinstance(args.get("city"), str), args
    if "unit" in args:
        assert args["unit"] in ("celsius", "fahrenheit")
    return args


@pytest.mark.parametrize("temperature,seed", [(0, None), (1.0, 7)])
def test_required_tool_call(oai2, temperature, seed):
    r = oai2.chat.completions.create(model=QWEN, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                     temperature=temperature, seed=seed, max_tokens=80)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert len(c.message.tool_calls) == 1
    assert c.message.tool_calls[0].function.name in ("get_weather", "get_time")
    check_call(c.message.tool_calls[0], c.message.tool_calls[0].function.name)


def test_named_tool_choice(oai2):
    r = oai2.chat.completions.create(model=QWEN, messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=80,
                                     tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert r.choices[0].finish_reason == "tool_calls"
    check_call(r.choices[0].message.tool_calls[0], "get_time")


def test_tool_call_streams(oai2):
    kw = dict(model=QWEN, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=80)
    whole = oai2.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    calls, finish = {}, None
    for ch in oai2.chat.completions.create(stream=True, **kw):
        for d in ch.choices:
            for tc in d.delta.tool_calls or []:
                calls.setdefault(tc.index, {"name": "", "args": ""})
                calls[tc.index]["name"] += tc.function.name or ""
                calls[tc.index]["args"] += tc.function.arguments or ""
            finish = d.finish_reason or finish
    assert finish == "tool_calls"
    assert calls[0]["name"] == whole.function.name
    assert json.loads(calls[0]["args"]) == json.loads(whole.function.arguments)


def test_tool_results_round_trip(oai2):
    first = oai2.chat.completions.create(model=QWEN, messages=ASK, tools=[WEATHER], tool_choice="required",
                                         temperature=0, max_tokens=80).choices[0].message
    call = first.tool_calls[0]
    msgs = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})},
    ]
    r = oai2.chat.completions.create(model=QWEN, messages=msgs, tools=[WEATHER], temperature=0, max_tokens=40)
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length", "tool_calls")
    # The tool result reached the prompt.
    bare = oai2.chat.completions.create(model=QWEN, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=1)
    assert r.usage.prompt_tokens > bare.usage.prompt_tokens + 20


def test_tools_need_a_tool_template(oai2):
    with pytest.raises(openai.BadRequestError) as e:
        oai2.chat.completions.create(model=SMOL, messages=ASK, tools=[WEATHER], max_tokens=4)
    assert e.value.param == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        oai2.chat.completions.create(model=QWEN, messages=ASK, tools=[WEATHER], max_tokens=4,
                                     tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.param == "tool_choice"
    # tool_choice none: the tools are not offered, and nothing is parsed as a call.
    r = oai2.chat.completions.create(model=SMOL, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=4)
    assert r.choices[0].message.tool_calls is None


def test_mistral_tool_choice_any(two):
    client = Mistral(api_key="x", server_url=two.url)
    r = client.chat.complete(model=QWEN, messages=ASK, tools=[WEATHER], tool_choice="any", temperature=0, max_tokens=80)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    tc = c.message.tool_calls[0]
    assert tc.function.name == "get_weather"
    args = tc.function.arguments if isinstance(tc.function.arguments, dict) else json.loads(tc.function.arguments)
    assert isinstance(args["city"], str)
