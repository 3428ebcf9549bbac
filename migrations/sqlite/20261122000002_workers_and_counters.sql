-- Live worker processes (for GET /workers and `stagecraft inspect workers`) and cluster-wide
-- counters that workers flush periodically (for GET /metrics).

CREATE TABLE workers (
    id           TEXT PRIMARY KEY,
    queues       TEXT NOT NULL,
    concurrency  INTEGER NOT NULL,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL,
    running      TEXT NOT NULL DEFAULT '[]'
);

CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value REAL NOT NULL DEFAULT 0
);
