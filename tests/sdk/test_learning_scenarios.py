"""Learning by default (issue 18): the loop a new user runs, with no tuning flags.

For each scenario of scenarios.py: `brise serve PATH` (the model given by file path,
every flag at its default), users ask the train questions and correct each answer
(`POST /v1/feedback`, thumbs-down with a correction), then `brise train --from-ledger
--model PATH` with no other flag. The version must pass the gate and be promoted, the
running server must pick it up, and on held-out questions never trained on the share of
temperature-0 answers that follow the scenario's rule must go from at most 20% to at
least 80%, with general perplexity at most +5% and the gate's report showing the
answers it compared.

Also: noise (each correction is another question's answer) gives a version the gate
refuses, and nothing is promoted; `brise train --from-ledger` with no --model finds a
model served by path, and one served from a Hugging Face directory.
"""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest

import scenarios as S
from conftest import IS_SMOLLM2

pytestmark = pytest.mark.skipif(not IS_SMOLLM2, reason="the scenarios' bounds are for SmolLM2-135M")

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """The model as a user has it: a file in a folder of their own (not brise's models
    directory), given by path."""
    src = S.default_home() / "models" / MODEL_FILE
    if not src.is_file():
        pytest.fail(f"{src} is missing: run `brise pull smollm2:135m` (scripts/test.sh does)")
    dst = tmp_path_factory.mktemp("downloads") / MODEL_FILE
    shutil.copyfile(src, dst)
    return dst


@pytest.mark.parametrize("name", S.CI_SCENARIOS)
def test_feedback_changes_the_answers(name, model_path, tmp_path):
    sc = S.SCENARIOS[name]
    srv = S.Server(tmp_path / "home", str(model_path))
    t0 = time.monotonic()
    try:
        with httpx.Client(timeout=300, trust_env=False) as c:
            before, _ = S.share(c, srv, srv.id, sc.held_out, sc.rule)
            assert before <= 0.2, f"{name}: the base model already does it ({before:.0%})"
            S.give_feedback(c, srv, sc)
            t = S.train(srv, str(model_path))
            rep = S.report(srv.home, t["version"])
            assert t["promoted"], f"{name}: not promoted: {rep['summary']}\n{t['stdout'][-3000:]}"
            S.wait_serving(c, srv, t["version"])
            after, answers = S.share(c, srv, srv.id, sc.held_out, sc.rule)
            ppl0, ppl1 = rep["current"]["metrics"]["ppl"], rep["candidate"]["metrics"]["ppl"]
            beh = rep["behaviour"]
            print(f"{name}: {before:.0%} -> {after:.0%} of held-out answers follow the rule; "
                  f"gate chrF {beh['current_chrf']:.1f} -> {beh['candidate_chrf']:.1f}, "
                  f"perplexity {ppl0:.3f} -> {ppl1:.3f}; {time.monotonic() - t0:.0f} s")
            assert after >= 0.8, f"{name}: {after:.0%} follow the rule after learning: {answers}"
            assert ppl1 <= 1.05 * ppl0, f"{name}: perplexity {ppl0} -> {ppl1}"
            # The report shows what changed, answers side by side.
            assert beh["samples"] and all(s["candidate"] and s["current"] for s in beh["samples"])
            assert any(ch["metric"] == "chrf" and ch["outcome"] == "pass" for ch in rep["checks"])
            assert "Answers on held-out prompts" in t["stdout"]
            # Corrections are demonstrations: trained as SFT, with data-fitted defaults.
            assert "sft examples" in t["stderr"], t["stderr"][-2000:]
    finally:
        srv.stop()


