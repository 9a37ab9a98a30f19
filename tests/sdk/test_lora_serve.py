"""LoRA adapters served by name: `brise serve --lora NAME=DIR`, picked with `model` =
"MODEL:NAME" or the `adapter` field, listed in /v1/models, recorded in the ledger, and
giving what `brise run --lora` gives. (The adapter's arithmetic is checked against PEFT
in crates/brise-model/tests/lora.rs; this checks the serving.)"""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest

from conftest import BRISE_BIN, FIXTURES, IS_SMOLLM2, MODEL, BriseServer

pytestmark = pytest.mark.skipif(not IS_SMOLLM2, reason="the adapter fixture is for SmolLM2")

ADAPTER = FIXTURES / "lora" / "smollm2-r8"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def lora_srv(tmp_path_factory):
    srv = BriseServer(tmp_path_factory.mktemp("lora") / "serve.log", ["--lora", f"house={ADAPTER}"])
    srv.wait_ready()
    yield srv
    srv.stop()


def complete(c, **body):
    r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0, **body})
    return r


def test_adapter_by_model_name_and_field(lora_srv):
    with httpx.Client(base_url=lora_srv.url, timeout=60, trust_env=False) as c:
        base = complete(c, model=MODEL).json()
        named = complete(c, model=f"{MODEL}:house").json()
        field = complete(c, model=MODEL, adapter="house").json()
        assert named["model"] == field["model"] == f"{MODEL}:house" and base["model"] == MODEL
        assert named["choices"][0]["text"] == field["choices"][0]["text"]
        # The fixture adapter is strong: it changes the greedy answer.
        assert named["choices"][0]["text"] != base["choices"][0]["text"]

        # What the CLI gives with the same adapter, token for token.
        p = subprocess.run([str(BRISE_BIN), "run", MODEL, "--lora", str(ADAPTER), "--raw", PROMPT, "-n", "12",
                            "--temp", "0"], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert p.stdout.rstrip("\n") == named["choices"][0]["text"]

        # Chat too, streaming included.
        msgs = [{"role": "user", "content": "Name a colour."}]
        r = c.post("/v1/chat/completions", json={"model": f"{MODEL}:house", "messages": msgs, "max_tokens": 8,
                                                  "temperature": 0})
        assert r.status_code == 200 and r.json()["model"] == f"{MODEL}:house"
        chunks = []
        with c.stream("POST", "/v1/chat/completions", json={"model": MODEL, "adapter": "house", "messages": msgs,
                                                           "max_tokens": 8, "temperature": 0, "stream": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
        assert {ch["model"] for ch in chunks} == {f"{MODEL}:house"}
        text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
        assert text == r.json()["choices"][0]["message"]["content"]

        # The ledger records the version that answered.
        show = subprocess.run([str(BRISE_BIN), "ledger", "show", named["id"], "--ledger", str(lora_srv.ledger)],
                              capture_output=True, text=True)
        rec = json.loads(show.stdout)
        assert rec["adapter"] == "house" and rec["model"] == MODEL
        show = subprocess.run([str(BRISE_BIN), "ledger", "show", base["id"], "--ledger", str(lora_srv.ledger)],
                              capture_output=True, text=True)
        assert json.loads(show.stdout)["adapter"] is None


def test_unknown_adapters_and_listing(lora_srv):
    with httpx.Client(base_url=lora_srv.url, timeout=60, trust_env=False) as c:
        r = complete(c, model=f"{MODEL}:nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = complete(c, model=MODEL, adapter="nope")
        assert r.status_code == 400 and r.json()["error"]["param"] == "adapter" and "house" in r.json()["error"]["message"]
        r = complete(c, model=f"{MODEL}:house", adapter="other")
        assert r.status_code == 400 and r.json()["error"]["param"] == "adapter"
        models = c.get("/v1/models").json()["data"]
        card = next(m for m in models if m["id"] == f"{MODEL}:house")
        assert card["parent"] == MODEL and card["adapter"] == {"name": "house", "rank": 8}
        assert c.get(f"/v1/models/{MODEL}:house").json()["id"] == f"{MODEL}:house"


def test_bad_lora_flags_are_refused(tmp_path):
    for arg, msg in ((f"house={tmp_path}", "fits none of the models"), ("no-equals", "NAME=DIR"),
                     (f"bad/name={ADAPTER}", "adapter name")):
        p = subprocess.run([str(BRISE_BIN), "serve", MODEL, "--port", "1", "--ledger", "off", "--lora", arg],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and msg in p.stderr, (arg, p.stderr)


def test_compare_base_with_an_adapter(lora_srv):
    """The arena's comparison: the current version against a candidate adapter, blind."""
    msgs = [{"role": "user", "content": "Name a colour."}]
    body = {"model": MODEL, "messages": msgs, "max_tokens": 8, "temperature": 0}
    with httpx.Client(base_url=lora_srv.url, timeout=60, trust_env=False) as c:
        r = c.post("/v1/compare", json={**body, "versions": ["base", "house"]})
        assert r.status_code == 200, r.text
        cands = r.json()["candidates"]
        assert sorted(x["version"] for x in cands) == ["base", "house"]
        # Greedy, so each candidate is what its version answers alone.
        for x in cands:
            model = MODEL if x["version"] == "base" else f"{MODEL}:house"
            alone = c.post("/v1/chat/completions", json={**body, "model": model}).json()
            assert x["message"]["content"] == alone["choices"][0]["message"]["content"], x["version"]
            rec = json.loads(subprocess.run([str(BRISE_BIN), "ledger", "show", x["id"], "--ledger",
                                             str(lora_srv.ledger)], capture_output=True, text=True).stdout)
            assert rec["adapter"] == (None if x["version"] == "base" else "house")
        house = next(x for x in cands if x["version"] == "house")
        base = next(x for x in cands if x["version"] == "base")
        assert c.post("/v1/feedback", json={"preferred": house["id"], "rejected": base["id"]}).status_code == 201

        # Blind: over a few runs, the adapter is not always on the same side.
        sides = {c.post("/v1/compare", json={**body, "versions": ["base", "house"]}).json()["candidates"][0]["version"]
                 for _ in range(20)}
        assert sides == {"base", "house"}

        for bad, param in (({"versions": ["base", "nope"]}, "versions"), ({"versions": ["base"]}, "versions"),
                           ({"versions": "house"}, "versions"), ({"model": f"{MODEL}:house"}, "adapter"),
                           ({"adapter": "house"}, "adapter"), ({}, "temperature")):
            r = c.post("/v1/compare", json={**body, **bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
