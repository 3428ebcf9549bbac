-- The run list's input search (`search_text ILIKE '%text%'`) from a table of its own, as
-- SQLite's from its FTS5 table: written when a run is submitted (and when a resume changes its
-- inputs), never by the claims, starts and commits that rewrite a run's row, so the search's
-- index costs the queue nothing.
-- No run is submitted while the search text moves (a process of the previous version, which
-- still writes `runs.search_text`, waits for the lock and then fails on the dropped column,
-- instead of leaving a run the search never finds).
LOCK TABLE runs IN SHARE ROW EXCLUSIVE MODE;
CREATE TABLE run_search (
    run_id      TEXT COLLATE "C" PRIMARY KEY REFERENCES runs (id) ON DELETE CASCADE,
    search_text TEXT NOT NULL
);
INSERT INTO run_search (run_id, search_text) SELECT id, search_text FROM runs;
ALTER TABLE runs DROP COLUMN search_text;

-- A trigram index, without which a search reads every run. `pg_trgm` ships with PostgreSQL and
-- is trusted (a database owner may create it), but a server may lack it (undefined_file), a
-- role its privilege (insufficient_privilege), or the extension may live in a schema not on
-- the search path (undefined_object): then the search scans, as before, and nothing else
-- changes. Any other failure fails the migration.
DO $$
BEGIN
    CREATE EXTENSION IF NOT EXISTS pg_trgm;
    CREATE INDEX run_search_text ON run_search USING gin (search_text gin_trgm_ops);
EXCEPTION WHEN undefined_file OR insufficient_privilege OR undefined_object
    OR feature_not_supported THEN
    RAISE NOTICE 'no trigram index for the input search (%): it scans the runs', SQLERRM;
END
$$;
