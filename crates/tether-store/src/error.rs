use thiserror::Error;

/// The error a store failed with, kept whole (its own source chain included) so the server can
/// log all of it while answering the client only a stable code.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

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
    /// The database could not be reached or failed; the request may be retried. Holds the
    /// driver's error: its text (SQL, addresses) is for the log, never for a client.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// An output chunk begins past what the attempt has stored of its stream: something
    /// before it was never stored. Nothing of the append was stored; resend from `expected`.
    #[error("output gap: the attempt has stored {expected:?} bytes so far")]
    OutputGap { expected: crate::StreamOffsets },
    /// A value the database refused as data (PostgreSQL's SQLSTATE class 22: NUL in text, a
    /// number out of range): the caller's mistake, not an outage.
    #[error("the store cannot hold that value: {0}")]
    InvalidInput(String),
    /// A list cursor that no page of this store handed out.
    #[error("invalid cursor")]
    InvalidCursor,
    /// Stored data that the code cannot read: a bug or a foreign write. Holds what would not
    /// decode, for the log.
    #[error("store data is corrupt: {0}")]
    Corrupt(#[source] BoxError),
}

impl StoreError {
    /// `Unavailable`, keeping `cause` (a driver error, or a sentence) as the source.
    pub fn unavailable(cause: impl Into<BoxError>) -> StoreError {
        StoreError::Unavailable(cause.into())
    }

    /// `Corrupt`, keeping `cause` (a decode error, or a sentence) as the source.
    pub fn corrupt(cause: impl Into<BoxError>) -> StoreError {
        StoreError::Corrupt(cause.into())
    }

    /// `Unavailable` while doing `what` (`"migrating"`): the context in the message, `cause`
    /// kept as the source.
    pub fn unavailable_while(what: impl Into<String>, cause: impl Into<BoxError>) -> StoreError {
        StoreError::Unavailable(Box::new(Context {
            what: what.into(),
            cause: cause.into(),
        }))
    }

    /// `Corrupt` while reading `what` (`"run spec"`): the context in the message, `cause` kept
    /// as the source.
    pub fn corrupt_while(what: impl Into<String>, cause: impl Into<BoxError>) -> StoreError {
        StoreError::Corrupt(Box::new(Context {
            what: what.into(),
            cause: cause.into(),
        }))
    }
}

/// What a store was doing when `cause` happened.
#[derive(Debug, Error)]
#[error("{what}: {cause}")]
struct Context {
    what: String,
    #[source]
    cause: BoxError,
}