def test_noise_is_refused(model_path, tmp_path):
    sc = S.SCENARIOS["signature"]
    srv = S.Server(tmp_path / "home", str(model_path))
    try:
        with httpx.Client(timeout=300, trust_env=False) as c:
            base = [S.ask(c, srv.url, srv.id, q, 60)["choices"][0]["message"]["content"] for q in sc.train]
            S.give_feedback(c, srv, sc, S.noise(base))
            t = S.train(srv, str(model_path))
            rep = S.report(srv.home, t["version"])
            assert not rep["passed"] and not t["promoted"], f"noise was promoted: {rep['summary']}"
            cards = c.get(f"{srv.url}/v1/models").json()["data"]
            assert all(m.get("current_version") is None for m in cards)
            print(f"noise: refused: {rep['summary']}")
    finally:
        srv.stop()


def test_train_finds_a_model_served_by_path(model_path, tmp_path):
    """No --model at all: the ledger says which file answered."""
    sc = S.SCENARIOS["signature"]
    home = tmp_path / "home"
    srv = S.Server(home, str(model_path))
    try:
        with httpx.Client(timeout=300, trust_env=False) as c:
            S.give_feedback(c, srv, S.Scenario(sc.name, sc.what, sc.train[:12], [], sc.correct, sc.rule))
        p = subprocess.run([str(S.BRISE_BIN), "train", "--from-ledger", "--no-promote", "--max-steps", "2"],
                           env=srv.env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "of SmolLM2-135M-Instruct.Q4_1" in p.stderr, p.stderr[-2000:]
        # Moved: the error names the old path and says what to pass.
        moved = model_path.with_name("elsewhere.gguf")
        model_path.rename(moved)
        try:
            p = subprocess.run([str(S.BRISE_BIN), "train", "--from-ledger", "--no-promote", "--max-steps", "2"],
                               env=srv.env, capture_output=True, text=True, timeout=900)
            assert p.returncode != 0
            assert str(model_path) in p.stderr and "pass --model" in p.stderr, p.stderr
            # Given the new path, it is recognised by its sha256.
            p = subprocess.run([str(S.BRISE_BIN), "train", "--from-ledger", "--no-promote", "--max-steps", "2",
                                "--model", str(moved)],
                               env=srv.env, capture_output=True, text=True, timeout=900)
            assert p.returncode == 0, p.stderr[-3000:]
            assert "of SmolLM2-135M-Instruct.Q4_1" in p.stderr, p.stderr[-2000:]
        finally:
            moved.rename(model_path)
    finally:
        srv.stop()


def test_the_loop_closes_for_a_hugging_face_directory(tmp_path):
    """Served from a Hugging Face directory (config.json + safetensors + tokenizer):
    trained from its ledger with no --model, registered under its id with the gate's
    report, and answered with by the running server by version id. (The model is tiny
    and random: whether the gate passes it is not the point here.)"""
    hf = tmp_path / "my-model"
    shutil.copytree(S.REPO / "tests" / "fixtures" / "tiny-mistral" / "hf", hf)
    srv = S.Server(tmp_path / "home", str(hf))
    try:
        assert srv.id == "my-model"
        with httpx.Client(timeout=300, trust_env=False) as c:
            for q in ["Hello", "How are you?", "What is this?", "Tell me more.", "Why?", "Where?"]:
                done = S.ask(c, srv.url, srv.id, q, 8)
                r = c.post(f"{srv.url}/v1/feedback",
                           json={"completion_id": done["id"], "rating": -1, "correction": f"Fine: {q}"})
                r.raise_for_status()
            p = subprocess.run([str(S.BRISE_BIN), "train", "--from-ledger", "--max-steps", "3"],
                               env=srv.env, capture_output=True, text=True, timeout=600)
            assert p.returncode == 0, p.stderr[-3000:]
            assert "of my-model" in p.stderr, p.stderr[-2000:]
            version = next(l.split()[1] for l in p.stderr.splitlines() if l.startswith("version "))
            rep = S.report(srv.home, version)
            assert rep["behaviour"]["samples"], rep
            r = c.post(f"{srv.url}/v1/chat/completions", json={
                "model": f"{srv.id}:{version}", "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text
            if rep["passed"]:
                S.wait_serving(c, srv, version)
    finally:
        srv.stop()
