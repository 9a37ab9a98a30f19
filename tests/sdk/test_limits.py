"""Overload and time limits: a full queue answers 503 with Retry-After, a request past
--timeout ends (mid-stream, with a final SSE error event), and keys come from a file."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import select
import socket
import time

import httpx
import pytest

import conftest
from conftest import IS_SMOLLM2, MODEL


def serve(tmp_path_factory, name, args):
    return conftest.serve(tmp_path_factory, name, [], ["-t", "2", "-c", "2048", *args])


# End-of-sequence tokens banned, so a generation runs until max_tokens or the timeout.
NO_EOS = {"logit_bias": {"0": -100, "2": -100}} if IS_SMOLLM2 else {}


def test_queue_full_is_503_with_retry_after(tmp_path_factory):
    srv = serve(tmp_path_factory, "q", ["--parallel", "1", "--queue", "1"])
    try:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 64, "temperature": 0, **NO_EOS}

        def post(_):
            with httpx.Client(timeout=120, trust_env=False) as c:
                return c.post(f"{srv.url}/v1/completions", json=body)

        with cf.ThreadPoolExecutor(8) as ex:
            rs = list(ex.map(post, range(8)))
        codes = sorted(r.status_code for r in rs)
        assert 200 in codes and 503 in codes, codes
        for r in rs:
            if r.status_code == 503:
                assert r.headers.get("retry-after") == "1"
                assert r.json()["error"]["code"] == "server_overloaded"
            else:
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 64
    finally:
        srv.stop()


def test_timeout_mid_stream_is_an_error_event(tmp_path_factory):
    srv = serve(tmp_path_factory, "t", ["--timeout", "1", "--parallel", "1"])
    try:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0,
                "stream": True, **NO_EOS}
        events = []
        with httpx.Client(timeout=60, trust_env=False) as c:
            with c.stream("POST", f"{srv.url}/v1/completions", json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])
        assert err["error"]["type"] == "timeout", err
        assert len(events) > 10  # it streamed before the limit
        # Not streamed: a 504.
        with httpx.Client(timeout=60, trust_env=False) as c:
            r = c.post(f"{srv.url}/v1/completions", json={**body, "stream": False})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    finally:
        srv.stop()


def test_api_key_file_names_tenants(tmp_path_factory, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# tenants\nacme=sk-acme-1\n\nsk-plain\n")
    srv = serve(tmp_path_factory, "k", ["--api-key-file", str(keys)])
    try:
        with httpx.Client(base_url=srv.url, timeout=30, trust_env=False) as c:
            assert c.get("/v1/models").status_code == 401
            for k in ("sk-acme-1", "sk-plain"):
                assert c.get("/v1/models", headers={"Authorization": f"Bearer {k}"}).status_code == 200
            # The tenant name is not a key.
            assert c.get("/v1/models", headers={"Authorization": "Bearer acme"}).status_code == 401
    finally:
        srv.stop()


def test_tokens_per_minute_refuse_a_tenant_over_its_allowance(tmp_path_factory, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("acme=sk-acme\nbeta=sk-beta\n")
    srv = serve(tmp_path_factory, "tpm", ["--api-key-file", str(keys), "--rate-limit-tokens", "60"])
    try:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 80, "temperature": 0, **NO_EOS}
        acme = {"Authorization": "Bearer sk-acme"}
        with httpx.Client(base_url=srv.url, timeout=120, trust_env=False) as c:
            # Admitted with a full allowance; its 80+ tokens take acme below zero.
            r = c.post("/v1/completions", json=body, headers=acme)
            assert r.status_code == 200, r.text
            used = r.json()["usage"]["total_tokens"]
            assert used > 60, used
            r = c.post("/v1/completions", json=body, headers=acme)
            assert r.status_code == 429, r.text
            err = r.json()["error"]
            assert (err["type"], err["code"]) == ("tokens", "rate_limit_exceeded"), err
            assert "limit 60" in err["message"], err
            # The deficit (used - 60 tokens at 1 a second) sets Retry-After.
            retry = int(r.headers["retry-after"])
            assert used - 60 - 5 <= retry <= used - 60 + 2, (retry, used)
            # beta has its own allowance.
            r = c.post("/v1/completions", json={**body, "max_tokens": 4}, headers={"Authorization": "Bearer sk-beta"})
            assert r.status_code == 200, r.text
            # (acme itself is refused everywhere until its allowance is back above zero.)
            m = c.get("/metrics", headers={"Authorization": "Bearer sk-beta"}).text
            assert 'brise_rate_limited_total{tenant="acme",limit="tokens"} 1' in m, m
            # Each admitted request's queue wait is counted for its tenant.
            for t in ("acme", "beta"):
                assert re.search(r'brise_tenant_queue_wait_seconds_count\{model="[^"]+",tenant="%s"\} 1\n' % t, m), m
    finally:
        srv.stop()


def test_idle_connections_are_capped_and_closed(tmp_path_factory):
    """Issue 21: ~20k idle connections used to exhaust the descriptors and stop /health.
    Now at most --max-connections are open at once (the rest wait in the kernel's
    backlog), and a connection that sends no complete request headers within
    --header-timeout (or stays idle that long after a response) is closed."""
    srv = serve(tmp_path_factory, "conns", ["--max-connections", "200", "--header-timeout", "1"])
    socks = []
    try:
        fds = lambda: len(os.listdir(f"/proc/{srv.proc.pid}/fd"))
        base = fds()
        for _ in range(150):
            socks.append(socket.create_connection(("127.0.0.1", srv.port)))
        with httpx.Client(timeout=30, trust_env=False) as c:
            t = time.monotonic()
            assert c.get(f"{srv.url}/health").status_code == 200
            assert time.monotonic() - t < 1
        for _ in range(150):
            socks.append(socket.create_connection(("127.0.0.1", srv.port)))
        time.sleep(0.3)
        assert fds() <= base + 200 + 8, (base, fds())
        # One connection sends half a request, one gets an answer and then stays idle.
        half = socket.create_connection(("127.0.0.1", srv.port))
        half.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        kept = socket.create_connection(("127.0.0.1", srv.port))
        socks += [half, kept]
        with httpx.Client(timeout=30, trust_env=False) as c:
            assert c.get(f"{srv.url}/health").status_code == 200
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        # Every one of them is closed by the server within a few timeouts.
        open_ = {s.fileno(): s for s in socks}
        got = {s.fileno(): b"" for s in socks}
        deadline = time.monotonic() + 15
        while open_ and time.monotonic() < deadline:
            ready, _, _ = select.select(list(open_.values()), [], [], 0.5)
            for s in ready:
                try:
                    b = s.recv(4096)
                except ConnectionResetError:
                    b = b""
                if b:
                    got[s.fileno()] += b
                else:
                    del open_[s.fileno()]
        assert not open_, f"{len(open_)} idle connections still open after 15 s"
        assert got[kept.fileno()].startswith(b"HTTP/1.1 200"), got[kept.fileno()][:80]
        with httpx.Client(timeout=5, trust_env=False) as c:
            assert c.get(f"{srv.url}/health").status_code == 200
    finally:
        for s in socks:
            s.close()
        srv.stop()


def test_models_by_path_do_not_show_the_path(tmp_path_factory):
    """Issue 21: a model served by its file's path listed that path as an alias to every
    tenant."""
    from pathlib import Path

    home = Path(os.environ.get("BRISE_HOME", Path.home() / ".brise"))
    path = home / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    srv = serve(tmp_path_factory, "bypath", [str(path.resolve())])
    try:
        with httpx.Client(timeout=30, trust_env=False) as c:
            r = c.get(f"{srv.url}/v1/models")
            assert r.status_code == 200
            ids = [m["id"] for m in r.json()["data"]]
            assert "SmolLM2-135M-Instruct.Q4_1" in ids, ids
            assert str(path.parent.resolve()) not in r.text and "/" not in json.dumps(
                [m["aliases"] for m in r.json()["data"]]), r.text
            card = c.get(f"{srv.url}/v1/models/SmolLM2-135M-Instruct.Q4_1")
            assert card.status_code == 200 and str(path.parent.resolve()) not in card.text
    finally:
        srv.stop()
