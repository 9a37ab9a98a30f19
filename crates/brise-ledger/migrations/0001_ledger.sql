-- The record of each completion, and the feedback on it. Portable SQL: the same
-- statements run on SQLite (embedded default) and PostgreSQL.

CREATE TABLE completions (
    id                TEXT PRIMARY KEY,
    created_at_ms     BIGINT NOT NULL,
    tenant            TEXT NOT NULL,
    subject           TEXT,
    model             TEXT NOT NULL,
    model_sha256      TEXT,
    adapter           TEXT,
    endpoint          TEXT NOT NULL,
    params            TEXT NOT NULL,   -- JSON: the request's generation parameters
    messages          TEXT NOT NULL,   -- JSON: the prompt (messages, or a completion prompt)
    output            TEXT NOT NULL,   -- JSON: a list of choices {text, tool_calls, finish_reason}
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    ttft_ms           DOUBLE PRECISION,
    latency_ms        DOUBLE PRECISION NOT NULL,
    status            TEXT NOT NULL,   -- ok | error
    error             TEXT,
    training_consent  BOOLEAN NOT NULL,
    content_level     TEXT NOT NULL    -- full | redacted | metadata
);
CREATE INDEX completions_tenant_subject ON completions (tenant, subject);
CREATE INDEX completions_created ON completions (created_at_ms);

CREATE TABLE feedback (
    id            TEXT PRIMARY KEY,
    created_at_ms BIGINT NOT NULL,
    tenant        TEXT NOT NULL,
    completion_id TEXT NOT NULL REFERENCES completions (id) ON DELETE CASCADE,
    kind          TEXT NOT NULL,       -- rating | preference
    rating        BIGINT,              -- -1 / +1 (thumbs) or 1..5
    correction    TEXT,
    comment       TEXT,
    tags          TEXT,                -- JSON list of strings
    rejected_id   TEXT REFERENCES completions (id) ON DELETE CASCADE
);
CREATE INDEX feedback_completion ON feedback (completion_id);
