-- A run's events and attempts are written only by the engine, in the transaction that holds
-- the run locked, and deleted with it by the pruner, in one statement. The foreign keys
-- checked that again for every row: a lookup and a `FOR KEY SHARE` lock of the run per event
-- (six a run) and per attempt, the largest part of what a worker's call cost PostgreSQL.
ALTER TABLE run_events DROP CONSTRAINT IF EXISTS run_events_run_id_fkey;
ALTER TABLE attempts DROP CONSTRAINT IF EXISTS attempts_run_id_fkey;
