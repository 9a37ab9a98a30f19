"""Fixtures for the SDK integration tests: real `brise serve` processes on free ports.

Environment:
  BRISE_BIN         the brise binary (default: <repo>/target/release/brise)
  BRISE_TEST_MODEL  the model to serve (default: smollm2:135m); also the model id the API reports
  BRISE_TEST_LEDGER_BACKEND  `sqlite` (default): each server records to its own SQLite file;
                    `postgres`: to its own fresh database on the server BRISE_TEST_POSTGRES names
                    (`scripts/postgres.sh start` prints one)
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import shutil
import sqlite3
import uuid

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
BRISE_BIN = Path(os.environ.get("BRISE_BIN") or REPO / "target" / "release" / "brise")
MODEL = os.environ.get("BRISE_TEST_MODEL") or "smollm2:135m"
# The llama.cpp reference fixtures in tests/fixtures are for this model only.
IS_SMOLLM2 = MODEL == "smollm2:135m"
FIXTURES = REPO / "tests" / "fixtures"

LEDGER_BACKEND = os.environ.get("BRISE_TEST_LEDGER_BACKEND") or "sqlite"
if LEDGER_BACKEND not in ("sqlite", "postgres"):
    raise RuntimeError(f"BRISE_TEST_LEDGER_BACKEND={LEDGER_BACKEND!r}: want sqlite or postgres")
PG_BASE = (os.environ.get("BRISE_TEST_POSTGRES") or "").rstrip("/")
if LEDGER_BACKEND == "postgres" and not PG_BASE:
    raise RuntimeError("BRISE_TEST_LEDGER_BACKEND=postgres needs BRISE_TEST_POSTGRES (scripts/postgres.sh start prints it)")

SERVE_ARGS = ["-t", "2", "--parallel", "4", "-c", "8192"]
SLOT_CONTEXT = 8192 // 4
API_KEYS = ("sekret-a", "sekret-b")
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0

# Traffic goes to 127.0.0.1 only: never through a proxy the environment may name.
os.environ["NO_PROXY"] = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
os.environ["no_proxy"] = os.environ["NO_PROXY"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(lines[-n:])


class BriseServer:
    """One `brise serve` process; `url` is its base URL (no /v1)."""

    def __init__(self, log_path: Path, extra_args: list[str], base_args: list[str] | None = None):
        if not BRISE_BIN.is_file():
            pytest.fail(f"{BRISE_BIN} does not exist: build it (cargo build --release) or set BRISE_BIN")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        # Each server records to its own ledger: a file next to its log, or a fresh database.
        if LEDGER_BACKEND == "postgres":
            self.ledger = f"{PG_BASE}/brise_sdk_{uuid.uuid4().hex}"
        else:
            self.ledger = log_path.parent / "ledger.sqlite"
        self.argv = [str(BRISE_BIN), "serve", MODEL, "--host", "127.0.0.1", "--port", str(self.port),
                     "--ledger", str(self.ledger),
                     *(SERVE_ARGS if base_args is None else base_args), *extra_args]
        # `--api-key` also reads BRISE_API_KEY: only the keys given here may apply.
        env = {k: v for k, v in os.environ.items() if k not in ("BRISE_API_KEY", "BRISE_LEDGER")}
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=REPO, env=env)

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        """Runs one statement on this server's ledger, behind brise's back (to age records,
        or to tamper with them); `?` placeholders. Returns the rows, as text on PostgreSQL."""
        if LEDGER_BACKEND == "sqlite":
            db = sqlite3.connect(self.ledger)
            try:
                rows = db.execute(query, params).fetchall()
                db.commit()
                return rows
            finally:
                db.close()
        parts = query.split("?")
        assert len(parts) == len(params) + 1, "one parameter per placeholder"
        lit = lambda v: str(v) if isinstance(v, int) else "'" + str(v).replace("'", "''") + "'"
        text = parts[0] + "".join(lit(v) + rest for v, rest in zip(params, parts[1:]))
        psql = shutil.which("psql") or pytest.fail("psql (Debian's postgresql-client) is not installed")
        p = subprocess.run([psql, "-X", "-q", "-At", "-F", "\t", "-v", "ON_ERROR_STOP=1", self.ledger, "-c", text],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, f"psql: {p.stderr}"
        return [tuple(line.split("\t")) for line in p.stdout.splitlines() if line]

    def describe(self) -> str:
        return f"`{' '.join(self.argv)}`, log {self.log_path}:\n{tail(self.log_path)}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        last = "no answer"
        with httpx.Client(timeout=5, trust_env=False) as c:
            while True:
                rc = self.proc.poll()
                if rc is not None:
                    self._log.close()
                    pytest.fail(f"brise serve exited with code {rc} before it was ready: {self.describe()}")
                try:
                    r = c.get(f"{self.url}/health")
                    if r.status_code == 200:
                        return
                    last = f"{r.status_code} {r.text[:200]}"
                except httpx.TransportError as e:
                    last = repr(e)
                if time.monotonic() > deadline:
                    self.kill()
                    pytest.fail(f"GET /health not 200 after {READY_TIMEOUT:.0f} s (last: {last}): {self.describe()}")
                time.sleep(0.1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def stop(self) -> None:
        """SIGTERM, then the exit must be graceful (code 0) within STOP_TIMEOUT."""
        if self.proc.poll() is not None:
            rc = self.proc.returncode
            self._log.close()
            pytest.fail(f"brise serve had already exited (code {rc}) before teardown: {self.describe()}")
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"brise serve did not exit within {STOP_TIMEOUT:.0f} s of SIGTERM: {self.describe()}")
        self._log.close()
        assert rc == 0, f"brise serve exited with code {rc} on SIGTERM (want 0, a graceful shutdown): {self.describe()}"


def serve(tmp_path_factory, name: str, extra_args: list[str], base_args: list[str] | None = None):
    """A started server (its log in a fresh directory called `name`); killed if it does
    not become ready. Fixtures yield it and `stop()` it."""
    srv = BriseServer(tmp_path_factory.mktemp(name) / "serve.log", extra_args, base_args)
    try:
        srv.wait_ready()
    except BaseException:
        srv.kill()
        raise
    return srv


@pytest.fixture(scope="session")
def brise(tmp_path_factory):
    """The main server (no API keys)."""
    srv = serve(tmp_path_factory, "brise", [])
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def auth_server(tmp_path_factory):
    """A second server that wants one of API_KEYS as a bearer token."""
    args = []
    for k in API_KEYS:
        args += ["--api-key", k]
    srv = serve(tmp_path_factory, "brise-auth", args)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def base_url(brise) -> str:
    return brise.url


@pytest.fixture(scope="session")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120, trust_env=False) as c:
        yield c


@pytest.fixture(scope="session")
def oai(base_url):
    import openai

    # max_retries=0: a failing request must fail the test, not be retried quietly.
    c = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-no-key-needed", max_retries=0, timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="session")
def mistral(base_url):
    from mistralai.client import Mistral

    # The SDK appends /v1/... itself: server_url is the bare base URL.
    return Mistral(api_key="no-key-needed", server_url=base_url, timeout_ms=120_000)


# ---- helpers shared by the test modules (import them with `from conftest import ...`)


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def chat_body(content: str, **params) -> dict:
    return {"model": MODEL, "messages": user(content), **params}


def post_ok(http: httpx.Client, path: str, body: dict) -> dict:
    r = http.post(path, json=body)
    assert r.status_code == 200, f"POST {path} {json.dumps(body)[:300]} -> {r.status_code} {r.text[:1000]}"
    return r.json()


def chat_text(http: httpx.Client, content: str, **params) -> str:
    return post_ok(http, "/v1/chat/completions", chat_body(content, **params))["choices"][0]["message"]["content"]


def tokenize(http: httpx.Client, text: str, add_special: bool) -> list[int]:
    j = post_ok(http, "/tokenize", {"content": text, "add_special": add_special})
    toks = j["tokens"]
    assert isinstance(toks, list) and all(isinstance(t, int) for t in toks), j
    return toks


def detokenize(http: httpx.Client, tokens: list[int]) -> str:
    j = post_ok(http, "/detokenize", {"tokens": tokens})
    assert isinstance(j["content"], str), j
    return j["content"]


@pytest.fixture(scope="session")
def greedy(http):
    """greedy(content, max_tokens) -> the temperature-0 answer to one user message (memoized)."""
    cache: dict[tuple[str, int], str] = {}

    def run(content: str, max_tokens: int = 24) -> str:
        key = (content, max_tokens)
        if key not in cache:
            cache[key] = chat_text(http, content, temperature=0, max_tokens=max_tokens)
        return cache[key]

    return run


# Label values are quoted strings that may hold any character (\\, \" and \n escaped).
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})?\s+(\S+)')


def scrape(http: httpx.Client) -> list[tuple[str, str, float]]:
    """GET /metrics as (name, labels, value) samples."""
    r = http.get("/metrics")
    assert r.status_code == 200, r.text[:500]
    out = []
    for line in r.text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        out.append((m.group(1), m.group(2) or "", float(m.group(3))))
    return out


def metric(samples: list[tuple[str, str, float]], name: str) -> float:
    """The sum of every series of `name` (fails when there is none)."""
    vals = [v for n, _, v in samples if n == name]
    assert vals, f"/metrics has no {name}"
    return sum(vals)


def fixture_json(rel: str) -> dict:
    return json.loads((FIXTURES / rel).read_text())


def pytest_sessionfinish(session, exitstatus):
    """Drops the PostgreSQL databases this run's servers created."""
    if LEDGER_BACKEND != "postgres" or not shutil.which("psql"):
        return
    q = "SELECT datname FROM pg_database WHERE datname LIKE 'brise_sdk_%'"
    p = subprocess.run(["psql", "-X", "-At", f"{PG_BASE}/postgres", "-c", q], capture_output=True, text=True)
    for name in p.stdout.split():
        subprocess.run(["psql", "-X", "-q", f"{PG_BASE}/postgres", "-c", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'],
                       capture_output=True)
