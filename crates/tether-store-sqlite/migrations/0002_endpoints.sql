-- Endpoint readiness and dispatch (SPEC §5). Stamps are the store's clock, in milliseconds.

CREATE TABLE pools (
    name          TEXT    PRIMARY KEY,
    fallback_url  TEXT,
    freshness_ms  INTEGER NOT NULL,
    -- `config` (a server's config file, upserted at start) or `api` (PUT /v1/pools/{pool}),
    -- which a config upsert never overwrites.
    source        TEXT    NOT NULL,
    updated_at    INTEGER NOT NULL
);

CREATE TABLE endpoints (
    name              TEXT    PRIMARY KEY,
    pool              TEXT    NOT NULL REFERENCES pools (name),
    url               TEXT    NOT NULL,
    readiness_url     TEXT,
    -- `probed` or `always_ready`.
    kind              TEXT    NOT NULL,
    -- Rises with every change of definition; fences probe results of an older one.
    revision          INTEGER NOT NULL DEFAULT 1,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    -- The last 2xx readiness answer. Only a ready probe writes it.
    last_ready_at     INTEGER,
    last_probe_at     INTEGER,
    last_error        TEXT,
    -- When a server last took the right to probe it: one claim per probe interval, whichever
    -- server takes it.
    probe_claimed_at  INTEGER
);

CREATE INDEX endpoints_pool ON endpoints (pool);

-- What each attempt's `endpoints` resolved to at its claim: JSON { env var: {url, source,
-- endpoint} }. NULL: nothing recorded (no endpoints, or written by an older version).
ALTER TABLE attempts ADD COLUMN endpoints TEXT;
