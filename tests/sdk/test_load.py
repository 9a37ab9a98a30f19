"""Load: 32 concurrent streaming clients over a fixed number of requests against their
own server. Zero errors, every stream complete, the server's memory stable. Then a
SIGTERM while streams are running: they finish, and the server exits 0."""

import concurrent.futures as cf
import json
import signal
import threading
import time

import httpx
import pytest

from conftest import MODEL, BriseServer

CLIENTS = 32
REQUESTS_PER_CLIENT = 3
MAX_TOKENS = 16


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def stream_one(url: str, i: int) -> tuple[str, str, int]:
    """One streamed chat: (text, finish_reason, completion_tokens)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Tell me a fact about the number {i}."}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0.7,
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text, finish, usage, done = "", None, None, False
    with httpx.Client(timeout=120, trust_env=False) as c:
        with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                assert "error" not in chunk, chunk
                for ch in chunk["choices"]:
                    text += ch["delta"].get("content") or ""
                    finish = ch["finish_reason"] or finish
                if chunk.get("usage"):
                    usage = chunk["usage"]
    assert done, "stream ended without [DONE]"
    assert usage is not None, "no usage chunk"
    return text, finish, usage["completion_tokens"]


def run_clients(url: str, rounds: int) -> list[tuple[str, str, int]]:
    def client(c: int):
        return [stream_one(url, c * 100 + r) for r in range(rounds)]

    with cf.ThreadPoolExecutor(CLIENTS) as ex:
        return [x for xs in ex.map(client, range(CLIENTS)) for x in xs]


@pytest.fixture(scope="module")
def load_server(tmp_path_factory):
    srv = BriseServer(tmp_path_factory.mktemp("load") / "serve.log",
                      [], ["-t", "2", "--parallel", "8", "-c", "8192", "--queue", "64"])
    try:
        srv.wait_ready()
    except BaseException:
        srv.kill()
        raise
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


def test_32_concurrent_streams(load_server):
    url = load_server.url
    # Warm-up round: memory after it is the baseline.
    run_clients(url, 1)
    before = rss_kib(load_server.proc.pid)
    t0 = time.monotonic()
    results = run_clients(url, REQUESTS_PER_CLIENT)
    elapsed = time.monotonic() - t0
    after = rss_kib(load_server.proc.pid)
    assert len(results) == CLIENTS * REQUESTS_PER_CLIENT
    for text, finish, n in results:
        assert finish in ("stop", "length"), finish
        assert 0 < n <= MAX_TOKENS
        assert finish == "stop" or n == MAX_TOKENS
        assert text or finish == "stop"
    # Stable: another full load round may not grow the server by more than 16 MiB.
    assert after - before < 16 * 1024, f"RSS grew from {before} KiB to {after} KiB"
    tokens = sum(n for _, _, n in results)
    print(f"{len(results)} streams, {tokens} tokens in {elapsed:.1f} s, RSS {before}→{after} KiB")
    with httpx.Client(timeout=10, trust_env=False) as c:
        m = c.get(f"{url}/metrics").text
    assert f'brise_requests_total{{route="/v1/chat/completions",status="200"}} {CLIENTS * (REQUESTS_PER_CLIENT + 1)}' in m


def test_sigterm_lets_streams_finish(load_server):
    """Streams running at SIGTERM complete; new requests are refused; exit code 0."""
    url = load_server.url
    results: list = []
    errors: list = []

    def client(i: int):
        try:
            results.append(stream_one(url, 9000 + i))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    # Let them start streaming.
    deadline = time.monotonic() + 30
    with httpx.Client(timeout=10, trust_env=False) as c:
        while time.monotonic() < deadline:
            m = c.get(f"{url}/metrics").text
            active = [line for line in m.splitlines() if line.startswith("brise_active_sequences")]
            if active and float(active[0].split()[-1]) >= 6:
                break
            time.sleep(0.02)
    load_server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(results) == 6
    assert all(f in ("stop", "length") for _, f, _ in results)
    rc = load_server.proc.wait(timeout=30)
    assert rc == 0
