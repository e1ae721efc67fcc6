-- Attempts a worker handed back before starting them (its local queue, when it stops or a
-- run waited there too long): they do not count against `max_attempts`.
ALTER TABLE runs ADD COLUMN released_attempts INTEGER NOT NULL DEFAULT 0;
