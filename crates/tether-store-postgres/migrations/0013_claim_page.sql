-- A claim's page of pending runs: the oldest first, after a seq, of some lanes (none: every
-- lane), skipping and not waiting on rows another claim is taking, locked. Planned with bitmap
-- scans off: without statistics (a fresh or fast-growing table) the planner reads every pending
-- row and sorts them for a page of a few, where the partial index `runs_pending_seq` walks them
-- in order and stops (4.8 ms against 0.2 ms with 3,000 pending).
CREATE FUNCTION tether_claim_page(after_seq bigint, page_lanes text[], page_size bigint)
    RETURNS SETOF bigint
    LANGUAGE sql VOLATILE
    SET enable_bitmapscan = off
    AS $$
        SELECT seq FROM runs
        WHERE status IN ('pending', 'queued') AND cancel_requested_at IS NULL AND seq > after_seq
          AND (cardinality(page_lanes) = 0 OR lane = ANY(page_lanes))
        ORDER BY seq LIMIT page_size
        FOR UPDATE SKIP LOCKED
    $$;
