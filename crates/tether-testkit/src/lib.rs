//! What every Tether test suite shares, so each helper exists once:
//!
//! - [`eventually`]: poll with a deadline instead of sleeping (tests never sleep to synchronise);
//! - [`PgSchema`]: a private PostgreSQL schema per test, dropped without blocking the runtime;
//! - [`IdleCuttingProxy`] and [`ReplyDroppingProxy`]: the network faults tests inject;
//! - [`http`]: a free port, waiting for `/readyz`, and reading and polling runs over the API.
//!
//! A dev-dependency only: nothing here is compiled into a production crate.

pub mod http;
mod pg;
mod poll;
mod proxy;

pub use pg::{database_url, PgSchema};
pub use poll::{eventually, eventually_every, poll_until, Outcome, POLL_EVERY};
pub use proxy::{IdleCuttingProxy, ReplyDroppingProxy};
