-- Attempts a worker handed back before starting them (its local queue, when it stops or a
-- run waited there too long): they do not count against `max_attempts`. A constant default,
-- so adding it rewrites no row.
ALTER TABLE runs ADD COLUMN released_attempts BIGINT NOT NULL DEFAULT 0;
