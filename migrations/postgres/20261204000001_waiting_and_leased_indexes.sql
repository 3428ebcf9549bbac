-- Claims and sweeps read small partial indexes instead of whole-table ones.
--
-- A claim takes, for each of its queues, the first due runs in order of due time from an index
-- of the waiting runs alone (an ordered index scan that stops after the batch), instead of
-- sorting every waiting run of the queue. A sweep reads an index of the running runs' lease
-- expiries. Both indexes hold only the runs they serve, so a run that finishes leaves them, and
-- the run list's status indexes stay the only whole-table ones.
DROP INDEX runs_due;
DROP INDEX runs_leases;
CREATE INDEX runs_waiting ON runs (queue, available_at, id) WHERE status IN ('queued', 'retrying');
CREATE INDEX runs_leased ON runs (lease_expires_at) WHERE status = 'running';

-- Room on each page for a row's next version: a write that changes no indexed column (a stage
-- starting, a heartbeat, a step's cost) then stays on its page and touches no index.
ALTER TABLE runs SET (fillfactor = 80);
ALTER TABLE stages SET (fillfactor = 80);
