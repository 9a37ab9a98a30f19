"""The learning loop end to end, through the public API only (issue 6's scenario).

Users ask questions and give thumbs-down with corrections in one consistent house style
(a fixed opening phrase and a fixed sign-off). `brise serve --learn` trains an adapter
from the ledger once enough feedback has arrived, the evaluation gate (held-out NLL,
perplexity on the general text within 5%) promotes it, and the server swaps it in. On
held-out questions, never trained on, the share of temperature-0 answers in the house
style must go from about 0 to at least 80%, with the general text's perplexity up at
most 5% (read from the promoted version's eval report).

The questions are in learning_prompts.json (hand-written input). The corrections are
the base model's own first sentence, wrapped in the style, as a user would edit it.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from conftest import MODEL, IS_SMOLLM2, BriseServer

pytestmark = pytest.mark.skipif(not IS_SMOLLM2, reason="the scenario is tuned for SmolLM2-135M")

HERE = __import__("pathlib").Path(__file__).resolve().parent
PROMPTS = json.loads((HERE / "learning_prompts.json").read_text())
OPEN, SIGN = "Ahoy!", "Fair winds, Brise."
ADMIN = "admin-learn"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
# The scenario's budget is 10 minutes; training is most of it.
PROMOTION_TIMEOUT = 480


def first_sentence(text: str) -> str:
    m = re.match(r"(.+?[.!?])(\s|$)", text.replace("\n", " ").strip())
    return (m.group(1) if m else text).strip()


def in_style(text: str) -> bool:
    t = text.strip()
    return t.startswith(OPEN) and t.endswith(SIGN)


def ask(c: httpx.Client, url: str, q: str, max_tokens: int) -> dict:
    r = c.post(f"{url}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": q}],
        "temperature": 0, "max_tokens": max_tokens})
    assert r.status_code == 200, r.text
    return r.json()


def style_share(c: httpx.Client, url: str) -> tuple[float, list[str]]:
    answers = [ask(c, url, q, 120)["choices"][0]["message"]["content"] for q in PROMPTS["held_out"]]
    return sum(map(in_style, answers)) / len(answers), answers


def test_feedback_teaches_the_house_style(tmp_path):
    n_train = len(PROMPTS["train"])
    srv = BriseServer(tmp_path / "serve.log", [
        "--admin-key", ADMIN, "--adapter-poll", "1",
        "--learn", "--learn-after", str(n_train), "--learn-check", "2",
        "--learn-method", "sft", "--learn-lr", "3.5e-4", "--learn-epochs", "3", "--learn-batch-size", "4",
        "--learn-threads", "2", "--learn-dir", str(tmp_path / "adapters")])
    srv.wait_ready()
    t0 = time.monotonic()
    try:
        with httpx.Client(timeout=120, trust_env=False) as c:
            before, _ = style_share(c, srv.url)
            assert before <= 0.1, f"the base model already answers in the house style ({before:.0%})"

            for q in PROMPTS["train"]:
                done = ask(c, srv.url, q, 40)
                styled = f"{OPEN} {first_sentence(done['choices'][0]['message']['content'])} {SIGN}"
                r = c.post(f"{srv.url}/v1/feedback", json={
                    "completion_id": done["id"], "rating": -1, "correction": styled})
                assert r.status_code == 201, r.text

            deadline = time.monotonic() + PROMOTION_TIMEOUT
            version = None
            while time.monotonic() < deadline and version is None:
                cards = c.get(f"{srv.url}/v1/models").json()["data"]
                version = next((m.get("current_version") for m in cards if m["id"] == MODEL), None)
                if version is None:
                    assert srv.proc.poll() is None, srv.describe()
                    time.sleep(2)
            assert version, f"no version promoted within {PROMOTION_TIMEOUT} s: {srv.describe()}"

            v = c.get(f"{srv.url}/v1/admin/adapters/{version}", headers=AUTH).json()
            report = v["eval_report"]
            assert report["passed"], report["summary"]
            ppl_base = report["current"]["metrics"]["ppl"]
            ppl_new = report["candidate"]["metrics"]["ppl"]
            assert ppl_new <= 1.05 * ppl_base, f"perplexity {ppl_base} -> {ppl_new}"

            after, answers = style_share(c, srv.url)
            print(f"house style on held-out questions: {before:.0%} -> {after:.0%}; "
                  f"perplexity {ppl_base:.3f} -> {ppl_new:.3f}; {time.monotonic() - t0:.0f} s")
            assert after >= 0.8, f"{after:.0%} in the house style after learning: {answers}"
            # Every answer after the swap came from the promoted version.
            rows = srv.sql("SELECT DISTINCT adapter FROM completions WHERE adapter IS NOT NULL")
            assert [r[0] for r in rows] == [version]
            # The run is the server's own fine-tuning job, with a loss per step.
            jobs = c.get(f"{srv.url}/v1/admin/fine_tuning/jobs", headers=AUTH).json()["data"]
            assert [(j["status"], j["fine_tuned_model"], j["brise"]["source"]) for j in jobs] == [
                ("succeeded", f"{MODEL}:{version}", "ledger")]
            ev = c.get(f"{srv.url}/v1/admin/fine_tuning/jobs/{jobs[0]['id']}/events",
                       params={"order": "asc"}, headers=AUTH).json()["data"]
            steps = [e["data"]["step"] for e in ev if e["type"] == "metrics"]
            assert steps and steps == list(range(1, steps[-1] + 1))
            assert ev[-1]["message"] == "The job has successfully completed"
        assert time.monotonic() - t0 < 600, "the scenario took longer than 10 minutes"
    finally:
        srv.stop()
