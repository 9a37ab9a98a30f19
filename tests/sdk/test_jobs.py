"""The files and fine-tuning jobs API with the official SDKs: upload, create a job, watch
its events and metrics, use the fine-tuned model by its name, cancel, and the errors.

The training data is a small house-style SFT set built from learning_prompts.json
(hand-written questions; the answers are fixed text): training here checks the API and
the runner, not what is learned (test_learning.py does that).
"""

from __future__ import annotations

import io
import json
import time

import httpx
import openai
import pytest

from conftest import MODEL, BriseServer

HERE = __import__("pathlib").Path(__file__).resolve().parent
PROMPTS = json.loads((HERE / "learning_prompts.json").read_text())
JOB_TIMEOUT = 900  # a job trains at nice 10 on one thread, then the gate generates on held-out prompts


def sft_rows(qs):
    return [{"messages": [{"role": "user", "content": q},
                          {"role": "assistant", "content": "Ahoy! A fine question. Fair winds, Brise."}]}
            for q in qs]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    d = tmp_path_factory.mktemp("jobs")
    s = BriseServer(d / "serve.log", ["--api-key", "acme=key-a", "--api-key", "other=key-b",
                                      "--admin-key", "adm", "--learn-threads", "2",
                                      "--learn-dir", str(d / "adapters")])
    s.wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="key-a", max_retries=0)


def wait_for(oai, job_id, statuses, timeout=JOB_TIMEOUT):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        j = oai.fine_tuning.jobs.retrieve(job_id)
        if j.status in statuses:
            return j
        time.sleep(0.5)
    pytest.fail(f"job {job_id} still {j.status} after {timeout} s")


