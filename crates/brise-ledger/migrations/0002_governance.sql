-- Governance: an append-only, hash-chained audit log of admin actions, and standing
-- objections to training use per subject.

CREATE TABLE audit_log (
    seq       BIGINT PRIMARY KEY,
    at_ms     BIGINT NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    details   TEXT NOT NULL,   -- JSON
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);

CREATE TABLE objections (
    tenant  TEXT NOT NULL,
    subject TEXT NOT NULL,
    at_ms   BIGINT NOT NULL,
    PRIMARY KEY (tenant, subject)
);
