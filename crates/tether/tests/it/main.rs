//! End-to-end tests of the `tether` binary: real servers, real worker processes, real commands,
//! killed the way failures happen (SIGKILL, SIGSTOP, restarts).

mod bench;
mod browser;
mod cli;
mod cluster;
mod dashboard;
mod docs;
mod endpoints;
mod everyday;
mod faults;
mod liveness;
mod metrics;
mod multi_server;
mod outcomes;
mod pg;
mod restart;
mod security;
mod throughput;
mod tls;
