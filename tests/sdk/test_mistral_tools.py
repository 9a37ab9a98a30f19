"""Tool calls in Mistral's own format, on the tiny Mistral model (random weights, Mistral's
v3 chat template): `[TOOL_CALLS] [{"name": …, "arguments": {…}}]`, where `[TOOL_CALLS]` is
a control token and call ids are 9 letters or digits (the template refuses others)."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
from mistralai.client import Mistral

from conftest import FIXTURES, serve

TINY = "tiny-mistral-f16"
# A random model writes any string it may: enums keep its calls short and checkable.
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"enum": ["Paris", "Lyon"]}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Lyon"]}},
                   "required": ["city"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL_ID = re.compile(r"^[A-Za-z0-9]{9}$")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = str(FIXTURES / "tiny-mistral" / "tiny-mistral-f16.gguf")
    srv = serve(tmp_path_factory, "tiny", [], ["-t", "2", "--parallel", "2", "-c", "1024", model])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http3(tiny):
    with httpx.Client(base_url=tiny.url, timeout=120, trust_env=False) as c:
        yield c


def args_of(call) -> dict:
    a = call.function.arguments
    return a if isinstance(a, dict) else json.loads(a)


def test_function_calling_capability(http3):
    card = http3.get(f"/v1/models/{TINY}").json()
    assert card["capabilities"]["function_calling"] is True


def test_forced_call_opens_with_the_control_token(http3):
    r = http3.post("/v1/chat/completions", json={
        "model": TINY, "messages": ASK, "tools": [WEATHER], "tool_choice": "required",
        "temperature": 0, "max_tokens": 80, "logprobs": True})
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    assert c["finish_reason"] == "tool_calls", c
    # The first generated token is the [TOOL_CALLS] control token itself, not the text
    # "[TOOL_CALLS]" spelled in ordinary tokens.
    tokens = [t["token"] for t in c["logprobs"]["content"]]
    assert tokens[0] == "[TOOL_CALLS]", tokens[:8]
    assert r.json()["usage"]["completion_tokens"] == len(tokens)
    call = c["message"]["tool_calls"][0]
    assert CALL_ID.match(call["id"]), call
    assert call["function"]["name"] == "get_weather"
    assert set(json.loads(call["function"]["arguments"])) == {"city", "unit"}
    assert c["message"]["content"] is None


def test_mistral_sdk_tool_choice_any(tiny):
    client = Mistral(api_key="x", server_url=tiny.url)
    r = client.chat.complete(model=TINY, messages=ASK, tools=[WEATHER, TIME], tool_choice="any",
                             temperature=0, max_tokens=80)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert len(c.message.tool_calls) == 1
    tc = c.message.tool_calls[0]
    assert CALL_ID.match(tc.id), tc.id
    assert tc.function.name in ("get_weather", "get_time")
    assert args_of(tc)["city"] in ("Paris", "Lyon")


def test_named_choice_and_sampling(tiny):
    client = openai.OpenAI(base_url=f"{tiny.url}/v1", api_key="x", max_retries=0)
    for seed in (1, 2, 3):
        r = client.chat.completions.create(
            model=TINY, messages=ASK, tools=[WEATHER, TIME], temperature=1.0, seed=seed, max_tokens=80,
            tool_choice={"type": "function", "function": {"name": "get_time"}})
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", c
        assert c.message.tool_calls[0].function.name == "get_time"
        assert args_of(c.message.tool_calls[0])["city"] in ("Paris", "Lyon")


def test_stream_sends_the_call_as_delta_tool_calls(tiny):
    client = openai.OpenAI(base_url=f"{tiny.url}/v1", api_key="x", max_retries=0)
    kw = dict(model=TINY, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=80)
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    calls, content, finish = [], "", None
    for ch in client.chat.completions.create(**kw, stream=True):
        for choice in ch.choices:
            d = choice.delta
            content += d.content or ""
            for tc in d.tool_calls or []:
                calls.append(tc)
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    # No control token (or call text) leaks into the streamed content.
    assert content == "", content
    assert len(calls) == 1 and CALL_ID.match(calls[0].id)
    assert calls[0].function.name == whole.function.name
    assert json.loads(calls[0].function.arguments) == json.loads(whole.function.arguments)


def test_tool_results_round_trip_through_the_template(tiny, http3):
    client = Mistral(api_key="x", server_url=tiny.url)
    first = client.chat.complete(model=TINY, messages=ASK, tools=[WEATHER], tool_choice="any",
                                 temperature=0, max_tokens=80).choices[0].message
    call = first.tool_calls[0]
    msgs = ASK + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": json.dumps(args_of(call))}}]},
        {"role": "tool", "tool_call_id": call.id, "name": call.function.name,
         "content": json.dumps({"temperature": 21})},
    ]
    r = client.chat.complete(model=TINY, messages=msgs, tools=[WEATHER], temperature=0, max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    bare = client.chat.complete(model=TINY, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=1)
    # The call and its result reached the prompt ([TOOL_CALLS] … [TOOL_RESULTS] … ).
    assert r.usage.prompt_tokens > bare.usage.prompt_tokens + 15
    # An id the template cannot render is a 400 naming the messages, not a silent drop.
    bad = [dict(m) for m in msgs]
    bad[1] = {**bad[1], "tool_calls": [{**bad[1]["tool_calls"][0], "id": "call_123"}]}
    resp = http3.post("/v1/chat/completions", json={"model": TINY, "messages": bad, "tools": [WEATHER],
                                                    "max_tokens": 4})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "messages"
    assert "9 characters" in resp.json()["error"]["message"]


def test_auto_call_text_the_model_opens(http3):
    body = {"model": TINY, "messages": ASK, "tools": [WEATHER], "temperature": 0, "max_tokens": 6}
    # Unforced, this model does not open a call: the answer is plain content.
    r = http3.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert r["finish_reason"] == "length", r
    assert r["message"].get("tool_calls") is None and "[TOOL_CALLS]" not in r["message"]["content"]
    # Pushed to open one (token 5 is [TOOL_CALLS]), it writes no valid call in 6 tokens:
    # what it wrote comes back as content, control token included, rather than vanishing.
    r = http3.post("/v1/chat/completions", json={**body, "logit_bias": {"5": 100}}).json()["choices"][0]
    assert r["finish_reason"] == "length", r
    assert r["message"]["content"].startswith("[TOOL_CALLS]"), r
