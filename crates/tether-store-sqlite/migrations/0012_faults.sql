-- Output exactly once: what each attempt has stored of each stream, in bytes. An append names
-- the offset its chunk begins at; these say what the next one must name.
ALTER TABLE attempts ADD COLUMN stdout_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN stderr_bytes INTEGER NOT NULL DEFAULT 0;

-- The retention pruner: finished runs of a lane, oldest first.
CREATE INDEX runs_finished_lane ON runs (lane, finished_at)
    WHERE status IN ('succeeded', 'failed', 'cancelled', 'timed_out');
