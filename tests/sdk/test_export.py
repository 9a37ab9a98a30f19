"""Training exports from the ledger: each format's shape, the feedback → row mapping
(thumbs up → SFT and KTO true; thumbs down → KTO false; correction → SFT with the
correction and a DPO pair; pairwise choice → DPO pair), and opted-out data left out."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import BRISE_BIN, MODEL, BriseServer, user


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """A server with a known set of feedback: (server, {name: completion})."""
    srv = BriseServer(tmp_path_factory.mktemp("export") / "serve.log", [])
    srv.wait_ready()
    import httpx

    c = httpx.Client(base_url=srv.url, timeout=60, trust_env=False)

    def ask(q, seed=None, **headers):
        body = {"model": MODEL, "messages": user(q), "max_tokens": 8, "temperature": 0.8 if seed else 0}
        if seed:
            body["seed"] = seed
        r = c.post("/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 200, r.text
        return r.json()

    def fb(**body):
        r = c.post("/v1/feedback", json=body)
        assert r.status_code == 201, r.text

    done = {
        "up": ask("Name a fruit."),
        "down": ask("Name a planet."),
        "fix": ask("What is 2+2?"),
        "a": ask("Name a color.", seed=1),
        "b": ask("Name a color.", seed=2),
        "optout": ask("Name a city.", **{"X-Brise-Training": "deny"}),
        "star5": ask("Name a bird."),
        "star3": ask("Name a tree."),
        "comp": c.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 4}).json(),
    }
    fb(completion_id=done["up"]["id"], rating=1)
    fb(completion_id=done["down"]["id"], rating=-1)
    fb(completion_id=done["fix"]["id"], rating=-1, correction="2+2 is 4.")
    fb(preferred=done["b"]["id"], rejected=done["a"]["id"])
    fb(completion_id=done["optout"]["id"], rating=1)
    fb(completion_id=done["star5"]["id"], rating=5)
    fb(completion_id=done["star3"]["id"], rating=3)
    fb(completion_id=done["comp"]["id"], rating=1)
    c.close()
    yield srv, done
    srv.stop()


def export(srv, fmt, tmp_path, *extra):
    out = tmp_path / f"{fmt}.jsonl"
    p = subprocess.run([str(BRISE_BIN), "export", "--format", fmt, "--out", str(out), "--ledger", str(srv.ledger), *extra],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return rows, json.loads(p.stdout)


def text(done, k):
    return done[k]["choices"][0]["message"]["content"]


def test_sft(fed, tmp_path):
    srv, done = fed
    for fmt in ("openai-sft", "mistral-sft", "trl-sft"):
        rows, rep = export(srv, fmt, tmp_path)
        answers = [r["messages"][-1]["content"] for r in rows]
        # thumbs up, the correction, and 5 stars; not the opted-out one. Rows come in
        # feedback time order, and items given within one millisecond in id order: so
        # compare as sets.
        assert sorted(answers) == sorted([text(done, "up"), "2+2 is 4.", text(done, "star5")]), fmt
        for r in rows:
            assert r["messages"][-1]["role"] == "assistant" and r["messages"][0]["role"] == "user"
        fixed = [r for r in rows if r["messages"][-1]["content"] == "2+2 is 4."]
        assert fixed[0]["messages"][:-1] == user("What is 2+2?")
        assert rep["skipped_no_consent"] == 1 and rep["skipped_not_chat"] == 1
        assert rep["rows"] == 3


def test_dpo(fed, tmp_path):
    srv, done = fed
    rows, _ = export(srv, "trl-dpo", tmp_path)
    assert sorted((r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows) == sorted([
        ("2+2 is 4.", text(done, "fix")), (text(done, "b"), text(done, "a"))])
    fixed = [r for r in rows if r["chosen"][0]["content"] == "2+2 is 4."]
    assert fixed[0]["prompt"] == user("What is 2+2?")
    rows, _ = export(srv, "openai-dpo", tmp_path)
    color = [r for r in rows if r["input"]["messages"] == user("Name a color.")]
    assert len(color) == 1
    assert color[0]["preferred_output"] == [{"role": "assistant", "content": text(done, "b")}]
    assert color[0]["non_preferred_output"] == [{"role": "assistant", "content": text(done, "a")}]


def test_kto(fed, tmp_path):
    srv, done = fed
    rows, _ = export(srv, "trl-kto", tmp_path)
    got = [(r["completion"][0]["content"], r["label"]) for r in rows]
    # The corrected answer was a thumbs down too: its original is a KTO negative.
    assert sorted(got) == sorted([(text(done, "up"), True), (text(done, "down"), False),
                                  (text(done, "fix"), False), (text(done, "star5"), True)])


def test_filters_and_errors(fed, tmp_path):
    srv, _ = fed
    rows, rep = export(srv, "trl-sft", tmp_path, "--model", "other-model")
    assert rows == [] and rep["feedback_seen"] == 0
    rows, _ = export(srv, "trl-sft", tmp_path, "--since", "2099-01-01")
    assert rows == []
    p = subprocess.run([str(BRISE_BIN), "export", "--format", "csv", "--out", str(tmp_path / "x"),
                        "--ledger", str(srv.ledger)], capture_output=True, text=True)
    assert p.returncode != 0 and "openai-sft" in p.stderr
