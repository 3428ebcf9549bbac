-- Only runs submitted with an idempotency key are in its unique index: the others (most) no
-- longer add an entry to it at every change of their row that moves it (a claim, a completion).
ALTER TABLE runs DROP CONSTRAINT runs_idempotency_key_key;
CREATE UNIQUE INDEX runs_idempotency_key ON runs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
