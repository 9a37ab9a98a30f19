"""What the web console needs from the server: its files at / (embedded, strict CSP,
caching), `GET /v1/usage` (tenant-scoped usage and feedback by version), and ties in
`POST /v1/feedback`. The console itself is tested in a browser by tests/console."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest

from conftest import BRISE_BIN, MODEL, serve, user


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    srv = serve(tmp_path_factory, "console", ["--api-key", "acme=key-a", "--api-key", "beta=key-b"])
    yield srv
    srv.stop()


def client(srv, key):
    return httpx.Client(base_url=srv.url, timeout=60, trust_env=False, headers={"Authorization": f"Bearer {key}"})


def show(ledger, cid):
    p = subprocess.run([str(BRISE_BIN), "ledger", "show", cid, "--ledger", str(ledger)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_console_files(tenants):
    with httpx.Client(base_url=tenants.url, timeout=30, trust_env=False) as c:
        # The page needs no key: it asks for one when the API does.
        r = c.get("/")
        assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cache-control"] == "no-cache"
        assert c.get("/", headers={"If-None-Match": r.headers["etag"]}).status_code == 304
        assert c.get("/", headers={"If-None-Match": '"other"'}).status_code == 200
        assert "http://" not in r.text and "https://" not in r.text, "no outside URLs"
        for path, ctype in [("/console/app.js", "text/javascript; charset=utf-8"),
                            ("/console/app.css", "text/css; charset=utf-8"),
                            ("/console/icon.svg", "image/svg+xml"),
                            ("/console/vendor/LICENSE-chartjs.txt", "text/plain; charset=utf-8")]:
            a = c.get(path)
            assert a.status_code == 200 and a.headers["content-type"] == ctype, path
            assert path.rsplit("/", 1)[1] in r.text or path.endswith(".txt")
        v = c.get("/console/vendor/chart-4.6.1.umd.min.js")
        assert v.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert c.head("/console/app.js").status_code == 200
        nf = c.get("/console/../Cargo.toml")
        assert nf.status_code == 404
        assert c.get("/console/nope.js").status_code == 404
        assert c.get("/v1/usage").status_code == 401


def test_usage_is_per_tenant(tenants):
    with client(tenants, "key-a") as a, client(tenants, "key-b") as b:
        before = a.get("/v1/usage", params={"window": 600, "bucket": 60}).json()
        ids = []
        for q in ("Hi", "Hello"):
            r = a.post("/v1/chat/completions", json={"model": MODEL, "messages": user(q), "max_tokens": 4})
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
        rb = b.post("/v1/chat/completions", json={"model": MODEL, "messages": user("Hey"), "max_tokens": 4})
        assert rb.status_code == 200
        assert a.post("/v1/feedback", json={"completion_id": ids[0], "rating": 1}).status_code == 201
        assert a.post("/v1/feedback", json={"completion_id": ids[1], "rating": -1, "correction": "Hello!"}).status_code == 201

        u = a.get("/v1/usage", params={"window": 600, "bucket": 60})
        assert u.status_code == 200, u.text
        u = u.json()
        assert u["object"] == "usage" and u["tenant"] == "acme" and u["bucket_ms"] == 60_000
        assert u["to_ms"] - u["from_ms"] == 600_000
        assert len(u["series"]) in (10, 11)
        starts = [s["start_ms"] for s in u["series"]]
        assert all(s % 60_000 == 0 for s in starts) and starts == sorted(starts)
        got = sum(s["requests"] for s in u["series"]) - sum(s["requests"] for s in before["series"])
        assert got == 2, "acme's two requests, not beta's"
        busy = [s for s in u["series"] if s["requests"]]
        assert all(s["latency_ms_avg"] > 0 and s["latency_ms_max"] >= s["latency_ms_avg"] for s in busy)
        assert sum(s["completion_tokens"] for s in u["series"]) > 0
        [v] = u["feedback"]
        assert (v["model"], v["adapter"]) == (MODEL, None)
        assert (v["good"], v["bad"], v["corrections"], v["good_rate"]) == (1, 1, 1, 0.5)

        ub = b.get("/v1/usage").json()
        assert ub["tenant"] == "beta" and sum(s["requests"] for s in ub["series"]) == 1
        assert ub["feedback"][0]["good"] == 0
        # Default: a day in buckets of 15 minutes (at most 120).
        assert ub["bucket_ms"] == 900_000 and ub["to_ms"] - ub["from_ms"] == 86_400_000

        for params, param in [({"window": 10}, "window"), ({"window": "day"}, "window"),
                              ({"window": 400 * 86400}, "window"), ({"bucket": 0}, "bucket"),
                              ({"bucket": "1.5"}, "bucket"), ({"window": 86400, "bucket": 1}, "bucket"),
                              ({"since": 1}, "since")]:
            e = a.get("/v1/usage", params=params)
            assert e.status_code == 400 and e.json()["error"]["param"] == param, (params, e.text)


def test_tie(tenants, tmp_path):
    with client(tenants, "key-a") as a, client(tenants, "key-b") as b:
        cmp = a.post("/v1/compare", json={"model": MODEL, "messages": user("Name a fruit."), "max_tokens": 6})
        assert cmp.status_code == 200, cmp.text
        x, y = (c["id"] for c in cmp.json()["candidates"])
        other = a.post("/v1/chat/completions", json={"model": MODEL, "messages": user("Name a tree."), "max_tokens": 4}).json()["id"]
        for body, param, status in [
            ({"tie": [x]}, "tie", 400),
            ({"tie": [x, x]}, "tie", 400),
            ({"tie": x}, "tie", 400),
            ({"tie": [x, 3]}, "tie", 400),
            ({"tie": [x, y], "rating": 1}, "rating", 400),
            ({"tie": [x, y], "preferred": x}, "tie", 400),
            ({"tie": [x, y], "completion_id": x}, "tie", 400),
            ({"tie": [x, other]}, "tie", 400),  # answers to different prompts
            ({"tie": [x, "chatcmpl-nope"]}, "completion_id", 404),
        ]:
            e = a.post("/v1/feedback", json=body)
            assert e.status_code == status and e.json()["error"]["param"] == param, (body, e.text)
        # Another tenant cannot tie acme's answers.
        assert b.post("/v1/feedback", json={"tie": [x, y]}).status_code == 404

        fb = a.post("/v1/feedback", json={"tie": [x, y], "comment": "both fine"})
        assert fb.status_code == 201, fb.text
        j = fb.json()
        assert (j["kind"], j["tie"], j["preferred"], j["rejected"], j["comment"]) == ("tie", [x, y], None, None, "both fine")
        for cid in (x, y):
            assert [f["id"] for f in a.get("/v1/feedback", params={"completion_id": cid}).json()["data"]] == [j["id"]]
        rec = show(tenants.ledger, x)
        assert [(f["kind"], f["completion_id"], f["rejected_id"]) for f in rec["feedback"]] == [("tie", x, y)]
        u = a.get("/v1/usage", params={"window": 600}).json()
        assert u["feedback"][0]["ties"] == 1

    # A tie says neither answer is better: it gives no training pair.
    out = tmp_path / "dpo.jsonl"
    p = subprocess.run([str(BRISE_BIN), "export", "--format", "trl-dpo", "--out", str(out), "--ledger", str(tenants.ledger)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all("Name a fruit." not in json.dumps(r) for r in rows), rows
