-- Runs, their stages (with checkpoints), memoised steps and the event log.
-- Times are milliseconds since the Unix epoch.

CREATE TABLE runs (
    id               TEXT PRIMARY KEY,
    kind             TEXT NOT NULL,
    name             TEXT NOT NULL,
    queue            TEXT NOT NULL,
    inputs           TEXT NOT NULL,
    status           TEXT NOT NULL,
    provider_mode    TEXT NOT NULL,
    budget_usd       REAL,
    cost_usd         REAL NOT NULL DEFAULT 0,
    current_stage    TEXT,
    result           TEXT,
    error            TEXT,
    -- when a queued or retrying run may be claimed
    available_at     INTEGER NOT NULL,
    -- the lease: owner, expiry and fencing token (grows with every claim)
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    fence            INTEGER NOT NULL DEFAULT 0,
    -- the worker that last executed the run, kept after the lease ends
    worker           TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    idempotency_key  TEXT UNIQUE,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    finished_at      INTEGER
);

CREATE INDEX runs_due ON runs (queue, status, available_at);
CREATE INDEX runs_leases ON runs (status, lease_expires_at);
CREATE INDEX runs_finished ON runs (finished_at);
CREATE INDEX runs_name ON runs (name);

CREATE TABLE stages (
    run_id          TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    idx             INTEGER NOT NULL,
    name            TEXT NOT NULL,
    status          TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    started_at      INTEGER,
    finished_at     INTEGER,
    cost_usd        REAL NOT NULL DEFAULT 0,
    artifacts       TEXT NOT NULL DEFAULT '[]',
    output          TEXT,
    error           TEXT,
    progress_done   INTEGER,
    progress_total  INTEGER,
    next_attempt_at INTEGER,
    PRIMARY KEY (run_id, idx)
);

CREATE TABLE steps (
    run_id     TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    stage_idx  INTEGER NOT NULL,
    key        TEXT NOT NULL,
    output     TEXT NOT NULL,
    cost_usd   REAL NOT NULL DEFAULT 0,
    artifacts  TEXT NOT NULL DEFAULT '[]',
    created_at INTEGER NOT NULL,
    PRIMARY KEY (run_id, stage_idx, key)
);

CREATE TABLE events (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    at     INTEGER NOT NULL,
    kind   TEXT NOT NULL,
    stage  TEXT,
    data   TEXT NOT NULL DEFAULT '{}'
);

CREATE INDEX events_run ON events (run_id, seq);
