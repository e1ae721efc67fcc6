-- Tether's embedded schema. Every stamp is integer milliseconds since the epoch, taken from the
-- store's clock.

CREATE TABLE runs (
    -- Rises with every run accepted: orders lanes first in first out and pages lists.
    seq                   INTEGER PRIMARY KEY AUTOINCREMENT,
    id                    TEXT    NOT NULL UNIQUE,
    lane                  TEXT    NOT NULL,
    -- Older versions wrote `queued`; it reads as `pending`.
    status                TEXT    NOT NULL,
    attempt               INTEGER NOT NULL DEFAULT 0,
    max_attempts          INTEGER NOT NULL,
    -- The resolved RunSpec, JSON.
    spec                  TEXT    NOT NULL,
    cpus                  REAL    NOT NULL,
    memory_mb             INTEGER NOT NULL,
    worker_id             TEXT,
    created_at            INTEGER NOT NULL,
    claimed_at            INTEGER,
    started_at            INTEGER,
    finished_at           INTEGER,
    last_heartbeat_at     INTEGER,
    -- The worker started or heartbeated this attempt: tells a lost heartbeat from a claim
    -- that was never confirmed.
    confirmed             INTEGER NOT NULL DEFAULT 0,
    last_output_at        INTEGER,
    cancel_requested_at   INTEGER,
    -- NULL: never reaped for a missing heartbeat.
    heartbeat_timeout_ms  INTEGER,
    timeout_ms            INTEGER,
    -- coalesce(last_heartbeat_at, claimed_at) + heartbeat_timeout_ms while in flight.
    stale_at              INTEGER,
    -- (started_at or claimed_at) + timeout_ms while in flight.
    timeout_at            INTEGER,
    exit_code             INTEGER,
    error_code            TEXT,
    error_message         TEXT,
    -- Bytes stored as log events, per stream and together (the output limit counts the latter).
    stdout_bytes          INTEGER NOT NULL DEFAULT 0,
    stderr_bytes          INTEGER NOT NULL DEFAULT 0,
    output_bytes          INTEGER NOT NULL DEFAULT 0,
    output_limit_bytes    INTEGER NOT NULL,
    -- What the worker last said it had read (heartbeat diagnostics, never a gate).
    reported_stdout_bytes INTEGER,
    reported_stderr_bytes INTEGER,
    last_event_seq        INTEGER NOT NULL DEFAULT 0,
    idempotency_key       TEXT UNIQUE,
    request_fingerprint   TEXT    NOT NULL
);

-- The reaper's queries, served by partial indexes over in-flight rows only.
CREATE INDEX runs_stale_at ON runs (stale_at) WHERE status IN ('claimed', 'running');
CREATE INDEX runs_timeout_at ON runs (timeout_at) WHERE status IN ('claimed', 'running');
CREATE INDEX runs_cancel_requested ON runs (cancel_requested_at)
    WHERE status IN ('claimed', 'running') AND cancel_requested_at IS NOT NULL;
-- Claims (oldest pending first) and queue positions within a lane.
CREATE INDEX runs_lane_status_seq ON runs (lane, status, seq);
CREATE INDEX runs_status_seq ON runs (status, seq);
-- What a worker holds.
CREATE INDEX runs_worker_id ON runs (worker_id) WHERE worker_id IS NOT NULL;

CREATE TABLE attempts (
    run_id        TEXT    NOT NULL REFERENCES runs (id),
    attempt       INTEGER NOT NULL,
    worker_id     TEXT    NOT NULL,
    claimed_at    INTEGER NOT NULL,
    started_at    INTEGER,
    finished_at   INTEGER,
    -- NULL while the attempt is in flight.
    status        TEXT,
    error_code    TEXT,
    exit_code     INTEGER,
    error_message TEXT,
    PRIMARY KEY (run_id, attempt)
);

CREATE TABLE run_events (
    run_id  TEXT    NOT NULL REFERENCES runs (id),
    -- Rises by one per run (runs.last_event_seq).
    seq     INTEGER NOT NULL,
    kind    TEXT    NOT NULL,
    attempt INTEGER NOT NULL,
    ts      INTEGER NOT NULL,
    body    TEXT    NOT NULL,
    -- Raw output bytes of `log` events.
    data    BLOB,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE workers (
    id                TEXT    PRIMARY KEY,
    name              TEXT    NOT NULL,
    cpus              REAL    NOT NULL,
    memory_mb         INTEGER NOT NULL,
    -- JSON array; empty: every lane.
    lanes             TEXT    NOT NULL,
    -- JSON object.
    labels            TEXT    NOT NULL,
    registered_at     INTEGER NOT NULL,
    last_heartbeat_at INTEGER NOT NULL,
    draining          INTEGER NOT NULL DEFAULT 0,
    deregistered_at   INTEGER
);
