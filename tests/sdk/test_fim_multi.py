"""Fill-in-the-middle (Mistral's /v1/fim/completions and OpenAI's `suffix`) on
Qwen2.5-Coder, two models served by one process, and Mistral's 422 validation shape."""

from __future__ import annotations

import httpx
import pytest
from mistralai.client import Mistral, errors

from conftest import BriseServer

QWEN = "qwen2.5-coder:0.5b"
SMOL = "smollm2:135m"
PREFIX = "def is_even(n):\n    "
SUFFIX = "\n\nprint(is_even(4))\n"


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    srv = BriseServer(tmp_path_factory.mktemp("two") / "serve.log", [],
                      ["-t", "2", "--parallel", "2", "-c", "4096", SMOL, QWEN])
    try:
        srv.wait_ready()
    except BaseException:
        srv.kill()
        raise
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
