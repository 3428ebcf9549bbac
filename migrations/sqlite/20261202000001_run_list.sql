-- The run list at scale: a page filtered by status, kind, name, queue or error code (alone or
-- with a time range, which is a range of run ids), or by status with kind or name, is an index
-- range scan, newest first.
DROP INDEX runs_name;
CREATE INDEX runs_status_id ON runs (status, id);
CREATE INDEX runs_status_kind_id ON runs (status, kind, id);
CREATE INDEX runs_status_name_id ON runs (status, name, id);
CREATE INDEX runs_kind_id ON runs (kind, id);
CREATE INDEX runs_name_id ON runs (name, id);
CREATE INDEX runs_queue_id ON runs (queue, id);
CREATE INDEX runs_error_code ON runs (json_extract(error, '$.code'), id) WHERE error IS NOT NULL;

-- Input search: the string and number values of each run's inputs, one per line, indexed by
-- trigrams (a search for any three or more characters of a value is an index lookup). The
-- words live in `run_search`, whose integer key survives VACUUM; the index is its external
-- content table.
CREATE TABLE run_search (
    rowid  INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL UNIQUE,
    words  TEXT NOT NULL
);
CREATE VIRTUAL TABLE run_search_index USING fts5 (
    words, content = 'run_search', content_rowid = 'rowid', tokenize = 'trigram'
);
CREATE TRIGGER run_search_added AFTER INSERT ON run_search BEGIN
    INSERT INTO run_search_index (rowid, words) VALUES (new.rowid, new.words);
END;
CREATE TRIGGER run_search_removed AFTER DELETE ON run_search BEGIN
    INSERT INTO run_search_index (run_search_index, rowid, words) VALUES ('delete', old.rowid, old.words);
END;
CREATE TRIGGER run_search_changed AFTER UPDATE ON run_search BEGIN
    INSERT INTO run_search_index (run_search_index, rowid, words) VALUES ('delete', old.rowid, old.words);
    INSERT INTO run_search_index (rowid, words) VALUES (new.rowid, new.words);
END;

CREATE TRIGGER runs_searchable AFTER INSERT ON runs BEGIN
    INSERT INTO run_search (run_id, words) VALUES (new.id, (
        SELECT COALESCE(group_concat(value, char(10)), '') FROM json_tree(new.inputs)
        WHERE type IN ('text', 'integer', 'real')));
END;
CREATE TRIGGER runs_search_follows_inputs AFTER UPDATE OF inputs ON runs BEGIN
    UPDATE run_search SET words = (
        SELECT COALESCE(group_concat(value, char(10)), '') FROM json_tree(new.inputs)
        WHERE type IN ('text', 'integer', 'real'))
    WHERE run_id = new.id;
END;
CREATE TRIGGER runs_unsearchable AFTER DELETE ON runs BEGIN
    DELETE FROM run_search WHERE run_id = old.id;
END;

INSERT INTO run_search (run_id, words)
SELECT id, (SELECT COALESCE(group_concat(value, char(10)), '') FROM json_tree(runs.inputs)
            WHERE type IN ('text', 'integer', 'real'))
FROM runs;

-- Finished runs per queue and minute, by outcome: the console's throughput history. Minutes
-- older than a day and an hour are deleted as new ones are added.
CREATE TABLE throughput (
    queue     TEXT NOT NULL,
    minute    INTEGER NOT NULL,
    completed INTEGER NOT NULL DEFAULT 0,
    failed    INTEGER NOT NULL DEFAULT 0,
    cancelled INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, minute)
);
