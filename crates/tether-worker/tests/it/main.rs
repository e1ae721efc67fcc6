//! Integration tests of the worker: supervision against an in-memory reporter with real
//! processes.

mod fake;
mod supervise;
