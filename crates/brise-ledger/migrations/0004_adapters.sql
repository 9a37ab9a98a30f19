-- The registry of adapter versions: each LoRA adapter trained (or brought in) for a
-- model, with its lineage (parent version, method, hyperparameters, dataset hash, the
-- records and feedback it was trained on, its eval report) and its status. Exactly one
-- version per model is promoted at a time (the partial unique index); the promotions
-- and rollbacks of each model are kept in order in adapter_history.

CREATE TABLE adapter_versions (
    id             TEXT PRIMARY KEY,          -- readable: smollm2-135m-v3
    model          TEXT NOT NULL,             -- the served model's id
    version        BIGINT NOT NULL,           -- 1, 2, … per model
    path           TEXT NOT NULL,             -- the PEFT directory
    parent_id      TEXT REFERENCES adapter_versions (id), -- serving when it was trained; NULL: the base
    created_at_ms  BIGINT NOT NULL,
    created_by     TEXT NOT NULL,
    method         TEXT NOT NULL,             -- sft | dpo | kto | other
    config         TEXT NOT NULL,             -- JSON: hyperparameters
    dataset_sha256 TEXT,
    eval_report    TEXT,                      -- JSON
    status         TEXT NOT NULL,             -- candidate | promoted | retired | rejected
    status_reason  TEXT,                      -- why it was rejected
    promoted_by    TEXT,
    promoted_at_ms BIGINT,
    tainted_at_ms  BIGINT,                    -- trained on data since erased
    tainted_reason TEXT,
    UNIQUE (model, version)
);
CREATE UNIQUE INDEX adapter_versions_one_promoted ON adapter_versions (model) WHERE status = 'promoted';

-- The completion records and feedback items each version was trained on, one row per
-- id, so that erasure finds the versions by a join.
CREATE TABLE adapter_training_data (
    version_id TEXT NOT NULL REFERENCES adapter_versions (id),
    kind       TEXT NOT NULL,                 -- record | feedback
    item_id    TEXT NOT NULL,
    PRIMARY KEY (version_id, kind, item_id)
);
CREATE INDEX adapter_training_data_item ON adapter_training_data (kind, item_id);

CREATE TABLE adapter_history (
    model      TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    at_ms      BIGINT NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,                 -- promote | rollback
    version_id TEXT,                          -- serving after it; NULL: the base
    PRIMARY KEY (model, seq)
);
