-- A fingerprint of the request an idempotency key was first used with: the same key with
-- another request is refused instead of answering a run that was asked for differently.
ALTER TABLE runs ADD COLUMN idempotency_hash TEXT;
