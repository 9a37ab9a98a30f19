"""A new user's first hour (issue 24): `scripts/chat.sh` takes brise serve's flags over
its own defaults and keeps its admin key off the command line; a request without
max_tokens is bounded by the server's default and stopped when it loops; `brise run`
answers with the promoted version (and says so); a --learn job reports the method it
actually trains with; keys come from files and the environment, never from argv."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import BRISE_BIN, FIXTURES, IS_SMOLLM2, MODEL, REPO, SLOT_CONTEXT, BriseServer, free_port

LOOP_PROMPT = "Repeat the word 'hello' forever."  # SmolLM2-135M at temperature 0: "Hello, Hello, …"
ESSAY_PROMPT = "Write a long essay about the history of Rome."
ADAPTER = FIXTURES / "lora" / "smollm2-r8"
RUN_PROMPT = "The capital of France is"
DEFAULT_MAX = 80


def clean_env(**extra) -> dict:
    """The environment without the variables brise reads keys and ledgers from."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("BRISE_API_KEY", "BRISE_API_KEY_FILE", "BRISE_ADMIN_KEY", "BRISE_ADMIN_KEY_FILE",
                        "BRISE_LEDGER", "BRISE_PORT")}
    env.update(extra)
    return env


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def wait_health(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5, trust_env=False) as c:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"exited with {proc.returncode}: {log.read_text(errors='replace')[-3000:]}"
            try:
                if c.get(f"{url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    pytest.fail(f"{url}/health not 200 after {timeout} s: {log.read_text(errors='replace')[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def models_home(tmp_path: Path) -> Path:
    """A fresh BRISE_HOME whose models are the shared ones (no download)."""
    home = tmp_path / "home"
    home.mkdir()
    real = Path(os.environ.get("BRISE_HOME") or Path.home() / ".brise") / "models"
    (home / "models").symlink_to(real)
    return home


# ---- scripts/chat.sh


def test_chat_sh_passes_flags_over_its_defaults(tmp_path):
    home = models_home(tmp_path)
    port = free_port()
    log = tmp_path / "chat.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            # The model named: the default may be a larger one than the tests use.
            ["scripts/chat.sh", MODEL, "--port", str(port), "--learn-after", "7", "-t", "2", "-c", "4096"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=clean_env(BRISE_BIN=str(BRISE_BIN), BRISE_HOME=str(home)))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_health(url, proc, log)
        # chat.sh execs brise: the server is the process started, with each flag once.
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert argv.count(b"--port") == 1 and argv[argv.index(b"--port") + 1] == str(port).encode(), argv
        assert argv.count(b"--learn-after") == 1 and argv[argv.index(b"--learn-after") + 1] == b"7", argv
        assert b"--learn" in argv, argv
        # The admin key it made works, and is in no process's command line.
        key = (home / "admin-key").read_text().strip()
        assert len(key) == 32 and (home / "admin-key").stat().st_mode & 0o077 == 0
        assert key not in cmdline(proc.pid)
        with httpx.Client(base_url=url, timeout=30, trust_env=False) as c:
            assert c.get("/v1/admin/audit", headers={"Authorization": f"Bearer {key}"}).status_code == 200
            assert c.get("/v1/admin/audit", headers={"Authorization": "Bearer wrong"}).status_code in (401, 403)
        assert f"http://127.0.0.1:{port}/" in log.read_text()
    finally:
        stop(proc)


def test_chat_sh_rejects_bad_arguments_before_building(tmp_path):
    # No cargo on PATH: a check that came after the build would fail differently.
    env = clean_env(PATH="/usr/bin:/bin", BRISE_HOME=str(tmp_path))
    for args, want in [(["--bogus"], "unknown option --bogus"),
                       (["--port", "1", "--port", "2"], "--port is given twice"),
                       (["-t", "1", "--threads", "2"], "--threads is given twice"),
                       (["--port"], "--port needs a value"),
                       (["smollm2", "--terminal"], "--terminal must come first")]:
        p = subprocess.run(["bash", "scripts/chat.sh", *args], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 2 and want in p.stderr, (args, p.returncode, p.stderr)
    p = subprocess.run(["bash", "scripts/chat.sh", "--help"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 0 and "override" in p.stdout and "--learn-after 5" in p.stdout, p.stdout
    # Its default model is brise's (registry.rs's DEFAULT_MODEL), named in the help.
    default = re.search(r'pub const DEFAULT_MODEL: &str = "([^"]+)";',
                        (REPO / "crates/brise-cli/src/registry.rs").read_text()).group(1)
    assert f"(default\n{default}, brise's default model)" in p.stdout, p.stdout


# ---- the default token limit and the loop stop


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    s = BriseServer(tmp_path_factory.mktemp("first-hour") / "serve.log", ["--max-tokens", str(DEFAULT_MAX)])
    s.wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def c(limited):
    with httpx.Client(base_url=limited.url, timeout=300, trust_env=False) as client:
        yield client


def chat(c, prompt, **kw):
    r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": prompt}],
                                             "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_models_report_the_default_limit(c, tmp_path):
    card = c.get(f"/v1/models/{MODEL}").json()
    assert card["brise"]["default_max_tokens"] == DEFAULT_MAX, card
    assert card["brise"]["repetition_stop"] == {"min_span": 64, "min_repeats": 4, "max_period": 256}, card
    # Never above a slot's context.
    s = BriseServer(tmp_path / "serve.log", ["--max-tokens", "1000000"])
    try:
        s.wait_ready()
        card = httpx.get(f"{s.url}/v1/models/{MODEL}", trust_env=False).json()
        assert card["brise"]["default_max_tokens"] == SLOT_CONTEXT == card["max_context_length"], card
    finally:
        s.stop()


@pytest.mark.skipif(not IS_SMOLLM2, reason="the prompts are chosen for SmolLM2-135M")
def test_a_request_without_max_tokens_gets_the_default(c):
    j = chat(c, ESSAY_PROMPT)
    ch = j["choices"][0]
    assert ch["finish_reason"] == "length" and j["usage"]["completion_tokens"] == DEFAULT_MAX, j
    assert ch["brise"]["stop"] == "default_max_tokens" and ch["brise"]["max_tokens"] == DEFAULT_MAX, ch
    # Its own max_tokens: exactly that, and no note.
    j = chat(c, ESSAY_PROMPT, max_tokens=DEFAULT_MAX + 10)
    ch = j["choices"][0]
    assert ch["finish_reason"] == "length" and j["usage"]["completion_tokens"] == DEFAULT_MAX + 10, j
    assert "brise" not in ch, ch


@pytest.mark.skipif(not IS_SMOLLM2, reason="the loop prompt is chosen for SmolLM2-135M")
def test_a_loop_is_stopped_unless_max_tokens_is_set(c):
    # With its own max_tokens the request gets every token: the model does loop.
    j = chat(c, LOOP_PROMPT, max_tokens=150)
    text = j["choices"][0]["message"]["content"]
    assert j["usage"]["completion_tokens"] == 150 and text.count("Hello") >= 40, j
    assert "brise" not in j["choices"][0]
    # Without, it stops once the loop spans 64 tokens (before the default of 80).
    j = chat(c, LOOP_PROMPT)
    ch = j["choices"][0]
    assert ch["finish_reason"] == "length", j
    assert ch["brise"]["stop"] == "repetition", ch
    assert ch["brise"]["period"] * ch["brise"]["repeats"] >= 64, ch
    assert 64 <= j["usage"]["completion_tokens"] < DEFAULT_MAX, j
    assert ch["message"]["content"] == text[: len(ch["message"]["content"])]
    # Streamed: the note is on the choice's last chunk.
    with c.stream("POST", "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": LOOP_PROMPT}], "temperature": 0,
            "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    last = [ch for k in chunks for ch in k["choices"] if ch.get("finish_reason")]
    assert len(last) == 1 and last[0]["finish_reason"] == "length" and last[0]["brise"]["stop"] == "repetition"


# ---- brise run and the promoted version


def run(*args, env=None):
    p = subprocess.run([str(BRISE_BIN), "run", *args], capture_output=True, text=True, timeout=300,
                       env=env or clean_env())
    assert p.returncode == 0, f"brise run {args}: {p.stderr}"
    return p.stdout.rstrip("\n"), p.stderr


@pytest.mark.skipif(not IS_SMOLLM2, reason="the adapter fixture is for SmolLM2")
def test_brise_run_uses_the_promoted_version(tmp_path):
    ledger = tmp_path / "ledger.sqlite"
    greedy = [RUN_PROMPT, "--raw", "-n", "12", "--temp", "0", "-t", "2"]
    # No ledger file: the bare model, silently, and no file appears.
    base, err = run(MODEL, *greedy, "--ledger", str(ledger))
    assert "promoted" not in err and not ledger.exists(), err
    lora, _ = run(MODEL, *greedy, "--lora", str(ADAPTER), "--ledger", "off")
    assert lora != base, "the fixture adapter must change the answer"

    def cli(*args):
        p = subprocess.run([str(BRISE_BIN), "adapters", *args, "--ledger", str(ledger)], capture_output=True,
                           text=True, timeout=120, env=clean_env())
        assert p.returncode == 0, p.stderr
        return p.stdout.strip()

    vid = cli("register", "--model", MODEL, "--path", str(ADAPTER), "--method", "sft")
    # A candidate is not served.
    out, err = run(MODEL, *greedy, "--ledger", str(ledger))
    assert (out, "promoted" in err) == (base, False), err
    cli("promote", vid, "--no-check")
    out, err = run("smollm2", *greedy, "--ledger", str(ledger))
    assert out == lora, (out, lora)
    assert f"using promoted version {vid} of smollm2; smollm2:base for the bare model" in err, err
    # BRISE_LEDGER names it too, as for the other commands.
    out, _ = run("smollm2", *greedy, env=clean_env(BRISE_LEDGER=str(ledger)))
    assert out == lora
    out, err = run("smollm2:base", *greedy, "--ledger", str(ledger))
    assert out == base and "promoted" not in err, err
    # --adapter (--lora) picks another directory over the promoted version.
    out, err = run("smollm2", *greedy, "--adapter", str(ADAPTER), "--ledger", str(ledger))
    assert out == lora and "promoted" not in err, err


@pytest.mark.skipif(not IS_SMOLLM2, reason="the loop prompt is chosen for SmolLM2-135M")
def test_brise_run_stops_a_loop_without_n():
    out, err = run(MODEL, LOOP_PROMPT, "--temp", "0", "-t", "2", "--ledger", "off")
    assert "[stopped: the last" in err and out.count("Hello") >= 20, (out, err)


# ---- keys from files and the environment


def test_keys_from_files_stay_off_the_command_line(tmp_path):
    admin, api = "adm-" + os.urandom(8).hex(), "sk-" + os.urandom(8).hex()
    (tmp_path / "admin").write_text(admin + "\n")
    (tmp_path / "keys").write_text(f"# keys\n{api}\n")
    s = BriseServer(tmp_path / "serve.log",
                    ["--admin-key-file", str(tmp_path / "admin"), "--api-key-file", str(tmp_path / "keys")])
    try:
        s.wait_ready()
        line = cmdline(s.proc.pid)
        assert admin not in line and api not in line, line
        with httpx.Client(base_url=s.url, timeout=30, trust_env=False) as c:
            assert c.get("/v1/models").status_code == 401
            assert c.get("/v1/models", headers={"Authorization": f"Bearer {api}"}).status_code == 200
            assert c.get("/v1/admin/audit", headers={"Authorization": f"Bearer {admin}"}).status_code == 200
            assert c.get("/v1/admin/audit", headers={"Authorization": f"Bearer {api}"}).status_code in (401, 403)
    finally:
        s.stop()


def test_keys_from_the_environment(tmp_path):
    admin, api = "adm-" + os.urandom(8).hex(), "sk-" + os.urandom(8).hex()
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BRISE_BIN), "serve", MODEL, "--port", str(port), "--ledger",
                                 str(tmp_path / "l.sqlite"), "-t", "2", "-c", "4096"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=clean_env(BRISE_ADMIN_KEY=admin, BRISE_API_KEY=api))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_health(url, proc, log)
        assert admin not in cmdline(proc.pid) and api not in cmdline(proc.pid)
        with httpx.Client(base_url=url, timeout=30, trust_env=False) as c:
            assert c.get("/v1/models").status_code == 401
            assert c.get("/v1/admin/audit", headers={"Authorization": f"Bearer {admin}"}).status_code == 200
    finally:
        stop(proc)
    # --help never prints them.
    p = subprocess.run([str(BRISE_BIN), "serve", "--help"], capture_output=True, text=True, timeout=30,
                       env=clean_env(BRISE_ADMIN_KEY=admin, BRISE_API_KEY=api))
    assert admin not in p.stdout and api not in p.stdout


def test_bad_key_files_are_clear_errors(tmp_path):
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "k").write_text("k\n")
    for args, env, want in [
        (["--admin-key-file", str(tmp_path / "missing")], {}, "reading the admin key file"),
        (["--admin-key-file", str(tmp_path / "empty")], {}, "is empty"),
        (["--admin-key-file", str(tmp_path / "k")], {"BRISE_ADMIN_KEY": "x"}, "give one"),
    ]:
        p = subprocess.run([str(BRISE_BIN), "serve", MODEL, "--ledger", "off", *args], capture_output=True,
                           text=True, timeout=60, env=clean_env(**env))
        assert p.returncode == 1 and want in p.stderr, (args, p.stderr)


# ---- a --learn job reports its method


@pytest.mark.skipif(not IS_SMOLLM2, reason="timed for SmolLM2-135M")
def test_an_auto_job_reports_the_method_it_trains_with(tmp_path):
    (tmp_path / "admin").write_text("adm-learn\n")
    auth = {"Authorization": "Bearer adm-learn"}
    s = BriseServer(tmp_path / "serve.log", [
        "--admin-key-file", str(tmp_path / "admin"), "--learn", "--learn-after", "3", "--learn-check", "1",
        "--learn-threads", "1", "--learn-epochs", "1", "--learn-batch-size", "1",
        "--learn-dir", str(tmp_path / "adapters")])
    try:
        s.wait_ready()
        with httpx.Client(base_url=s.url, timeout=120, trust_env=False) as c:
            for q in ["What is 2+2?", "Name a color.", "Say hi."]:
                j = chat(c, q, max_tokens=8)
                r = c.post("/v1/feedback", json={"completion_id": j["id"], "rating": -1,
                                                 "correction": f"A better answer to {q}"})
                assert r.status_code == 201, r.text
            # Corrections make DPO pairs: `auto` picks DPO when it builds the dataset.
            deadline = time.monotonic() + 120
            seen = []
            while time.monotonic() < deadline:
                jobs = c.get("/v1/admin/fine_tuning/jobs", headers=auth).json()["data"]
                if jobs:
                    j = jobs[0]
                    seen.append((j["status"], j["method"], j["brise"]["method"]))
                    if j["brise"]["method"] != "auto" or j["status"] not in ("queued", "running"):
                        break
                time.sleep(0.2)
            assert seen, "no job was queued"
            # Until then the method is not claimed.
            for status, method, bm in seen[:-1]:
                assert bm == "auto" and method is None, seen
            status, method, bm = seen[-1]
            assert bm == "sft" and method["type"] == "supervised" and "supervised" in method, seen
            assert j["brise"]["config"]["method"] == "sft", j["brise"]["config"]
            # Done with it: cancelled (at its next step) before the server stops.
            r = c.post(f"/v1/admin/fine_tuning/jobs/{j['id']}/cancel", headers=auth)
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                jobs = c.get("/v1/admin/fine_tuning/jobs", headers=auth).json()["data"]
                if jobs[0]["status"] not in ("queued", "running"):
                    break
                time.sleep(0.5)
    finally:
        s.stop()
