-- Files uploaded for fine-tuning (`POST /v1/files`) and fine-tuning jobs with their
-- events. A file's content is kept here, in the ledger, so that every server sharing
-- the ledger can run a job on it; deleting the file clears the content.

CREATE TABLE files (
    id            TEXT PRIMARY KEY,            -- file-<hex>
    tenant        TEXT NOT NULL,
    filename      TEXT NOT NULL,
    purpose       TEXT NOT NULL,               -- fine-tune
    bytes         BIGINT NOT NULL,
    sha256        TEXT NOT NULL,
    lines         BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    content       TEXT                          -- NULL once deleted
);
CREATE INDEX files_tenant ON files (tenant, created_at_ms);

CREATE TABLE fine_tuning_jobs (
    id              TEXT PRIMARY KEY,          -- ftjob-<hex>
    tenant          TEXT NOT NULL,
    model           TEXT NOT NULL,             -- the served model's id
    source          TEXT NOT NULL,             -- files | ledger
    training_file   TEXT,
    validation_file TEXT,
    method          TEXT NOT NULL,             -- sft | dpo | kto | auto
    config          TEXT NOT NULL,             -- JSON: the trainer's configuration
    request         TEXT NOT NULL,             -- JSON: what the client asked, as given
    dialect         TEXT NOT NULL,             -- openai | mistral: the shape of its answers
    suffix          TEXT,
    promote         BIGINT NOT NULL,           -- 1: promote when the gate passes
    created_by      TEXT NOT NULL,
    status          TEXT NOT NULL,             -- queued | running | succeeded | failed | cancelled
    created_at_ms   BIGINT NOT NULL,
    started_at_ms   BIGINT,
    finished_at_ms  BIGINT,
    runner          TEXT,                      -- the server running it
    heartbeat_ms    BIGINT,                    -- its runner's last sign of life (a lease)
    cancel_requested BIGINT NOT NULL,
    error           TEXT,
    adapter_version TEXT,                      -- the registered version
    trained_tokens  BIGINT,
    metrics         TEXT                       -- JSON: the last step and the gate's summary
);
CREATE INDEX fine_tuning_jobs_status ON fine_tuning_jobs (status, created_at_ms);
-- At most one job of the servers' own (--learn, tenant '') queued or running per model,
-- however many servers share the ledger.
CREATE UNIQUE INDEX fine_tuning_jobs_one_learn ON fine_tuning_jobs (model)
    WHERE tenant = '' AND status IN ('queued', 'running');
CREATE INDEX fine_tuning_jobs_version ON fine_tuning_jobs (adapter_version);

CREATE TABLE fine_tuning_events (
    job_id        TEXT NOT NULL REFERENCES fine_tuning_jobs (id),
    seq           BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    level         TEXT NOT NULL,               -- info | warn | error
    kind          TEXT NOT NULL,               -- message | metrics
    message       TEXT NOT NULL,
    data          TEXT,                        -- JSON (metrics: step, total_steps, train_loss, …)
    PRIMARY KEY (job_id, seq)
);
