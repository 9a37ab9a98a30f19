"""Ollama's API (/api/…) with the real `ollama` Python client: chat and generate, plain
and streamed, `format`, `options`, the model routes, Ollama's errors, and the ledger
record of every answer (docs/API.md, "Ollama")."""

from __future__ import annotations

import json
import subprocess

import httpx
import ollama
import pytest

from conftest import BRISE_BIN, MODEL, SLOT_CONTEXT, user

SHORT = {"temperature": 0, "num_predict": 8}


@pytest.fixture(scope="module")
def oll(base_url):
    return ollama.Client(host=base_url, timeout=120)


def show_record(ledger, cid: str) -> dict:
    p = subprocess.run([str(BRISE_BIN), "ledger", "show", cid, "--ledger", str(ledger)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, f"{cid} is not in the ledger: {p.stderr}"
    return json.loads(p.stdout)


def check_final(r, max_eval: int = 8):
    assert r.done is True and r.done_reason in ("stop", "length")
    assert 1 <= r.eval_count <= max_eval
    assert r.prompt_eval_count > 0
    for f in ("total_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(r, f), int) and getattr(r, f) > 0, f
    assert r.total_duration >= r.eval_duration
    assert r.load_duration == 0


def test_chat_plain_equals_openai_at_temperature_0(oll, http):
    msgs = user("Name three colours.")
    r = oll.chat(model=MODEL, messages=msgs, stream=False, options=SHORT)
    check_final(r)
    assert r.message.role == "assistant" and r.message.content
    assert r.model == MODEL
    o = http.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs, "temperature": 0,
                                                 "max_tokens": 8}).json()
    assert r.message.content == o["choices"][0]["message"]["content"]
    assert r.eval_count == o["usage"]["completion_tokens"]
    assert r.prompt_eval_count == o["usage"]["prompt_tokens"]
    assert r.done_reason == o["choices"][0]["finish_reason"]


def test_chat_streamed(oll, base_url):
    plain = oll.chat(model=MODEL, messages=user("Count to five."), stream=False, options=SHORT)
    # `:latest` is Ollama's default tag: the same model.
    parts = list(oll.chat(model=f"{MODEL}:latest", messages=user("Count to five."), stream=True, options=SHORT))
    assert len(parts) >= 2
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == plain.message.content
    check_final(parts[-1])
    assert parts[-1].eval_count == plain.eval_count
    # The server streams unless told not to (the client always says which it wants).
    r = httpx.post(f"{base_url}/api/chat", json={"model": MODEL, "messages": user("Count to five."),
                                                 "options": SHORT}, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert [x["done"] for x in lines] == [False] * (len(lines) - 1) + [True]
    assert "".join(x["message"]["content"] for x in lines) == plain.message.content


def test_generate_plain_and_streamed(oll):
    r = oll.generate(model=MODEL, prompt="Why is the sky blue?", stream=False, options=SHORT)
    check_final(r)
    assert r.response
    parts = list(oll.generate(model=MODEL, prompt="Why is the sky blue?", stream=True, options=SHORT))
    assert parts[-1].done and "".join(p.response for p in parts) == r.response
    # raw: the prompt as it is, no chat template (as /v1/completions).
    raw = oll.generate(model=MODEL, prompt="The capital of France is", raw=True, stream=False, options=SHORT)
    check_final(raw)
    # A system prompt goes in the chat template.
    s = oll.generate(model=MODEL, prompt="Hi", system="Answer in French.", stream=False, options=SHORT)
    check_final(s)


def test_generate_without_prompt_loads(oll):
    r = oll.generate(model=MODEL)
    assert r.done and r.done_reason == "load" and r.response == ""


def test_format_json_gives_json(oll):
    r = oll.generate(model=MODEL, prompt="Describe a cat as a JSON object.", format="json", stream=False,
                     options={"temperature": 0, "num_predict": 64})
    if r.done_reason == "stop":
        assert isinstance(json.loads(r.response), dict)
    else:
        assert r.response.lstrip().startswith("{")
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    c = oll.chat(model=MODEL, messages=user("Invent a person."), format=schema, stream=False,
                 options={"temperature": 0, "num_predict": 64})
    assert c.done_reason == "stop", c
    v = json.loads(c.message.content)
    assert set(v) == {"name", "age"} and isinstance(v["age"], int)


def test_options_are_honoured_and_checked(oll):
    r = oll.chat(model=MODEL, messages=user("Tell me a long story."), stream=False,
                 options={"temperature": 0, "num_predict": 3, "num_thread": 2, "use_mmap": True,
                          "num_ctx": SLOT_CONTEXT})
    assert r.eval_count == 3 and r.done_reason == "length"
    seeded = [oll.chat(model=MODEL, messages=user("Pick a word."), stream=False,
                       options={"temperature": 1.0, "seed": 42, "num_predict": 6}).message.content for _ in range(2)]
    assert seeded[0] == seeded[1]
    with pytest.raises(ollama.ResponseError) as e:
        oll.chat(model=MODEL, messages=user("Hi"), options={"temperature": 0, "bogus_option": 1})
    assert e.value.status_code == 400 and "bogus_option" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        oll.generate(model=MODEL, prompt="Hi", options={"num_ctx": SLOT_CONTEXT * 100})
    assert e.value.status_code == 400 and "num_ctx" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        oll.generate(model=MODEL, prompt="Hi", options={"mirostat": 2})
    assert e.value.status_code == 400 and "mirostat" in e.value.error


def test_unsupported_inputs_are_400s(oll, base_url):
    with pytest.raises(ollama.ResponseError) as e:
        oll.chat(model=MODEL, messages=[{"role": "user", "content": "What is this?", "images": [b"\x89PNG"]}])
    assert e.value.status_code == 400 and "images" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        oll.generate(model=MODEL, prompt="Hi", context=[1, 2, 3])
    assert e.value.status_code == 400 and "context" in e.value.error
    r = httpx.post(f"{base_url}/api/chat", json={"model": MODEL, "messages": user("Hi"), "surprise": 1})
    assert r.status_code == 400 and r.json() == {"error": r.json()["error"]} and "surprise" in r.json()["error"]


def test_unknown_model_is_404(oll):
    with pytest.raises(ollama.ResponseError) as e:
        oll.chat(model="no-such-model:7b", messages=user("Hi"), stream=False)
    assert e.value.status_code == 404 and e.value.error == 'model "no-such-model:7b" not found'
    with pytest.raises(ollama.ResponseError) as e:
        oll.generate(model="no-such-model:latest", prompt="Hi", stream=True).__next__()
    assert e.value.status_code == 404 and e.value.error == 'model "no-such-model:latest" not found'
    with pytest.raises(ollama.ResponseError) as e:
        oll.show("no-such-model")
    assert e.value.status_code == 404


def test_list_show_ps_version(oll, http):
    models = oll.list().models
    assert [m.model for m in models] == [MODEL]
    m = models[0]
    assert m.size > 0 and m.details.format == "gguf" and m.details.family
    assert m.details.parameter_size and m.details.quantization_level and m.modified_at
    s = oll.show(MODEL)
    arch = s.modelinfo["general.architecture"]
    assert s.modelinfo[f"{arch}.context_length"] > 0 and s.modelinfo["general.parameter_count"] > 0
    assert "completion" in s.capabilities and "temperature" in s.parameters
    assert s.details.family == m.details.family
    p = oll.ps().models
    assert [x.model for x in p] == [MODEL] and p[0].context_length == SLOT_CONTEXT
    assert http.get("/api/version").json()["version"]


def test_tools(oll, http):
    card = http.get(f"/v1/models/{MODEL}").json()
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    msgs = user("What is the weather in Paris?")
    if not card["capabilities"]["function_calling"]:
        with pytest.raises(ollama.ResponseError) as e:
            oll.chat(model=MODEL, messages=msgs, tools=tools, stream=False)
        assert e.value.status_code == 400 and "tools" in e.value.error
        return
    r = oll.chat(model=MODEL, messages=msgs, tools=tools, stream=False, options={"temperature": 0, "num_predict": 64})
    for call in r.message.tool_calls or []:
        assert isinstance(call.function.arguments, dict)


def test_answers_are_recorded_with_their_id(brise, base_url, oll):
    r = httpx.post(f"{base_url}/api/chat", json={"model": MODEL, "messages": user("Say hi."), "stream": False,
                                                 "options": SHORT}, timeout=120)
    assert r.status_code == 200 and r.headers["x-brise-ai-generated"] == "true"
    cid = r.headers["x-brise-completion-id"]
    rec = show_record(brise.ledger, cid)
    assert rec["endpoint"] == "/api/chat" and rec["status"] == "ok"
    assert rec["messages"] == user("Say hi.")
    assert rec["output"][0]["text"] == r.json()["message"]["content"]
    assert rec["completion_tokens"] == r.json()["eval_count"]
    fb = httpx.post(f"{base_url}/v1/feedback", json={"completion_id": cid, "rating": 1})
    assert fb.status_code == 201, fb.text
    assert show_record(brise.ledger, cid)["feedback"][0]["rating"] == 1
    # Streamed, through the client: the newest /api/generate record is this answer.
    text = "".join(p.response for p in oll.generate(model=MODEL, prompt="Say bye.", stream=True, options=SHORT))
    (gid,) = brise.sql("SELECT id FROM completions WHERE endpoint = '/api/generate' "
                       "ORDER BY created_at_ms DESC LIMIT 1")[0]
    rec = show_record(brise.ledger, gid)
    assert rec["output"][0]["text"] == text and rec["status"] == "ok"


def test_api_keys(auth_server):
    from conftest import API_KEYS

    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=auth_server.url, timeout=60).list()
    assert e.value.status_code == 401 and "API key" in e.value.error
    c = ollama.Client(host=auth_server.url, timeout=120, headers={"Authorization": f"Bearer {API_KEYS[0]}"})
    assert [m.model for m in c.list().models] == [MODEL]
    r = c.chat(model=MODEL, messages=user("Hi"), stream=False, options=SHORT)
    check_final(r)
