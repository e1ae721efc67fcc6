//! The server's HTTP tests: every endpoint, every status code, against a real SQLite store.

mod batch;
mod console;
mod endpoints;
mod harness;
mod http_api;
mod internal_errors;
mod lanes;
mod outage;
mod protocol;
mod proxy;
mod reports;
mod security;
mod slowloris;
mod stream;
