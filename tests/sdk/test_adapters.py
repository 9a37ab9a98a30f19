"""The adapter registry and hot swap: `brise adapters register|promote|rollback` (and the
admin API) change what a running `brise serve` answers for the plain model name, within
its --adapter-poll; a stream started before a promotion finishes on the version it
started with; `MODEL:base` is always the bare model; the ledger records which version
answered; a version that does not load leaves the previous one serving; and erasing a
subject marks the versions trained on their records."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import httpx
import pytest

from conftest import BRISE_BIN, FIXTURES, IS_SMOLLM2, LEDGER_BACKEND, MODEL, BriseServer

pytestmark = pytest.mark.skipif(not IS_SMOLLM2, reason="the adapter fixture is for SmolLM2")

ADAPTER = FIXTURES / "lora" / "smollm2-r8"
ADMIN = "admin-adapters"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
PROMPT = "The capital of France is"
POLL = 0.5
# Long enough that the stream started before a promotion is still generating when the
# swap has happened (min_tokens keeps the model from ending early).
STREAM_TOKENS = 700


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = BriseServer(tmp_path_factory.mktemp("adapters") / "serve.log",
                    ["--admin-key", ADMIN, "--adapter-poll", str(POLL)])
    s.wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def c(srv):
    with httpx.Client(base_url=srv.url, timeout=120, trust_env=False) as client:
        yield client


def cli(srv, *args, check=True):
    p = subprocess.run([str(BRISE_BIN), *args, "--ledger", str(srv.ledger)], capture_output=True, text=True,
                       timeout=120)
    if check:
        assert p.returncode == 0, f"brise {' '.join(args)}: {p.stderr}"
    return p


def register(srv, *extra, path=ADAPTER):
    p = cli(srv, "adapters", "register", "--model", MODEL, "--path", str(path), "--method", "sft", *extra)
    vid = p.stdout.strip()
    assert vid.startswith("smollm2-135m-v"), p.stdout
    return vid


def show(srv, vid):
    return json.loads(cli(srv, "adapters", "show", vid, "--json").stdout)


def complete(c, model, **kw):
    r = c.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    j = r.json()
    return j["model"], j["choices"][0]["text"], j["id"]


def wait_for(c, want_model, timeout=20.0):
    """Polls the plain model name until its answers come from `want_model`; returns the
    time that happened (ms since the epoch)."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = complete(c, MODEL)
        if seen[0] == want_model:
            return time.time() * 1000
        time.sleep(0.1)
    pytest.fail(f"the plain name still answers as {seen[0]!r} after {timeout} s, not {want_model!r}")