def test_files_round_trip_and_errors(srv, oai):
    data = jsonl(sft_rows(PROMPTS["train"][:4]))
    f = oai.files.create(file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune")
    assert f.object == "file" and f.purpose == "fine-tune" and f.bytes == len(data)
    assert f.filename == "train.jsonl" and f.id.startswith("file-")
    assert oai.files.retrieve(f.id).bytes == len(data)
    assert oai.files.content(f.id).content == data
    assert f.id in [x.id for x in oai.files.list()]
    # Another tenant sees nothing of it.
    other = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="key-b", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(f.id)
    assert f.id not in [x.id for x in other.files.list()]
    # A line that is not JSON is refused, naming it.
    with pytest.raises(openai.BadRequestError) as e:
        oai.files.create(file=("bad.jsonl", io.BytesIO(data + b"{oops\n")), purpose="fine-tune")
    assert "line 5 is not JSON" in e.value.message
    # Issue 21: over --max-body (8 MiB) is a 413, not a 400 "Error parsing multipart".
    line = json.dumps(sft_rows(["x" * 1000])[0]).encode() + b"\n"
    with pytest.raises(openai.APIStatusError) as e:
        oai.files.create(file=("big.jsonl", io.BytesIO(line * 9000)), purpose="fine-tune")
    assert e.value.status_code == 413 and "--max-body" in e.value.message, e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.files.create(file=("x.jsonl", io.BytesIO(data)), purpose="batch")
    assert "fine-tune" in e.value.message
    d = oai.files.delete(f.id)
    assert d.deleted and d.id == f.id
    with pytest.raises(openai.NotFoundError):
        oai.files.content(f.id)


def test_job_errors_are_clear(oai):
    f = oai.files.create(file=("t.jsonl", io.BytesIO(jsonl(sft_rows(PROMPTS["train"][:4])))), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as e:
        oai.fine_tuning.jobs.create(model=MODEL, training_file=f.id, hyperparameters={"n_epochz": 2})
    assert e.value.param == "hyperparameters.n_epochz" and "unknown hyperparameter" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.fine_tuning.jobs.create(model=MODEL, training_file="file-nope")
    assert e.value.param == "training_file" and "file-nope" in e.value.message
    with pytest.raises(openai.NotFoundError):
        oai.fine_tuning.jobs.create(model="no-such-model", training_file=f.id)
    with pytest.raises(openai.BadRequestError) as e:
        oai.fine_tuning.jobs.create(model=MODEL, training_file=f.id, method={"type": "dpo"})
    assert "sft data, not dpo" in e.value.message
    # A file whose rows are no known format fails at creation, not later.
    g = oai.files.create(file=("g.jsonl", io.BytesIO(b'{"text": "hello"}\n')), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as e:
        oai.fine_tuning.jobs.create(model=MODEL, training_file=g.id)
    assert "none of the known formats" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.fine_tuning.jobs.create(model=MODEL, training_file=f.id, hyperparameters={"n_epochs": 0})
    assert e.value.param == "hyperparameters.n_epochs"
    # Two names of one setting are refused, not one silently winning.
    with pytest.raises(openai.BadRequestError) as e:
        oai.fine_tuning.jobs.create(model=MODEL, training_file=f.id,
                                    hyperparameters={"learning_rate": 1e-4, "learning_rate_multiplier": 2})
    assert "set the same thing" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.fine_tuning.jobs.create(model=MODEL, training_file=f.id, hyperparameters={"n_epochs": 1},
                                    method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}})
    assert "set the same thing" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.fine_tuning.jobs.create(model=MODEL, training_file=f.id,
                                    method={"type": "supervised", "dpo": {"hyperparameters": {"beta": 0.2}}})
    assert e.value.param == "method.dpo"
    with pytest.raises(openai.BadRequestError) as e:
        oai.fine_tuning.jobs.create(model=MODEL, training_file=f.id, metadata={"k": 5})
    assert e.value.param == "metadata"


def test_job_limits_and_the_tenant_quota(srv, oai):
    """Issue 21: jobs had no limits (training_steps 1e9, rank 1024, seq_len 1e6 and 100
    epochs were accepted) and one tenant could fill the queue."""
    f = oai.files.create(file=("t.jsonl", io.BytesIO(jsonl(sft_rows(PROMPTS["train"][:4])))), purpose="fine-tune")
    for k, v, limit in [("training_steps", 1e9, "10000"), ("lora_rank", 1024, "64"), ("lora_r", 65, "64"),
                        ("seq_len", 1e6, "4096"), ("n_epochs", 100, "20"), ("batch_size", 1024, "64"),
                        ("lora_alpha", 1e308, "1024")]:
        with pytest.raises(openai.BadRequestError) as e:
            oai.fine_tuning.jobs.create(model=MODEL, training_file=f.id, hyperparameters={k: v})
        assert e.value.param == f"hyperparameters.{k}" and limit in e.value.message, (k, e.value.message)
    # Epochs over a large file: too many steps, unless training_steps says fewer.
    big = oai.files.create(file=("big.jsonl", io.BytesIO(jsonl(sft_rows(PROMPTS["train"] * 60)[:600]))),
                           purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as e:
        oai.fine_tuning.jobs.create(model=MODEL, training_file=big.id,
                                    hyperparameters={"n_epochs": 20, "batch_size": 1})
    assert e.value.param == "hyperparameters.n_epochs" and "12000 steps" in e.value.message, e.value.message
    # At most two jobs queued or running per tenant; another tenant is not held back.
    other = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="key-b", max_retries=0)
    g = other.files.create(file=("t.jsonl", io.BytesIO(jsonl(sft_rows(PROMPTS["train"][:4])))), purpose="fine-tune")
    jobs = [other.fine_tuning.jobs.create(model=MODEL, training_file=g.id) for _ in range(2)]
    try:
        with pytest.raises(openai.RateLimitError) as e:
            other.fine_tuning.jobs.create(model=MODEL, training_file=g.id)
        assert "2 fine-tuning jobs queued or running" in e.value.message
        j = oai.fine_tuning.jobs.create(model=MODEL, training_file=f.id, hyperparameters={"n_epochs": 1})
        oai.fine_tuning.jobs.cancel(j.id)
    finally:
        for j in jobs:
            other.fine_tuning.jobs.cancel(j.id)
    for j in jobs:
        wait_for(other, j.id, ("cancelled", "succeeded", "failed"), timeout=60)
    other.fine_tuning.jobs.cancel(other.fine_tuning.jobs.create(model=MODEL, training_file=g.id).id)


def test_lora_alpha_is_not_overwritten_by_the_rank(oai):
    f = oai.files.create(file=("t.jsonl", io.BytesIO(jsonl(sft_rows(PROMPTS["train"][:4])))), purpose="fine-tune")
    j = oai.fine_tuning.jobs.create(model=MODEL, training_file=f.id,
                                    hyperparameters={"lora_alpha": 32, "lora_rank": 8, "n_epochs": 1})
    oai.fine_tuning.jobs.cancel(j.id)
    cfg = oai.fine_tuning.jobs.retrieve(j.id).model_extra["brise"]["config"]
    assert (cfg["rank"], cfg["alpha"]) == (8, 32)


def test_a_job_trains_a_model_served_by_its_name(srv, oai):
    train = oai.files.create(file=("train.jsonl", io.BytesIO(jsonl(sft_rows(PROMPTS["train"][:16])))),
                             purpose="fine-tune")
    val = oai.files.create(file=("val.jsonl", io.BytesIO(jsonl(sft_rows(PROMPTS["held_out"][:4])))),
                           purpose="fine-tune")
    job = oai.fine_tuning.jobs.create(model=MODEL, training_file=train.id, validation_file=val.id,
                                      hyperparameters={"n_epochs": 2, "batch_size": 4}, suffix="house",
                                      seed=7)
    assert job.object == "fine_tuning.job" and job.status in ("queued", "running")
    assert job.training_file == train.id and job.validation_file == val.id
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 4
    assert job.seed == 7 and job.organization_id == "acme"
    done = wait_for(oai, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model and done.fine_tuned_model.startswith(MODEL + ":")
    assert done.finished_at and done.trained_tokens and done.trained_tokens > 0

    events = oai.fine_tuning.jobs.list_events(job.id, limit=1000).data
    assert events[0].created_at >= events[-1].created_at, "newest first, as OpenAI lists them"
    metrics = [e for e in events if e.type == "metrics"]
    # 16 examples, batch 4, 2 epochs: 8 optimizer steps, each with its loss.
    assert sorted(e.data["step"] for e in metrics) == list(range(1, 9))
    assert all(e.data["total_steps"] == 8 and e.data["train_loss"] > 0 for e in metrics)
    msgs = [e.message for e in events if e.type == "message"]
    assert any("Fine-tuning job started" in m for m in msgs)
    assert any("evaluating on 4 from the validation file" in m for m in msgs)
    assert any(m.startswith("New fine-tuned model created: " + done.fine_tuned_model) for m in msgs)
    # Paging with `after`, and brise's `order=asc` (oldest first, for loss curves).
    page = oai.fine_tuning.jobs.list_events(job.id, limit=2)
    assert len(page.data) == 2 and page.has_more
    nxt = oai.fine_tuning.jobs.list_events(job.id, limit=2, after=page.data[-1].id)
    assert nxt.data[0].id == events[2].id
    r = httpx.get(f"{srv.url}/v1/fine_tuning/jobs/{job.id}/events", params={"order": "asc", "limit": 1000},
                  headers={"Authorization": "Bearer key-a"}, timeout=30, trust_env=False)
    assert [e["id"] for e in r.json()["data"]] == [e.id for e in reversed(events)]

    # The result is a registry version (a candidate), served at once by its name.
    c = oai.chat.completions.create(model=done.fine_tuned_model, temperature=0, max_tokens=16,
                                    messages=[{"role": "user", "content": PROMPTS["held_out"][5]}])
    assert c.model == done.fine_tuned_model
    assert done.fine_tuned_model in [m.id for m in oai.models.list()]
    version = done.fine_tuned_model.split(":")[-1]
    a = httpx.get(f"{srv.url}/v1/admin/adapters/{version}", headers={"Authorization": "Bearer adm"},
                  timeout=30, trust_env=False).json()
    assert a["status"] in ("candidate", "rejected"), a
    assert a["created_by"] == f"fine-tuning job {job.id}"
    assert a["eval_report"] is not None
    # The plain name still serves the base model: jobs do not promote.
    plain = oai.chat.completions.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert plain.model == MODEL

    # Listed for its tenant, not for another one; nor is the model it made.
    assert job.id in [j.id for j in oai.fine_tuning.jobs.list()]
    assert job.id in [j.id for j in oai.fine_tuning.jobs.list(extra_query={"status": "succeeded"})]
    assert job.id not in [j.id for j in oai.fine_tuning.jobs.list(extra_query={"status": "failed"})]
    other = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="key-b", max_retries=0)
    assert job.id not in [j.id for j in other.fine_tuning.jobs.list()]
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(job.id)
    assert done.fine_tuned_model not in [m.id for m in other.models.list()]
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model=done.fine_tuned_model, max_tokens=4,
                                      messages=[{"role": "user", "content": "Hi"}])


