-- The models a server has answered with: the id completions are recorded under, the
-- file or directory it was loaded from, its sha256 and its known name. `brise train
-- --from-ledger`, `brise eval` and the registry find a model's file here, however it
-- was served (a known name, a GGUF path, a Hugging Face directory).

CREATE TABLE served_models (
    id            TEXT NOT NULL,              -- completions.model
    path          TEXT NOT NULL,              -- absolute path of the .gguf file or HF directory
    sha256        TEXT,                       -- of the file (a directory: of its files' hashes); NULL until computed
    known_name    TEXT,                       -- `brise pull`'s name, when it is a known model
    first_seen_ms BIGINT NOT NULL,
    last_seen_ms  BIGINT NOT NULL,
    PRIMARY KEY (id, path)
);
CREATE INDEX served_models_sha256 ON served_models (sha256);