@pytest.fixture(scope="module")
def lora_text():
    """What the fixture adapter answers, from `brise run --lora` (no server involved)."""
    p = subprocess.run([str(BRISE_BIN), "run", MODEL, "--lora", str(ADAPTER), "--raw", PROMPT, "-n", "12", "--temp", "0"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout.rstrip("\n")


def ledger_adapter(srv, cid):
    return json.loads(cli(srv, "ledger", "show", cid).stdout)["adapter"]


def test_promote_swaps_the_plain_name_and_rollback_returns(srv, c, lora_text):
    base_model, base_text, base_id = complete(c, MODEL)
    assert base_model == MODEL
    assert complete(c, f"{MODEL}:base")[1] == base_text
    assert lora_text != base_text, "the fixture adapter changes the greedy answer"
    assert c.get("/v1/models").json()["data"][0]["current_version"] is None

    vid = register(srv, "--dataset-sha256", "ab" * 32, "--eval-report", '{"passed": true, "nll": {"delta": -0.2}}')
    listed = json.loads(cli(srv, "adapters", "list", "--model", "smollm2", "--json").stdout)
    assert [(v["id"], v["status"]) for v in listed] == [(vid, "candidate")]
    # A candidate is served by its id (loaded on first use, listed with its status),
    # and the plain name still serves the base.
    cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert cards[f"{MODEL}:{vid}"]["adapter"]["status"] == "candidate"
    assert complete(c, f"{MODEL}:{vid}")[:2] == (f"{MODEL}:{vid}", lora_text)
    assert complete(c, MODEL)[1] == base_text

    # A stream on the plain name, started before the promotion.
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": STREAM_TOKENS, "min_tokens": STREAM_TOKENS,
            "temperature": 0, "stream": True}
    with c.stream("POST", "/v1/completions", json=body) as s:
        lines = s.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))
        chunks = [json.loads(first[6:])]

        p = cli(srv, "adapters", "promote", vid, "--actor", "tester")
        assert "promoted" in p.stderr
        swapped_ms = wait_for(c, f"{MODEL}:{vid}")

        for line in lines:
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
    # It finished on the version it started with: the base, token for token.
    assert {ch["model"] for ch in chunks} == {MODEL}
    streamed = "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"])
    want = c.post("/v1/completions", json={**body, "model": f"{MODEL}:base", "stream": False}).json()
    assert streamed == want["choices"][0]["text"]
    rec = json.loads(cli(srv, "ledger", "show", chunks[0]["id"]).stdout)
    assert rec["adapter"] is None and rec["completion_tokens"] == STREAM_TOKENS
    # ... and it really was still generating when the swap had happened.
    assert rec["created_at_ms"] + rec["latency_ms"] > swapped_ms, "the stream ended before the swap: make it longer"

    # The plain name now answers with the adapter, as `brise run --lora` does; the base
    # stays addressable; the ledger records the version id.
    model, text, cid = complete(c, MODEL)
    assert (model, text) == (f"{MODEL}:{vid}", lora_text)
    assert complete(c, f"{MODEL}:{vid}")[1] == lora_text
    assert complete(c, MODEL, adapter=vid)[1] == lora_text
    assert complete(c, f"{MODEL}:base")[1] == base_text
    assert complete(c, MODEL, adapter="base")[1] == base_text
    assert ledger_adapter(srv, cid) == vid and ledger_adapter(srv, base_id) is None
    chat = c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                               "max_tokens": 4, "temperature": 0})
    assert chat.json()["model"] == f"{MODEL}:{vid}"

    cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert cards[MODEL]["current_version"] == vid
    card = cards[f"{MODEL}:{vid}"]
    assert card["parent"] == MODEL
    assert card["adapter"] | {"promoted_at": None} == {"name": vid, "rank": 8, "version": 1, "parent": None,
                                                       "method": "sft", "status": "promoted", "tainted": False,
                                                       "promoted_at": None}
    assert c.get(f"/v1/models/{MODEL}:{vid}").json()["adapter"]["name"] == vid

    v = show(srv, vid)
    assert (v["status"], v["promoted_by"], v["dataset_sha256"]) == ("promoted", "tester", "ab" * 32)
    assert v["eval_report"] == {"passed": True, "nll": {"delta": -0.2}}
    text_show = cli(srv, "adapters", "show", vid).stdout
    assert "promoted by tester" in text_show and "nll.delta: -0.2" in text_show and f"{vid} (promoted) <- base" in text_show

    # The admin API lists the registry.
    assert c.get("/v1/admin/adapters").status_code == 401
    data = c.get("/v1/admin/adapters", params={"model": MODEL}, headers=AUTH).json()["data"]
    assert [(x["id"], x["status"]) for x in data] == [(vid, "promoted")]
    one = c.get(f"/v1/admin/adapters/{vid}", headers=AUTH).json()
    assert one["lineage"] == [vid] and [h["action"] for h in one["history"]] == ["promote"]

    # Rollback (CLI) goes back to the base; the version, retired, stays addressable by id.
    p = cli(srv, "adapters", "rollback", "--model", "smollm2", "--json")
    assert json.loads(p.stdout)["to"] is None
    wait_for(c, MODEL)
    assert complete(c, MODEL)[1] == base_text
    cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert cards[f"{MODEL}:{vid}"]["adapter"]["status"] == "retired"
    assert complete(c, f"{MODEL}:{vid}")[:2] == (f"{MODEL}:{vid}", lora_text)
    r = c.post("/v1/completions", json={"model": f"{MODEL}:smollm2-135m-v99", "prompt": PROMPT, "max_tokens": 4})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert cli(srv, "adapters", "rollback", "--model", MODEL, check=False).returncode == 1

    # Through the admin API, the swap is done when the answer comes: no waiting.
    r = c.post(f"/v1/admin/adapters/{vid}/promote", headers=AUTH)
    assert r.status_code == 200 and r.json()["serving"] == vid, r.text
    assert complete(c, MODEL)[:2] == (f"{MODEL}:{vid}", lora_text)
    r = c.post("/v1/admin/adapters/rollback", json={"model": MODEL}, headers=AUTH)
    assert r.status_code == 200 and r.json()["serving"] == "base" and r.json()["from"] == vid, r.text
    assert complete(c, MODEL)[:2] == (MODEL, base_text)
    r = c.post("/v1/admin/adapters/rollback", json={"model": MODEL}, headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_refused"
    r = c.post("/v1/admin/adapters/nope/promote", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"

    # Every promotion and rollback is in the audit log, whose chain holds.
    audit = c.get("/v1/admin/audit", headers=AUTH).json()
    actions = [e["action"] for e in audit["data"] if e["action"].startswith("adapter_")]
    assert actions == ["adapter_register", "adapter_promote", "adapter_rollback", "adapter_promote",
                       "adapter_rollback"]
    assert audit["chain_intact"]


def test_a_version_that_does_not_load_leaves_the_previous_one(srv, c, tmp_path, lora_text):
    good = next(v["id"] for v in json.loads(cli(srv, "adapters", "list", "--json").stdout))
    broken = tmp_path / "broken"
    shutil.copytree(ADAPTER, broken)
    vid = register(srv, path=broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")

    # The CLI and the admin API refuse to promote it...
    p = cli(srv, "adapters", "promote", vid, check=False)
    assert p.returncode == 1 and "not promoted" in p.stderr
    r = c.post(f"/v1/admin/adapters/{vid}/promote", headers=AUTH)
    assert r.status_code == 409 and "does not load" in r.json()["error"]["message"]
    assert show(srv, vid)["status"] == "candidate"

    # ...and when it is promoted anyway, the server keeps what it served, and says why.
    r = c.post(f"/v1/admin/adapters/{good}/promote", headers=AUTH)
    assert r.status_code == 200 and r.json()["serving"] == good
    cli(srv, "adapters", "promote", vid, "--no-check")
    time.sleep(POLL * 4)
    assert complete(c, MODEL)[:2] == (f"{MODEL}:{good}", lora_text)
    assert c.get("/health").status_code == 200
    assert f"cannot load promoted version {vid}" in srv.log_path.read_text()
    # Rolling back the broken one re-promotes the good one, which was never replaced.
    assert json.loads(cli(srv, "adapters", "rollback", "--model", MODEL, "--json").stdout)["to"] == good
    time.sleep(POLL * 2)
    assert complete(c, MODEL)[:2] == (f"{MODEL}:{good}", lora_text)
    r = c.post("/v1/admin/adapters/rollback", json={"model": MODEL}, headers=AUTH)
    assert r.status_code == 200 and r.json()["serving"] == "base"
    r = c.post(f"/v1/admin/adapters/{vid}/reject", json={"reason": "broken file"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "rejected"
    # By id it says why it cannot serve it, and does not try again on every request.
    body = {"model": f"{MODEL}:{vid}", "prompt": PROMPT, "max_tokens": 2}
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 500 and f"cannot load version {vid}" in r.json()["error"]["message"]
    # Issue 21: without the server's paths (they are in its log).
    assert str(tmp_path) not in r.text and "safetensors" not in r.text, r.text
    assert f"cannot load version {vid} from {broken}" in srv.log_path.read_text()
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 500 and "it is retried 30 s after a failure" in r.json()["error"]["message"]
    assert str(tmp_path) not in r.text and "safetensors" not in r.text, r.text


def test_erasure_marks_versions_trained_on_erased_records(srv, c):
    def ask(content, subject):
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": content}],
                                                 "max_tokens": 6, "temperature": 0},
                   headers={"X-Brise-Subject": subject})
        assert r.status_code == 200, r.text
        return r.json()["id"]

    erin = [ask("I like tea.", "erin"), ask("I like coffee.", "erin")]
    finn = ask("I like water.", "finn")
    fb = c.post("/v1/feedback", json={"completion_id": finn, "rating": 1})
    assert fb.status_code == 201
    first = next(v["id"] for v in json.loads(cli(srv, "adapters", "list", "--json").stdout))
    clean = register(srv, "--record", finn, "--feedback", fb.json()["id"], "--parent", first)
    tainted = register(srv, "--record", ",".join([finn, *erin]), "--parent", clean)
    v = show(srv, tainted)
    assert (v["records"], v["feedback"], sorted(v["record_ids"])) == (3, 0, sorted([finn, *erin]))
    assert [x["id"] for x in v["lineage"]] == [tainted, clean, first]

    cli(srv, "adapters", "promote", tainted)
    wait_for(c, f"{MODEL}:{tainted}")

    # Erasing Erin marks the version trained on her records, loudly, since it serves.
    p = cli(srv, "erase", "--subject", "erin")
    receipt = json.loads(p.stdout)
    assert receipt["completions_erased"] == 2
    assert receipt["adapters_tainted"] == [{"id": tainted, "model": MODEL, "status": "promoted"}]
    assert f"WARNING: {tainted} IS SERVING" in p.stderr
    v = show(srv, tainted)
    assert receipt["receipt_id"] in v["tainted"]["reason"]
    assert show(srv, clean)["tainted"] is None
    assert "YES" in cli(srv, "adapters", "show", tainted).stdout

    # It keeps serving (an operator decides), and its card says it is tainted.
    deadline = time.monotonic() + 10
    while True:
        card = next(m for m in c.get("/v1/models").json()["data"] if m["id"] == f"{MODEL}:{tainted}")
        if card["adapter"]["tainted"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert card["adapter"]["tainted"] is True
    assert complete(c, MODEL)[0] == f"{MODEL}:{tainted}"
    assert "trained on erased data" in srv.log_path.read_text()

    # A tainted version is never promoted again: rolled back, it stays out.
    r = c.post("/v1/admin/adapters/rollback", json={"model": MODEL}, headers=AUTH)
    assert r.status_code == 200 and r.json()["serving"] == "base", r.text
    p = cli(srv, "adapters", "promote", tainted, check=False)
    assert p.returncode == 1 and "erased data" in p.stderr
    r = c.post(f"/v1/admin/adapters/{tainted}/promote", headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_refused"
    # The clean one can be.
    r = c.post(f"/v1/admin/adapters/{clean}/promote", headers=AUTH)
    assert r.status_code == 200 and r.json()["serving"] == clean

    # Through the admin API too: erasing Finn taints the clean one (his record and feedback).
    r = c.post("/v1/admin/erase", json={"subject": "finn"}, headers=AUTH)
    assert r.status_code == 200
    got = sorted((x["id"], x["status"]) for x in r.json()["adapters_tainted"])
    assert got == sorted([(clean, "promoted"), (tainted, "retired")])
    assert show(srv, first)["tainted"] is None
    r = c.post("/v1/admin/adapters/rollback", json={"model": MODEL}, headers=AUTH)
    assert r.status_code == 200


@pytest.mark.skipif(LEDGER_BACKEND != "sqlite", reason="shares the first server's SQLite file")
def test_servers_sharing_a_ledger_follow_it_and_start_on_the_promoted_version(srv, c, lora_text):
    good = next(v["id"] for v in json.loads(cli(srv, "adapters", "list", "--json").stdout) if v["tainted"] is None)
    cli(srv, "adapters", "promote", good)
    wait_for(c, f"{MODEL}:{good}")
    # A second server on the same ledger (its log next to the first's: the same file)
    # answers with the promoted version from its very first request.
    s2 = BriseServer(srv.log_path.parent / "serve2.log", ["--adapter-poll", str(POLL)])
    assert s2.ledger == srv.ledger
    try:
        s2.wait_ready()
        with httpx.Client(base_url=s2.url, timeout=120, trust_env=False) as c2:
            assert complete(c2, MODEL)[:2] == (f"{MODEL}:{good}", lora_text)
            # A rollback through the first server's admin API reaches the second by its poll.
            r = c.post("/v1/admin/adapters/rollback", json={"model": MODEL}, headers=AUTH)
            assert r.status_code == 200 and r.json()["serving"] == "base"
            wait_for(c2, MODEL)
    finally:
        s2.stop()
