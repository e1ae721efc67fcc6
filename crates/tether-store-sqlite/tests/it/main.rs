//! The SQLite store's tests: the shared conformance suite, and what only SQLite promises.

mod conformance;
mod open;
mod stored_spec;
