"""The ledger: every completion is recorded before its client has the whole answer,
feedback attaches to it (thumbs, ratings, corrections, pairwise choices), tenants see
only their own, and a kill -9 loses no answered request."""

from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import subprocess
import threading
import time

import httpx
import openai
import pytest

from conftest import BRISE_BIN, MODEL, BriseServer, serve, user


def show(ledger, cid: str) -> tuple[int, dict | None]:
    p = subprocess.run([str(BRISE_BIN), "ledger", "show", cid, "--ledger", str(ledger)],
                       capture_output=True, text=True, timeout=30)
    return p.returncode, (json.loads(p.stdout) if p.returncode == 0 else None)


def test_chat_is_recorded(brise, oai):
    r = oai.chat.completions.create(model=MODEL, messages=user("Say hello."), temperature=0, max_tokens=8,
                                    user="alice", extra_headers={"X-Brise-Training": "deny"})
    rc, rec = show(brise.ledger, r.id)
    assert rc == 0, "the answered completion is not in the ledger"
    assert rec["id"] == r.id and rec["tenant"] == "default" and rec["subject"] == "alice"
    assert rec["model"] == MODEL and rec["endpoint"] == "/v1/chat/completions"
    assert rec["messages"] == user("Say hello.")
    assert rec["params"]["max_tokens"] == 8 and "messages" not in rec["params"]
    assert rec["output"][0]["text"] == r.choices[0].message.content
    assert rec["output"][0]["finish_reason"] == r.choices[0].finish_reason
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (r.usage.prompt_tokens, r.usage.completion_tokens)
    assert rec["training_consent"] is False and rec["status"] == "ok"
    assert rec["model_sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53" or MODEL != "smollm2:135m"
    assert rec["feedback"] == []
    assert show(brise.ledger, "chatcmpl-nope")[0] != 0


def test_stream_and_completions_are_recorded(brise, oai):
    chunks = list(oai.chat.completions.create(model=MODEL, messages=user("Count to three."), temperature=0,
                                              max_tokens=10, stream=True,
                                              extra_body={"metadata": {"subject": "bob"}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # The stream has ended, so its record is committed.
    rc, rec = show(brise.ledger, chunks[0].id)
    assert rc == 0 and rec["output"][0]["text"] == text and rec["subject"] == "bob"
    assert rec["training_consent"] is True
    c = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, n=2)
    rc, rec = show(brise.ledger, c.id)
    assert rc == 0 and rec["endpoint"] == "/v1/completions"
    assert rec["messages"] == {"prompt": "The capital of France is"}
    assert [o["text"] for o in rec["output"]] == [ch.text for ch in c.choices]


def test_feedback(brise, oai, http):
    r = oai.chat.completions.create(model=MODEL, messages=user("What is 2+2?"), temperature=0, max_tokens=12)
    fb = http.post("/v1/feedback", json={"completion_id": r.id, "rating": -1, "correction": "4.",
                                         "comment": "too long", "tags": ["math"]})
    assert fb.status_code == 201, fb.text
    body = fb.json()
    assert body["id"].startswith("fb-") and body["rating"] == -1 and body["correction"] == "4."
    up = http.post("/v1/feedback", json={"completion_id": r.id, "rating": 5})
    assert up.status_code == 201
    listed = http.get("/v1/feedback", params={"completion_id": r.id}).json()["data"]
    assert [f["id"] for f in listed] == [body["id"], up.json()["id"]]
    rc, rec = show(brise.ledger, r.id)
    assert rc == 0 and rec["feedback"][0]["correction"] == "4." and rec["feedback"][0]["tags"] == ["math"]
    for bad, param in [({"completion_id": r.id, "rating": 7}, "rating"),
                       ({"completion_id": r.id, "rating": 0}, "rating"),
                       ({"completion_id": r.id}, "rating"),
                       ({"completion_id": r.id, "rating": 1, "stars": 3}, "stars"),
                       ({"rating": 1}, "completion_id"),
                       ({"preferred": r.id}, "rejected")]:
        e = http.post("/v1/feedback", json=bad)
        assert e.status_code == 400 and e.json()["error"]["param"] == param, (bad, e.text)
    e = http.post("/v1/feedback", json={"completion_id": "chatcmpl-unknown", "rating": 1})
    assert e.status_code == 404 and e.json()["error"]["code"] == "completion_not_found"
    assert http.get("/v1/feedback", params={"completion_id": "chatcmpl-unknown"}).status_code == 404


def test_pairwise_choice(brise, oai, http):
    a = oai.chat.completions.create(model=MODEL, messages=user("Name a color."), temperature=1.0, seed=1, max_tokens=6)
    b = oai.chat.completions.create(model=MODEL, messages=user("Name a color."), temperature=1.0, seed=2, max_tokens=6)
    fb = http.post("/v1/feedback", json={"preferred": b.id, "rejected": a.id})
    assert fb.status_code == 201 and fb.json()["kind"] == "preference"
    for cid in (a.id, b.id):
        data = http.get("/v1/feedback", params={"completion_id": cid}).json()["data"]
        assert [f["id"] for f in data] == [fb.json()["id"]]
    assert http.post("/v1/feedback", json={"preferred": a.id, "rejected": a.id}).status_code == 400


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    srv = serve(tmp_path_factory, "tenants", ["--api-key", "acme=key-a", "--api-key", "beta=key-b"])
    yield srv
    srv.stop()


def test_tenant_isolation(tenants):
    def client(key):
        return httpx.Client(base_url=tenants.url, timeout=60, trust_env=False, headers={"Authorization": f"Bearer {key}"})

    with client("key-a") as a, client("key-b") as b:
        r = a.post("/v1/chat/completions", json={"model": MODEL, "messages": user("Hi"), "max_tokens": 4}).json()
        rb = b.post("/v1/chat/completions", json={"model": MODEL, "messages": user("Hi"), "max_tokens": 4}).json()
        # Another tenant can neither rate nor read it, nor pair it with its own.
        assert b.post("/v1/feedback", json={"completion_id": r["id"], "rating": 1}).status_code == 404
        assert b.get("/v1/feedback", params={"completion_id": r["id"]}).status_code == 404
        assert b.post("/v1/feedback", json={"preferred": rb["id"], "rejected": r["id"]}).status_code == 404
        assert a.post("/v1/feedback", json={"completion_id": r["id"], "rating": 1}).status_code == 201
        assert len(a.get("/v1/feedback", params={"completion_id": r["id"]}).json()["data"]) == 1
    rc, rec = show(tenants.ledger, r["id"])
    assert rc == 0 and rec["tenant"] == "acme"
    assert show(tenants.ledger, rb["id"])[1]["tenant"] == "beta"


def test_kill_9_loses_no_answered_request(tmp_path_factory):
    srv = BriseServer(tmp_path_factory.mktemp("kill") / "serve.log", [],
                      ["-t", "2", "--parallel", "8", "-c", "8192"])
    srv.wait_ready()
    got: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(i):
        with httpx.Client(base_url=srv.url, timeout=30, trust_env=False) as c:
            k = 0
            while not stop.is_set() and k < 200:
                k += 1
                try:
                    r = c.post("/v1/chat/completions", json={
                        "model": MODEL, "messages": user(f"Tell me about {i}-{k}."), "max_tokens": 6, "temperature": 0.5,
                        "seed": k})
                except httpx.TransportError:
                    return
                if r.status_code == 200:
                    with lock:
                        got.append(r.json()["id"])

    with cf.ThreadPoolExecutor(16) as ex:
        fs = [ex.submit(client, i) for i in range(16)]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with lock:
                if len(got) >= 40:
                    break
            time.sleep(0.05)
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait()
        stop.set()
        for f in fs:
            f.result()
    srv.kill()
    assert len(got) >= 40
    have = {row[0] for row in srv.sql("SELECT id FROM completions")}
    missing = [i for i in got if i not in have]
    assert not missing, f"{len(missing)} of {len(got)} answered completions are not in the ledger"


def test_compare_then_choose(brise, http):
    body = {"model": MODEL, "messages": user("Write one line about the sea."), "max_tokens": 12, "temperature": 1.0}
    r = http.post("/v1/compare", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["x-brise-ai-generated"] == "true"
    cands = r.json()["candidates"]
    assert len(cands) == 2 and cands[0]["id"] != cands[1]["id"]
    assert cands[0]["message"]["content"] != cands[1]["message"]["content"]
    for c in cands:
        rc, rec = show(brise.ledger, c["id"])
        assert rc == 0 and rec["endpoint"] == "/v1/compare"
        assert rec["output"][0]["text"] == c["message"]["content"]
    fb = http.post("/v1/feedback", json={"preferred": cands[1]["id"], "rejected": cands[0]["id"]})
    assert fb.status_code == 201
    assert show(brise.ledger, cands[0]["id"])[1]["feedback"][0]["rejected_id"] == cands[0]["id"]
    # Greedy candidates would be identical: refused.
    e = http.post("/v1/compare", json={**body, "temperature": 0})
    assert e.status_code == 400 and e.json()["error"]["param"] == "temperature"
    e = http.post("/v1/compare", json={**body, "stream": True})
    assert e.status_code == 400 and e.json()["error"]["param"] == "stream"
    e = http.post("/v1/compare", json={**body, "logprobs": True})
    assert e.status_code == 400 and e.json()["error"]["param"] == "logprobs"


def test_absurd_max_tokens_is_400_not_truncation(http):
    e = http.post("/v1/chat/completions", json={"model": MODEL, "messages": user("Hi"), "max_tokens": 2**64 - 1})
    assert e.status_code == 400 and e.json()["error"]["param"] == "max_tokens", e.text


def test_disconnected_stream_is_recorded_as_cancelled(brise):
    """A client that leaves mid-stream used the model: its record says what it was sent."""
    body = {"model": MODEL, "messages": user("Tell me a long story about a lighthouse keeper."),
            "max_tokens": 400, "temperature": 0, "stream": True}
    got, cid = "", None
    with httpx.Client(base_url=brise.url, timeout=60, trust_env=False) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                ev = json.loads(line[6:])
                cid = ev["id"]
                got += ev["choices"][0]["delta"].get("content") or ""
                if len(got) > 20:
                    break  # leaving the block closes the connection
    deadline = time.monotonic() + 20
    while True:
        rc, rec = show(brise.ledger, cid)
        if rc == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert rc == 0, "the disconnected stream left no record"
    assert rec["status"] == "cancelled" and "disconnected" in rec["error"]
    out = rec["output"][0]
    assert out["finish_reason"] is None
    # It holds at least what the client read, and stops well short of max_tokens.
    assert out["text"].startswith(got) and rec["completion_tokens"] < 400
