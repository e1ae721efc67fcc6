-- What each lane holds (GET /v1/lanes, the metrics, a run's waiting reason): the queues are
-- counted from this index, which holds the queued runs and nothing else.
CREATE INDEX runs_queued_by_lane ON runs (lane, created_at)
    WHERE status IN ('pending', 'queued');
