-- Retention: settings (retention windows per kind) and legal holds that exempt a
-- subject's data from automatic purge.

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE legal_holds (
    tenant  TEXT NOT NULL,
    subject TEXT NOT NULL,
    at_ms   BIGINT NOT NULL,
    PRIMARY KEY (tenant, subject)
);
