"""Governance: erasure by subject (API and CLI) with a receipt, subject export, standing
objections leaving exports, PII redacted from exports, and the hash-chained audit log."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest

from conftest import BRISE_BIN, MODEL, BriseServer, user

ADMIN = "admin-secret"


@pytest.fixture(scope="module")
def gov(tmp_path_factory):
    srv = BriseServer(tmp_path_factory.mktemp("gov") / "serve.log", ["--admin-key", ADMIN])
    srv.wait_ready()
    yield srv
    srv.stop()


def chat(c, content, subject):
    r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": user(content), "max_tokens": 6,
                                             "temperature": 0}, headers={"X-Brise-Subject": subject})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def cli(srv, *args):
    return subprocess.run([str(BRISE_BIN), *args, "--ledger", str(srv.ledger)], capture_output=True, text=True, timeout=60)


def test_admin_routes_need_the_admin_key(gov):
    with httpx.Client(base_url=gov.url, timeout=30, trust_env=False) as c:
        assert c.get("/v1/admin/audit").status_code == 401
        assert c.get("/v1/admin/audit", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/admin/audit", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
        # Issue 21: the scheme is case-insensitive (RFC 7235), as it is for tenant keys.
        assert c.get("/v1/admin/audit", headers={"Authorization": f"bearer {ADMIN}"}).status_code == 200
        assert c.get("/v1/admin/audit", headers={"Authorization": f"BEARER {ADMIN}"}).status_code == 200
        assert c.get("/v1/admin/audit", headers={"Authorization": f"Bearer {ADMIN}x"}).status_code == 401


def test_erasure_export_objection_and_audit(gov, tmp_path):
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=gov.url, timeout=60, trust_env=False) as c:
        a1 = chat(c, "My email is ann@example.com, remember it.", "ann")
        a2 = chat(c, "Call me at +33 6 12 34 56 78.", "ann")
        b1 = chat(c, "Hello there.", "ben")
        b2 = chat(c, "My email is ann@example.com, remember it.", "ben")
        for cid in (a1, a2, b1):
            assert c.post("/v1/feedback", json={"completion_id": cid, "rating": 1}).status_code == 201
        # A choice pairs two answers to one prompt.
        assert c.post("/v1/feedback", json={"preferred": b1, "rejected": a1}).status_code == 400
        assert c.post("/v1/feedback", json={"preferred": b2, "rejected": a1}).status_code == 201

        # Subject export: all of Ann's records with their feedback.
        r = c.get("/v1/admin/subjects/ann/export", headers=admin)
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        rows = [json.loads(x) for x in r.text.splitlines()]
        assert {x["id"] for x in rows} == {a1, a2} and all(x["feedback"] for x in rows)

        # Training export redacts PII and counts it.
        out = tmp_path / "sft.jsonl"
        p = cli(gov, "export", "--format", "trl-sft", "--out", str(out))
        assert p.returncode == 0, p.stderr
        text = out.read_text()
        assert "ann@example.com" not in text and "[EMAIL]" in text
        assert "12 34 56 78" not in text and "[PHONE]" in text
        rep = json.loads(p.stdout)
        assert rep["redacted"]["email"] >= 1 and rep["redacted"]["phone"] >= 1

        # A standing objection removes Ben from exports (his SFT row and the pair).
        assert c.post("/v1/admin/objections", json={"subject": "ben"}, headers=admin).status_code == 201
        p = cli(gov, "export", "--format", "trl-dpo", "--out", str(out))
        assert p.returncode == 0 and out.read_text() == ""
        assert json.loads(p.stdout)["skipped_objection"] == 2  # his rating and the pair

        # Erasure through the API: Ann's records, their feedback, and the pair that
        # used her answer, all gone; Ben's record stays.
        r = c.post("/v1/admin/erase", json={"subject": "ann"}, headers=admin)
        assert r.status_code == 200
        receipt = r.json()
        assert receipt["receipt_id"].startswith("erasure-")
        assert (receipt["completions_erased"], receipt["feedback_erased"]) == (2, 3)
        for cid in (a1, a2):
            assert cli(gov, "ledger", "show", cid).returncode != 0
        assert [f["kind"] for f in c.get("/v1/feedback", params={"completion_id": b1}).json()["data"]] == ["rating"]
        assert int(gov.sql("SELECT COUNT(*) FROM completions WHERE subject = 'ann'")[0][0]) == 0

        # Erasure from the CLI.
        p = cli(gov, "erase", "--subject", "ben")
        assert p.returncode == 0 and json.loads(p.stdout)["completions_erased"] == 2

        # Every admin action is in the audit log, chained.
        audit = c.get("/v1/admin/audit", headers=admin).json()
        assert audit["chain_intact"] is True
        actions = [e["action"] for e in audit["data"]]
        assert actions[-6:] == ["export_subject", "training_export", "objection", "training_export",
                                "erase_subject", "erase_subject"]
        p = cli(gov, "ledger", "audit", "--verify")
        assert p.returncode == 0 and "chain intact" in p.stderr
        # Tampering is detected.
        gov.sql("UPDATE audit_log SET actor = 'someone-else' WHERE seq = 1")
        p = cli(gov, "ledger", "audit", "--verify")
        assert p.returncode != 0 and "breaks at entry 1" in p.stderr


def test_retention_and_legal_hold(gov):
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=gov.url, timeout=60, trust_env=False) as c:
        old = chat(c, "An old question.", "carl")
        held = chat(c, "A held question.", "dana")
        fresh = chat(c, "A new question.", "carl")
        # Age two records by 30 days.
        gov.sql("UPDATE completions SET created_at_ms = created_at_ms - CAST(30 AS BIGINT) * 86400000 WHERE id IN (?, ?)", (old, held))
        assert c.post("/v1/admin/holds", json={"subject": "dana"}, headers=admin).status_code == 200
        bad = c.post("/v1/admin/retention", json={"records_days": 10**12}, headers=admin)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "records_days"
        # A field left out keeps its window; 0 or null means until erased.
        c.post("/v1/admin/retention", json={"records_days": 400, "feedback_days": 30}, headers=admin)
        c.post("/v1/admin/retention", json={"records_days": 300}, headers=admin)
        assert c.get("/v1/admin/retention", headers=admin).json() == {"records_days": 300, "feedback_days": 30}
        c.post("/v1/admin/retention", json={"records_days": 0}, headers=admin)
        assert c.get("/v1/admin/retention", headers=admin).json()["records_days"] is None
        r = c.post("/v1/admin/retention", json={"records_days": 7, "feedback_days": None}, headers=admin)
        assert r.status_code == 200, r.text
        assert r.json()["purged"]["completions"] == 1 and r.json()["purged"]["held"] == 1
        assert c.get("/v1/admin/retention", headers=admin).json() == {"records_days": 7, "feedback_days": None}
    assert cli(gov, "ledger", "show", old).returncode != 0
    assert cli(gov, "ledger", "show", held).returncode == 0
    assert cli(gov, "ledger", "show", fresh).returncode == 0
    p = cli(gov, "ledger", "retention", "--records-days", "0")
    assert p.returncode == 0 and json.loads(p.stdout)["retention"]["records_days"] is None


def consent_of(srv, cid: str) -> bool:
    p = cli(srv, "ledger", "show", cid)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)["training_consent"]


def test_tenant_training_default(gov):
    """A tenant's default decides the consent of requests that say nothing; a request's
    own choice (header or metadata) wins, and an opt-out anywhere wins over an opt-in."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    body = {"model": MODEL, "messages": user("Hi."), "max_tokens": 3, "temperature": 0}
    with httpx.Client(base_url=gov.url, timeout=60, trust_env=False) as c:
        route = "/v1/admin/tenants/default"
        assert c.get(route, headers=admin).json() == {"tenant": "default", "training": "allow", "content_level": "full"}
        assert c.post(route, json={"training": "perhaps"}, headers=admin).json()["error"]["param"] == "training"
        assert c.post(route, json={"training": "deny", "x": 1}, headers=admin).status_code == 400
        assert c.post(route, json={}, headers=admin).status_code == 400
        assert c.post(route, json={"training": "deny"}, headers=admin).status_code == 200
        assert c.get(route, headers=admin).json()["training"] == "deny"

        silent = c.post("/v1/chat/completions", json=body).json()["id"]
        allowed = c.post("/v1/chat/completions", json=body, headers={"X-Brise-Training": "allow"}).json()["id"]
        both = c.post("/v1/chat/completions", json={**body, "metadata": {"training_opt_out": True}},
                      headers={"X-Brise-Training": "allow"}).json()["id"]
        bad = c.post("/v1/chat/completions", json=body, headers={"X-Brise-Training": "maybe"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Brise-Training"
        bad = c.post("/v1/chat/completions", json={**body, "metadata": {"training_opt_out": "yes"}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "metadata.training_opt_out"
        assert (consent_of(gov, silent), consent_of(gov, allowed), consent_of(gov, both)) == (False, True, False)

        # The CLI reads and sets the same policy.
        p = cli(gov, "ledger", "tenant", "--tenant", "default", "--training", "allow")
        assert p.returncode == 0 and json.loads(p.stdout)["training"] == "allow"
        again = c.post("/v1/chat/completions", json=body).json()["id"]
        assert consent_of(gov, again) is True
        actions = [e["action"] for e in c.get("/v1/admin/audit", headers=admin).json()["data"]]
        assert actions[-2:] == ["tenant_policy", "tenant_policy"]


def show(srv, cid):
    p = cli(srv, "ledger", "show", cid)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_content_levels(gov):
    """Per request (X-Brise-Content-Level) and per tenant, the ledger keeps the prompt and
    answer in full, redacted, or not at all; a request may ask for less, never more."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    secret = "Write to zoe@example.com about IBAN DE89370400440532013000."
    body = {"model": MODEL, "messages": user(secret), "max_tokens": 8, "temperature": 0}
    with httpx.Client(base_url=gov.url, timeout=60, trust_env=False) as c:
        full = c.post("/v1/chat/completions", json=body)
        red = c.post("/v1/chat/completions", json=body, headers={"X-Brise-Content-Level": "redacted"})
        meta = c.post("/v1/chat/completions", json=body, headers={"X-Brise-Content-Level": "metadata"})
        bad = c.post("/v1/chat/completions", json=body, headers={"X-Brise-Content-Level": "some"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Brise-Content-Level"
        f, r, m = (show(gov, x.json()["id"]) for x in (full, red, meta))
        assert f["content_level"] == "full" and f["messages"][0]["content"] == secret
        assert f["output"][0]["text"] == full.json()["choices"][0]["message"]["content"]
        assert r["content_level"] == "redacted"
        assert r["messages"][0]["content"] == "Write to [EMAIL] about IBAN [IBAN]."
        assert m["content_level"] == "metadata" and m["messages"] is None
        assert m["output"] == [{"finish_reason": meta.json()["choices"][0]["finish_reason"]}]
        assert m["completion_tokens"] == meta.json()["usage"]["completion_tokens"]
        # Feedback text follows its completion's level.
        fb = c.post("/v1/feedback", json={"completion_id": r["id"], "rating": -1, "correction": "Ask zoe@example.com."})
        assert fb.status_code == 201 and fb.json()["correction"] == "Ask [EMAIL]."
        fb = c.post("/v1/feedback", json={"completion_id": m["id"], "rating": -1, "correction": "Better."})
        assert fb.status_code == 400 and fb.json()["error"]["param"] == "correction"
        assert c.post("/v1/feedback", json={"completion_id": m["id"], "rating": -1}).status_code == 201

        # The tenant's level is a ceiling: asking for full gets metadata.
        route = "/v1/admin/tenants/default"
        assert c.post(route, json={"content_level": "everything"}, headers=admin).json()["error"]["param"] == "content_level"
        assert c.post(route, json={"content_level": "metadata"}, headers=admin).json()["content_level"] == "metadata"
        try:
            x = c.post("/v1/chat/completions", json=body, headers={"X-Brise-Content-Level": "full"})
            assert show(gov, x.json()["id"])["messages"] is None
        finally:
            assert c.post(route, json={"content_level": "full"}, headers=admin).status_code == 200
        y = c.post("/v1/chat/completions", json=body).json()["id"]
        assert show(gov, y)["messages"][0]["content"] == secret


def test_admin_stats_and_export(gov, tmp_path):
    """The CLI's stats and training exports, through admin routes."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=gov.url, timeout=60, trust_env=False) as c:
        cid = chat(c, "Write my address: eve@example.org.", "eve")
        assert c.post("/v1/feedback", json={"completion_id": cid, "rating": -1,
                                             "correction": "Sure: eve@example.org."}).status_code == 201
        assert c.get("/v1/admin/stats").status_code == 401
        st = c.get("/v1/admin/stats", headers=admin).json()
        p = cli(gov, "ledger", "stats", "--json")
        assert p.returncode == 0, p.stderr
        want = json.loads(p.stdout)
        for k in ("completions", "errors", "prompt_tokens", "completion_tokens", "feedback", "thumbs_down",
                  "corrections", "preferences"):
            assert st[k] == want[k], k
        assert st["corrections"] >= 1 and st["by_model"][0]["model"] == MODEL

        r = c.get("/v1/admin/export", params={"format": "trl-dpo"}, headers=admin)
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        rep = json.loads(r.headers["x-brise-export-report"])
        out = tmp_path / "dpo.jsonl"
        p = cli(gov, "export", "--format", "trl-dpo", "--out", str(out))
        assert p.returncode == 0, p.stderr
        assert r.text == out.read_text() and rep == json.loads(p.stdout)
        rows = [json.loads(x) for x in r.text.splitlines()]
        assert any(x["chosen"][0]["content"] == "Sure: [EMAIL]." for x in rows)
        assert "eve@example.org" not in r.text and rep["redacted"]["email"] >= 1
        # A future `since` leaves nothing; bad parameters are 400s naming them.
        r = c.get("/v1/admin/export", params={"format": "trl-dpo", "since": "2999-01-01"}, headers=admin)
        assert r.status_code == 200 and r.text == ""
        for params, name in (({"format": "csv"}, "format"), ({}, "format"),
                             ({"format": "trl-dpo", "since": "soon"}, "since"),
                             ({"format": "trl-dpo", "limit": "3"}, "limit")):
            r = c.get("/v1/admin/export", params=params, headers=admin)
            assert r.status_code == 400 and r.json()["error"]["param"] == name, (params, r.text)
        audit = c.get("/v1/admin/audit", headers=admin).json()["data"]
        # Three exports ran (the refused ones did not): each is audited, with its actor.
        assert [(e["action"], e["actor"]) for e in audit[-3:]] == [
            ("training_export", "admin-api"), ("training_export", "cli"), ("training_export", "admin-api")]
