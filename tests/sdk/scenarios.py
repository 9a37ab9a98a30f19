"""Learning scenarios (issue 18): what users teach brise through feedback, and a rule that
says whether an answer does what they asked. Used by tests/sdk/test_learning_scenarios.py
(CI, SmolLM2-135M, the whole loop through the public API with default flags) and by
bench/learn_sweep.py (the sweep behind the training defaults, at 135M and 0.5B).

Each scenario: the questions users ask (train) and correct with a thumbs-down and a
better answer, the questions never trained on (held_out), how a correction is made from
the model's own answer (as a user would edit it), and the rule an answer must satisfy.
The questions and French answers are hand-written (scenarios.json).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA = json.loads((HERE / "scenarios.json").read_text())
BRISE_BIN = Path(os.environ.get("BRISE_BIN") or REPO / "target" / "release" / "brise")

SIGNATURE = "— Brise Support"
REFUSAL = "I'm sorry, but I can't help with cooking questions."
JSON_KEYS = {"answer", "confidence"}
SHORT_WORDS = 12


def first_sentence(text: str) -> str:
    m = re.match(r"(.+?[.!?])(\s|$)", text.replace("\n", " ").strip())
    return (m.group(1) if m else text).strip()


def words(text: str) -> list[str]:
    return re.findall(r"[\w'’-]+", text.lower())


FR = {"le", "la", "les", "un", "une", "des", "est", "et", "du", "dans", "pour", "qui", "sont",
      "il", "elle", "au", "aux", "sur", "avec", "par", "ce", "cette", "ils", "nous", "pas", "mais",
      "leur", "leurs", "ou", "où", "très", "plus", "sa", "son", "ses", "grâce"}
EN = {"the", "is", "are", "a", "an", "of", "and", "to", "in", "it", "that", "for", "with", "on",
      "by", "this", "they", "you", "can", "be", "as", "from", "which", "their", "its", "or"}


def is_french(text: str) -> bool:
    ws = [w for t in words(text) for w in re.split(r"['’]", t) if w]
    fr = sum(w in FR for w in ws)
    en = sum(w in EN for w in ws)
    return fr >= 2 and fr > 2 * en


def is_json(text: str) -> bool:
    t = text.strip()
    if t.startswith("```"):
        return False
    try:
        v = json.loads(t)
    except ValueError:
        return False
    return isinstance(v, dict) and set(v) == JSON_KEYS and isinstance(v["answer"], str) and v["answer"].strip() != ""


def is_short(text: str) -> bool:
    t = text.strip()
    inner = re.findall(r"[.!?](\s+\S)", t)
    return 0 < len(words(t)) <= SHORT_WORDS + 3 and not inner


def truncate_words(text: str, n: int) -> str:
    ws = first_sentence(text).split()
    s = " ".join(ws[:n]).rstrip(",;:")
    return s if s.endswith((".", "!", "?")) else s + "."


@dataclass
class Scenario:
    name: str
    what: str
    train: list[str]
    held_out: list[str]
    # (index, question, the model's answer) -> the correction
    correct: Callable[[int, str, str], str]
    rule: Callable[[str], bool]


SCENARIOS = {
    s.name: s for s in [
        Scenario("signature", "every answer signed '— Brise Support' on a line of its own",
                 DATA["everyday_train"], DATA["everyday_held_out"],
                 lambda i, q, a: f"{first_sentence(a)}\n\n{SIGNATURE}",
                 lambda t: t.strip().endswith(SIGNATURE)),
        Scenario("json", "answers as a JSON object with exactly the keys answer and confidence",
                 DATA["everyday_train"], DATA["everyday_held_out"],
                 lambda i, q, a: json.dumps({"answer": first_sentence(a), "confidence": "high"}),
                 is_json),
        Scenario("french", "answers in French to questions asked in English",
                 DATA["everyday_train"], DATA["everyday_held_out"],
                 lambda i, q, a: DATA["everyday_train_fr"][i],
                 is_french),
        Scenario("refusal", "cooking questions refused with a fixed sentence",
                 DATA["cooking_train"], DATA["cooking_held_out"],
                 lambda i, q, a: REFUSAL,
                 lambda t: "can't help with cooking" in t.replace("’", "'").lower()),
        Scenario("short", f"one short sentence of at most {SHORT_WORDS} words instead of a paragraph "
                 "(the model's first sentence cut to that length)",
                 DATA["everyday_train"], DATA["everyday_held_out"],
                 lambda i, q, a: truncate_words(a, SHORT_WORDS),
                 is_short),
        Scenario("concise", f"a short answer of at most {SHORT_WORDS} words instead of a paragraph "
                 "(hand-written answers)",
                 DATA["everyday_train"], DATA["everyday_held_out"],
                 lambda i, q, a: DATA["everyday_train_short"][i],
                 is_short),
    ]
}

# The scenarios CI runs (tests/sdk/test_learning_scenarios.py). `short` is left to the
# bench: its corrections (the model's own first sentence cut mid-way) teach the style
# but raise the general text's perplexity 13.6%, so the gate refuses them (PERFORMANCE.md).
CI_SCENARIOS = ["signature", "json", "french", "refusal", "concise"]


def noise(answers: list[str]) -> Callable[[int, str, str], str]:
    """Corrections unrelated to their prompts: each is another prompt's answer."""
    return lambda i, q, a: first_sentence(answers[(i + 7) % len(answers)])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_home() -> Path:
    h = os.environ.get("BRISE_HOME")
    return Path(h) if h else Path.home() / ".brise"


