-- Tether's shared schema. Every stamp is BIGINT milliseconds since the epoch (as in the SQLite
-- store, so records map identically), always taken from the database's clock: servers on many
-- machines disagree about the time, the database does not.

CREATE FUNCTION tether_now_ms() RETURNS bigint
    LANGUAGE sql VOLATILE PARALLEL SAFE
    AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint $$;

CREATE TABLE runs (
    -- Rises with every run accepted: orders lanes first in first out and pages lists.
    seq                   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                    TEXT             NOT NULL UNIQUE,
    lane                  TEXT             NOT NULL,
    -- Older versions wrote `queued`; it reads as `pending`.
    status                TEXT             NOT NULL,
    attempt               BIGINT           NOT NULL DEFAULT 0,
    max_attempts          BIGINT           NOT NULL,
    -- The resolved RunSpec.
    spec                  JSONB            NOT NULL,
    cpus                  DOUBLE PRECISION NOT NULL,
    memory_mb             BIGINT           NOT NULL,
    worker_id             TEXT,
    created_at            BIGINT           NOT NULL,
    claimed_at            BIGINT,
    started_at            BIGINT,
    finished_at           BIGINT,
    last_heartbeat_at     BIGINT,
    -- The worker started or heartbeated this attempt: tells a lost heartbeat from a claim
    -- that was never confirmed.
    confirmed             BOOLEAN          NOT NULL DEFAULT FALSE,
    last_output_at        BIGINT,
    cancel_requested_at   BIGINT,
    -- NULL: never reaped for a missing heartbeat.
    heartbeat_timeout_ms  BIGINT,
    timeout_ms            BIGINT,
    -- coalesce(last_heartbeat_at, claimed_at) + heartbeat_timeout_ms while in flight.
    stale_at              BIGINT,
    -- (started_at or claimed_at) + timeout_ms while in flight.
    timeout_at            BIGINT,
    exit_code             INTEGER,
    error_code            TEXT,
    error_message         TEXT,
    -- Bytes stored as log events, per stream and together (the output limit counts the latter).
    stdout_bytes          BIGINT           NOT NULL DEFAULT 0,
    stderr_bytes          BIGINT           NOT NULL DEFAULT 0,
    output_bytes          BIGINT           NOT NULL DEFAULT 0,
    output_limit_bytes    BIGINT           NOT NULL,
    -- What the worker last said it had read (heartbeat diagnostics, never a gate).
    reported_stdout_bytes BIGINT,
    reported_stderr_bytes BIGINT,
    last_event_seq        BIGINT           NOT NULL DEFAULT 0,
    idempotency_key       TEXT UNIQUE,
    request_fingerprint   TEXT             NOT NULL
);

-- The reaper's selection, served by partial indexes over in-flight rows only: finished runs
-- (nearly all rows, in time) are never in them, so a sweep costs what is in flight.
CREATE INDEX runs_in_flight_stale_at ON runs (stale_at)
    WHERE status IN ('claimed', 'running');
CREATE INDEX runs_in_flight_timeout_at ON runs (timeout_at)
    WHERE status IN ('claimed', 'running');
CREATE INDEX runs_in_flight_cancel ON runs ((coalesce(last_heartbeat_at, claimed_at)))
    WHERE status IN ('claimed', 'running') AND cancel_requested_at IS NOT NULL;
-- Claims (oldest pending first) and queue positions within a lane; pending rows only.
CREATE INDEX runs_pending_lane_seq ON runs (lane, seq) WHERE status IN ('pending', 'queued');
CREATE INDEX runs_pending_seq ON runs (seq) WHERE status IN ('pending', 'queued');
-- Lists filtered by status or lane, newest first.
CREATE INDEX runs_status_seq ON runs (status, seq);
CREATE INDEX runs_lane_seq ON runs (lane, seq);
-- What a worker holds.
CREATE INDEX runs_worker_id ON runs (worker_id) WHERE worker_id IS NOT NULL;

CREATE TABLE attempts (
    run_id        TEXT   NOT NULL REFERENCES runs (id),
    attempt       BIGINT NOT NULL,
    worker_id     TEXT   NOT NULL,
    claimed_at    BIGINT NOT NULL,
    started_at    BIGINT,
    finished_at   BIGINT,
    -- NULL while the attempt is in flight.
    status        TEXT,
    error_code    TEXT,
    exit_code     INTEGER,
    error_message TEXT,
    PRIMARY KEY (run_id, attempt)
);

CREATE TABLE run_events (
    run_id  TEXT   NOT NULL REFERENCES runs (id),
    -- Rises by one per run (runs.last_event_seq).
    seq     BIGINT NOT NULL,
    kind    TEXT   NOT NULL,
    attempt BIGINT NOT NULL,
    ts      BIGINT NOT NULL,
    body    JSONB  NOT NULL,
    -- Raw output bytes of `log` events.
    data    BYTEA,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE workers (
    id                TEXT             PRIMARY KEY,
    name              TEXT             NOT NULL,
    cpus              DOUBLE PRECISION NOT NULL,
    memory_mb         BIGINT           NOT NULL,
    -- Empty: every lane.
    lanes             TEXT[]           NOT NULL,
    labels            JSONB            NOT NULL,
    registered_at     BIGINT           NOT NULL,
    last_heartbeat_at BIGINT           NOT NULL,
    draining          BOOLEAN          NOT NULL DEFAULT FALSE,
    deregistered_at   BIGINT
);
