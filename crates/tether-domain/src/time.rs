//! Time as the store sees it: milliseconds since the Unix epoch, read from the store's clock.

/// Milliseconds since the Unix epoch. Every stamp Tether keeps is one of these, taken from the
/// store's clock (`now()` in SQL), so skew between servers and workers changes no judgement.
pub type Millis = i64;

/// Parses a duration written like `500ms`, `2s`, `5m` (SPEC §6) into milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    humantime::parse_duration(text.trim())
        .map(|d| d.as_millis() as u64)
        .map_err(|e| format!("`{text}` is not a duration like 500ms, 2s or 5m: {e}"))
}

/// Formats a stamp as RFC 3339 with milliseconds, the form every API answer uses.
pub fn format_rfc3339(ms: Millis) -> String {
    let ms = ms.max(0) as u64;
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// When something a worker reports happened: `ago_ms` (a duration the worker measured on its
/// own monotonic clock) before `now`, the store's time at the call; never before `floor` (what
/// the store knows came first: the claim before a start, the start before an end), never
/// after `now`. Only a duration crosses from the worker, so its wall clock is never believed,
/// and whatever it says lands inside a span the store itself stamped.
pub fn reported_at(now: Millis, ago_ms: u64, floor: Millis) -> Millis {
    let at = now.saturating_sub(i64::try_from(ago_ms).unwrap_or(i64::MAX));
    at.max(floor.min(now))
}

/// Seconds between two stamps, never negative (a stamp a little in the future reads as 0).
pub fn age_s(now: Millis, stamp: Millis) -> f64 {
    ((now - stamp).max(0) as f64) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_the_spec_forms() {
        assert_eq!(parse_duration_ms("500ms").unwrap(), 500);
        assert_eq!(parse_duration_ms("2s").unwrap(), 2000);
        assert_eq!(parse_duration_ms("5m").unwrap(), 300_000);
        assert!(parse_duration_ms("soon").is_err());
    }

    #[test]
    fn a_reported_time_stays_between_what_came_before_and_the_call() {
        assert_eq!(reported_at(10_000, 0, 9_000), 10_000);
        assert_eq!(reported_at(10_000, 250, 9_000), 9_750);
        assert_eq!(
            reported_at(10_000, 5_000, 9_000),
            9_000,
            "not before the floor"
        );
        assert_eq!(
            reported_at(10_000, u64::MAX, 1),
            1,
            "no overflow, still the floor"
        );
        // A floor in the future (another server's clock ran ahead): never after the call.
        assert_eq!(reported_at(10_000, 0, 12_000), 10_000);
    }

    #[test]
    fn rfc3339_has_millis() {
        assert_eq!(format_rfc3339(1_500), "1970-01-01T00:00:01.500Z");
    }
}
