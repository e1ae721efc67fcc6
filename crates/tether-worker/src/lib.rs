//! Tether's worker (SPEC §3): registers with a server over HTTP, long-polls it for runs,
//! supervises each attempt's process group, uploads output, heartbeats for itself and all of
//! its runs on a fixed interval, and obeys cancel and "not yours any more" answers.

mod backoff;
pub mod control;
pub mod group;
pub mod output;
mod release;
pub mod reporter;
mod run_host;
pub mod shim;
pub mod slots;
pub mod supervisor;
mod worker;

pub use control::{AttemptControl, AttemptStats, Directive};
pub use reporter::{
    AppendAck, AttemptReporter, BatchReporter, Finish, HttpReporter, OutputChunk, OutputStream,
    ReportError, ReportQueue,
};
pub use supervisor::{
    command_env, supervise, AttemptEnd, SupervisorOptions, Unreported, DEFAULT_PASS_ENV,
};
pub use worker::{run_worker, WorkerConfig, WorkerError};

/// Locks `mutex`, taking it over from a holder that panicked: everything this crate guards
/// stays valid between statements, so a panic elsewhere leaves nothing half-written.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