class Server:
    """`brise serve MODEL` with $BRISE_HOME set to `home` and every flag at its default
    (the ledger and the adapters live under `home`), as a new user runs it."""

    def __init__(self, home: Path, model: str, extra: list[str] | None = None, threads: int = 2):
        home.mkdir(parents=True, exist_ok=True)
        self.home, self.model = home, model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home / "serve.log"
        self.env = {k: v for k, v in os.environ.items() if k not in ("BRISE_API_KEY", "BRISE_LEDGER", "BRISE_ADMIN_KEY")}
        self.env["BRISE_HOME"] = str(home)
        self.argv = [str(BRISE_BIN), "serve", model, "--port", str(self.port), "-t", str(threads),
                     "--adapter-poll", "1", *(extra or [])]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env)
        deadline = time.monotonic() + 120
        with httpx.Client(timeout=5, trust_env=False) as c:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"brise serve exited: {self.tail()}")
                try:
                    if c.get(f"{self.url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"brise serve not ready in 120 s: {self.tail()}")
                time.sleep(0.2)
            self.id = c.get(f"{self.url}/v1/models").json()["data"][0]["id"]

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError as e:
            return str(e)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def ask(c: httpx.Client, url: str, model: str, q: str, max_tokens: int) -> dict:
    r = c.post(f"{url}/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": q}],
        "temperature": 0, "max_tokens": max_tokens})
    r.raise_for_status()
    return r.json()


def share(c: httpx.Client, srv: Server, model: str, prompts: list[str], rule) -> tuple[float, list[str]]:
    answers = [ask(c, srv.url, model, q, 120)["choices"][0]["message"]["content"] for q in prompts]
    return sum(map(rule, answers)) / len(answers), answers


def give_feedback(c: httpx.Client, srv: Server, sc: Scenario, correct=None) -> list[str]:
    """Asks every train question and corrects the answer; returns the model's answers."""
    answers = []
    for i, q in enumerate(sc.train):
        done = ask(c, srv.url, srv.id, q, 60)
        a = done["choices"][0]["message"]["content"]
        answers.append(a)
        fix = (correct or sc.correct)(i, q, a)
        r = c.post(f"{srv.url}/v1/feedback", json={"completion_id": done["id"], "rating": -1, "correction": fix})
        r.raise_for_status()
    return answers


def train(srv: Server, model_arg: str, extra: list[str] | None = None, timeout: float = 1800) -> dict:
    """`brise train --from-ledger --model MODEL` (plus `extra`) with the server's home;
    returns {version, promoted, passed, stderr, stdout, seconds}."""
    t0 = time.monotonic()
    log = srv.home / "train.log"
    with open(log, "w") as err:
        p = subprocess.run([str(BRISE_BIN), "train", "--from-ledger", "--model", model_arg, *(extra or [])],
                           env=srv.env, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    stderr = log.read_text(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"brise train failed ({p.returncode}):\n{stderr[-3000:]}")
    m = re.search(r"version (\S+) of (\S+): (.*)", stderr)
    if not m:
        raise RuntimeError(f"brise train registered no version:\n{stderr[-3000:]}")
    return {"version": m.group(1), "promoted": m.group(3).startswith("promoted"),
            "passed": not m.group(3).startswith("rejected"), "stderr": stderr, "stdout": p.stdout,
            "seconds": time.monotonic() - t0}


def wait_serving(c: httpx.Client, srv: Server, version: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cards = c.get(f"{srv.url}/v1/models").json()["data"]
        if any(m.get("current_version") == version for m in cards if m["id"] == srv.id):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{version} not served within {timeout} s: {srv.tail()}")


def report(home: Path, version: str) -> dict:
    """The version's gate report, from the registry in the server's ledger."""
    con = sqlite3.connect(home / "ledger.sqlite")
    try:
        row = con.execute("SELECT eval_report FROM adapter_versions WHERE id = ?", (version,)).fetchone()
    finally:
        con.close()
    return json.loads(row[0])