def test_cancel_a_running_and_a_queued_job(oai):
    f = oai.files.create(file=("t.jsonl", io.BytesIO(jsonl(sft_rows(PROMPTS["train"][:8])))), purpose="fine-tune")
    long = oai.fine_tuning.jobs.create(model=MODEL, training_file=f.id,
                                       hyperparameters={"n_epochs": 20, "batch_size": 1})
    queued = oai.fine_tuning.jobs.create(model=MODEL, training_file=f.id)
    running = wait_for(oai, long.id, ("running",), timeout=60)
    # The queued one cancels at once and never runs.
    q = oai.fine_tuning.jobs.cancel(queued.id)
    assert q.status == "cancelled"
    # Wait for a step or two, then cancel the running one: it stops at its next step.
    t0 = time.monotonic()
    while not any(e.type == "metrics" for e in oai.fine_tuning.jobs.list_events(long.id, limit=5).data):
        assert time.monotonic() - t0 < 60, "no training step within 60 s"
        time.sleep(0.3)
    oai.fine_tuning.jobs.cancel(running.id)
    done = wait_for(oai, long.id, ("cancelled", "succeeded", "failed"), timeout=60)
    assert done.status == "cancelled" and done.fine_tuned_model is None
    msgs = [e.message for e in oai.fine_tuning.jobs.list_events(long.id, limit=1000).data]
    assert any("Cancellation requested by tenant acme" in m for m in msgs)
    assert not any("started" in e.message for e in oai.fine_tuning.jobs.list_events(queued.id, limit=100).data)


