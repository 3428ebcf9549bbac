-- Reuse across runs: a run may take a stage's checkpoint from an earlier run whose stage had the
-- same inputs and agent versions (`reuse: true` on submit).

ALTER TABLE runs ADD COLUMN reuse INTEGER NOT NULL DEFAULT 0;
-- the run a reused checkpoint came from
ALTER TABLE stages ADD COLUMN reused_from TEXT;

-- Checkpoints that later runs may reuse, by the hash of what produced them. Deleted with their
-- run (retention).
CREATE TABLE reusable (
    key        TEXT PRIMARY KEY,
    run_id     TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    stage      TEXT NOT NULL,
    output     TEXT NOT NULL,
    artifacts  TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX reusable_run ON reusable (run_id);
