//! The PostgreSQL store's tests: the shared conformance suite, and what only PostgreSQL
//! promises (many servers on one database). Each case works in its own fresh schema of the
//! database at `TETHER_TEST_DATABASE_URL`, dropped when the case ends.

mod conformance;
mod servers;
mod stored_spec;
