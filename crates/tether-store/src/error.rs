use thiserror::Error;

/// What can go wrong in a store, typed so the server maps each to one HTTP answer.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("no such run")]
    NotFound,
    #[error("no such worker, or it has deregistered")]
    UnknownWorker,
    /// The attempt named is no longer the current one: the caller is a zombie.
    #[error("that attempt is no longer current")]
    StaleAttempt,
    #[error("the run is already terminal")]
    Terminal,
    #[error("idempotency key already used by a different submission (run {run_id})")]
    IdempotencyConflict { run_id: String },
    /// The database could not be reached or failed; the request may be retried.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A value the database refused as data (PostgreSQL's SQLSTATE class 22: NUL in text, a
    /// number out of range): the caller's mistake, not an outage.
    #[error("the store cannot hold that value: {0}")]
    InvalidInput(String),
    /// A list cursor that no page of this store handed out.
    #[error("invalid cursor")]
    InvalidCursor,
    /// Stored data that the code cannot read: a bug or a foreign write.
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
}