def test_mistral_shaped_job(srv):
    from mistralai.client import Mistral

    client = Mistral(api_key="key-a", server_url=srv.url)
    data = jsonl(sft_rows(PROMPTS["train"][:4]))
    up = client.files.upload(file={"file_name": "m.jsonl", "content": data}, purpose="fine-tune")
    assert up.size_bytes == len(data) and up.num_lines == 4 and up.purpose == "fine-tune"
    assert any(x.id == up.id for x in client.files.list().data)
    # mistralai's SDK has no fine-tuning jobs any more: Mistral's JSON shape, over HTTP.
    h = {"Authorization": "Bearer key-a"}
    with httpx.Client(base_url=srv.url, headers=h, timeout=60, trust_env=False) as c:
        r = c.post("/v1/fine_tuning/jobs", json={
            "model": MODEL, "training_files": [{"file_id": up.id, "weight": 1}],
            "hyperparameters": {"training_steps": 2, "learning_rate": 1e-4}, "auto_start": True})
        assert r.status_code == 200, r.text
        j = r.json()
        assert j["object"] == "job" and j["status"] in ("QUEUED", "RUNNING") and j["auto_start"] is True
        assert j["training_files"] == [up.id] and j["hyperparameters"]["training_steps"] == 2
        t0 = time.monotonic()
        while j["status"] in ("QUEUED", "RUNNING"):
            assert time.monotonic() - t0 < JOB_TIMEOUT
            time.sleep(0.5)
            j = c.get(f"/v1/fine_tuning/jobs/{j['id']}").json()
        assert j["status"] == "SUCCESS", j
        assert [k["step_number"] for k in j["checkpoints"]] == [1, 2]
        assert all(k["metrics"]["train_loss"] > 0 for k in j["checkpoints"])
        assert j["fine_tuned_model"].startswith(MODEL + ":")
        assert any("Fine-tuning job started" in e["data"]["message"] for e in j["events"])
        # Mistral-style validation errors: 422 with FastAPI's detail.
        r = c.post("/v1/fine_tuning/jobs", json={
            "model": MODEL, "training_files": [{"file_id": up.id, "weight": 0.5}]})
        assert r.status_code == 422 and "weight" in json.dumps(r.json()["detail"])
        lst = c.get("/v1/fine_tuning/jobs", params={"page": 0, "page_size": 100}).json()
        assert lst["total"] >= 1 and all(x["object"] == "job" for x in lst["data"])


def test_a_shutdown_fails_the_running_job_and_says_why(tmp_path):
    s = BriseServer(tmp_path / "serve.log", ["--learn-dir", str(tmp_path / "adapters")])
    s.wait_ready()
    c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0)
    try:
        f = c.files.create(file=("t.jsonl", io.BytesIO(jsonl(sft_rows(PROMPTS["train"][:8])))), purpose="fine-tune")
        j = c.fine_tuning.jobs.create(model=MODEL, training_file=f.id,
                                      hyperparameters={"n_epochs": 20, "batch_size": 1})
        wait_for(c, j.id, ("running",), timeout=60)
    finally:
        s.stop()  # asserts a graceful exit within its timeout
    [(status, error)] = s.sql("SELECT status, error FROM fine_tuning_jobs WHERE id = ?", (j.id,))
    assert (status, error) == ("failed", "the server shut down before the job finished")
