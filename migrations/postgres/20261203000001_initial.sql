-- The whole schema of the PostgreSQL run store: what the SQLite migrations build, in one step.
--
-- Times are milliseconds since the Unix epoch (BIGINT), read through the store's clock, never
-- the server's. Money is whole micro-dollars (BIGINT), so sums are exact. JSON is kept as the
-- text it was written as (TEXT), so values read back exactly as they were stored (no key
-- reordering or number normalisation as JSONB would do). Every integer is BIGINT: the store
-- reads each as an i64. Ids, queues, statuses and the other names the store compares or orders
-- by use the "C" collation: byte order, as SQLite compares text (run ids, UUIDv7, then sort by
-- creation time whatever the database's locale).

-- Runs, their stages (with checkpoints), memoised steps and the event log.
CREATE TABLE runs (
    id               TEXT COLLATE "C" PRIMARY KEY,
    kind             TEXT COLLATE "C" NOT NULL,
    name             TEXT COLLATE "C" NOT NULL,
    queue            TEXT COLLATE "C" NOT NULL,
    inputs           TEXT NOT NULL,
    -- the string and number values of the inputs, one per line (never a key): what the input
    -- search matches, case-insensitively (ILIKE, a scan); written by the store with `inputs`
    search_text      TEXT NOT NULL DEFAULT '',
    status           TEXT COLLATE "C" NOT NULL,
    provider_mode    TEXT NOT NULL,
    budget_micros    BIGINT,
    cost_micros      BIGINT NOT NULL DEFAULT 0,
    current_stage    TEXT,
    result           TEXT,
    error            TEXT,
    -- the code of the run's error, for the listing's filter and its index
    error_code       TEXT GENERATED ALWAYS AS ((error::jsonb) ->> 'code') STORED,
    -- when a queued or retrying run may be claimed
    available_at     BIGINT NOT NULL,
    -- the lease: owner, expiry and fencing token (grows with every claim)
    lease_owner      TEXT,
    lease_expires_at BIGINT,
    fence            BIGINT NOT NULL DEFAULT 0,
    -- the worker that last executed the run, kept after the lease ends
    worker           TEXT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    -- whether stages may reuse earlier runs' checkpoints
    reuse            BOOLEAN NOT NULL DEFAULT FALSE,
    idempotency_key  TEXT UNIQUE,
    -- a fingerprint of the request the idempotency key was first used with
    idempotency_hash TEXT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    finished_at      BIGINT
);

-- Claims (due runs of a queue, oldest first), sweeps (expired leases) and purges (finished runs).
CREATE INDEX runs_due ON runs (queue, status, available_at);
CREATE INDEX runs_leases ON runs (status, lease_expires_at);
CREATE INDEX runs_finished ON runs (finished_at) WHERE finished_at IS NOT NULL;

-- The run list at scale: a page filtered by status, kind, name, queue or error code (alone or
-- with a time range, which is a range of run ids), or by status with kind or name, is an index
-- range scan, newest first.
CREATE INDEX runs_status_id ON runs (status, id);
CREATE INDEX runs_status_kind_id ON runs (status, kind, id);
CREATE INDEX runs_status_name_id ON runs (status, name, id);
CREATE INDEX runs_kind_id ON runs (kind, id);
CREATE INDEX runs_name_id ON runs (name, id);
CREATE INDEX runs_queue_id ON runs (queue, id);
CREATE INDEX runs_error_code ON runs (error_code, id) WHERE error_code IS NOT NULL;

CREATE TABLE stages (
    run_id          TEXT COLLATE "C" NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    idx             BIGINT NOT NULL,
    name            TEXT NOT NULL,
    status          TEXT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    started_at      BIGINT,
    finished_at     BIGINT,
    cost_micros     BIGINT NOT NULL DEFAULT 0,
    artifacts       TEXT NOT NULL DEFAULT '[]',
    output          TEXT,
    error           TEXT,
    progress_done   BIGINT,
    progress_total  BIGINT,
    next_attempt_at BIGINT,
    -- the run a reused checkpoint came from
    reused_from     TEXT,
    PRIMARY KEY (run_id, idx)
);

CREATE TABLE steps (
    run_id      TEXT COLLATE "C" NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    stage_idx   BIGINT NOT NULL,
    key         TEXT NOT NULL,
    output      TEXT NOT NULL,
    cost_micros BIGINT NOT NULL DEFAULT 0,
    artifacts   TEXT NOT NULL DEFAULT '[]',
    created_at  BIGINT NOT NULL,
    -- the order steps were recorded in, for steps of the same millisecond
    seq         BIGINT GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (run_id, stage_idx, key)
);

-- Sequence numbers grow with every event of the store and are never reused. Every write that
-- appends an event first updates (and so locks) its run's row, so the events of one run are
-- committed in the order of their numbers.
CREATE TABLE events (
    seq    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id TEXT COLLATE "C" NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    at     BIGINT NOT NULL,
    kind   TEXT NOT NULL,
    stage  TEXT,
    data   TEXT NOT NULL DEFAULT '{}'
);

CREATE INDEX events_run ON events (run_id, seq);

-- Live worker processes (for GET /workers and `stagecraft inspect workers`) and cluster-wide
-- counters that workers flush periodically (for GET /metrics).
CREATE TABLE workers (
    id           TEXT COLLATE "C" PRIMARY KEY,
    queues       TEXT NOT NULL,
    concurrency  BIGINT NOT NULL,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    running      TEXT NOT NULL DEFAULT '[]'
);

CREATE TABLE counters (
    name  TEXT COLLATE "C" PRIMARY KEY,
    value DOUBLE PRECISION NOT NULL DEFAULT 0
);

-- Checkpoints that later runs may reuse, by the hash of what produced them. Deleted with their
-- run (retention).
CREATE TABLE reusable (
    key        TEXT COLLATE "C" PRIMARY KEY,
    run_id     TEXT COLLATE "C" NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    stage      TEXT NOT NULL,
    output     TEXT NOT NULL,
    artifacts  TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX reusable_run ON reusable (run_id);

-- Finished runs per queue and minute, by outcome: the console's throughput history. Minutes
-- older than a day and an hour are deleted as new ones are added.
CREATE TABLE throughput (
    queue     TEXT COLLATE "C" NOT NULL,
    minute    BIGINT NOT NULL,
    completed BIGINT NOT NULL DEFAULT 0,
    failed    BIGINT NOT NULL DEFAULT 0,
    cancelled BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, minute)
);
