//! Integration tests of the worker: supervision against an in-memory reporter with real
//! processes, and the whole worker against a fake server over HTTP.

mod fake;
mod server;
mod spawn_rate;
mod supervise;
mod worker;
