//! Polling with a deadline: a probe is asked again every few milliseconds until it says done,
//! and the test fails with what it last saw once the deadline passes.

use std::fmt::Display;
use std::time::Duration;

use tokio::time::Instant;

/// How often [`eventually`] asks again: small, so a test waits little past the moment its
/// condition holds.
pub const POLL_EVERY: Duration = Duration::from_millis(20);

/// What a probe answers: done (with a value), or not yet (with what it saw, for the message).
pub trait Outcome {
    type Value;
    fn done(self) -> Result<Self::Value, String>;
}

impl Outcome for bool {
    type Value = ();
    fn done(self) -> Result<(), String> {
        if self {
            Ok(())
        } else {
            Err("false".into())
        }
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn done(self) -> Result<T, String> {
        self.ok_or_else(|| "not yet".into())
    }
}

/// `Err` carries what the probe last saw (a run's JSON, say), shown if the deadline passes.
impl<T, E: Display> Outcome for Result<T, E> {
    type Value = T;
    fn done(self) -> Result<T, String> {
        self.map_err(|e| e.to_string())
    }
}

/// Asks `probe` every `every` until it is done or `within` has passed; on timeout, returns
/// what it last saw, for callers that must do something before failing (a screenshot).
pub async fn poll_until<O: Outcome>(
    within: Duration,
    every: Duration,
    mut probe: impl AsyncFnMut() -> O,
) -> Result<O::Value, String> {
    let deadline = Instant::now() + within;
    loop {
        match probe().await.done() {
            Ok(value) => return Ok(value),
            Err(last) if Instant::now() >= deadline => return Err(last),
            Err(_) => tokio::time::sleep(every).await,
        }
    }
}

/// Asks `probe` every [`POLL_EVERY`] until it is done, and returns its value; fails the test
/// naming `what` and the probe's last answer once `within` has passed.
pub async fn eventually<O: Outcome>(
    what: &str,
    within: Duration,
    probe: impl AsyncFnMut() -> O,
) -> O::Value {
    eventually_every(what, within, POLL_EVERY, probe).await
}

/// [`eventually`], asking every `every` (for probes that cost something, like a browser's).
pub async fn eventually_every<O: Outcome>(
    what: &str,
    within: Duration,
    every: Duration,
    probe: impl AsyncFnMut() -> O,
) -> O::Value {
    match poll_until(within, every, probe).await {
        Ok(value) => value,
        Err(last) => panic!("timed out after {within:?} waiting for {what}; last: {last}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_value_once_the_probe_is_done() {
        let mut asked = 0;
        let value = eventually("the third ask", Duration::from_secs(5), async || {
            asked += 1;
            (asked == 3).then_some(asked)
        })
        .await;
        assert_eq!(value, 3);
    }

    #[tokio::test]
    async fn gives_up_at_the_deadline_with_the_last_answer() {
        let last = poll_until(
            Duration::from_millis(50),
            Duration::from_millis(5),
            async || Err::<(), _>("still pending"),
        )
        .await;
        assert_eq!(last, Err("still pending".to_string()));
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for nothing; last: false")]
    async fn eventually_fails_naming_what_it_waited_for() {
        eventually("nothing", Duration::from_millis(30), async || false).await;
    }
}
