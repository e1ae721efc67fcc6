//! The conformance suite every store runs unchanged (like River's `riverdrivertest`): one case
//! per promise of the [`Store`](tether_store::Store) trait, split by area. Nothing here knows
//! which store it is testing. A dev-dependency only, so the production library does not carry
//! the suite or its `expect`s.
//!
//! A store's integration tests provide a [`Harness`] that makes a fresh, empty store per case
//! and expand [`store_conformance_tests!`] once:
//!
//! ```ignore
//! tether_store_conformance::store_conformance_tests!(MyHarness);
//! ```
//!
//! Each case becomes its own `#[tokio::test]`, so they run in parallel and fail by name.
//! Time-based cases use windows of a few hundred milliseconds and poll with a deadline.
//!
//! Adding a case: write `pub async fn the_promise(h: &dyn Harness)` in the area's module (or a
//! new module, declared below and glob re-exported), and add its name to the macro's list.

use std::any::Any;

use async_trait::async_trait;
use tether_store::SharedStore;

mod support;

mod admission;
mod batch;
mod claims;
mod endpoints;
mod fencing;
mod output;
mod reaper;
mod retention;
mod runs;
mod signals;
mod workers;

pub use admission::*;
pub use batch::*;
pub use claims::*;
pub use endpoints::*;
pub use fencing::*;
pub use output::*;
pub use reaper::*;
pub use retention::*;
pub use runs::*;
pub use signals::*;
pub use workers::*;

/// A fresh store, and whatever must stay alive while it is used (a temp dir, a database).
pub struct Fixture {
    pub store: SharedStore,
    pub guard: Box<dyn Any + Send + Sync>,
}

/// What a store's tests provide to run the suite.
#[async_trait]
pub trait Harness: Send + Sync {
    /// A new, empty store, unaffected by any other case running at the same time.
    async fn fresh(&self) -> Fixture;

    /// Overwrites a run's stored status text as an older version would have written it (the
    /// legacy `queued`), behind the store's back.
    async fn write_status_text(&self, fixture: &Fixture, run_id: &str, status: &str);
}

/// Expands to one `#[tokio::test]` per conformance case, each on a fresh store from
/// `$harness` (an expression whose reference is a `&dyn Harness`). The caller's crate needs
/// `tokio` with the `macros` and `rt-multi-thread` features.
#[macro_export]
macro_rules! store_conformance_tests {
    ($harness:expr) => {
        $crate::store_conformance_tests!(@cases $harness;
            create_get_and_list_newest_first,
            legacy_queued_reads_as_pending,
            runs_are_found_by_id_prefix,
            idempotency_key_returns_the_same_run_or_conflicts,
            a_reject_lane_admits_only_what_fits_at_once,
            a_batch_is_written_whole_in_order_and_replays_by_key,
            a_batch_refused_at_one_entry_writes_nothing,
            a_batch_into_a_reject_lane_is_all_or_nothing,
            a_submission_hands_its_run_to_a_waiting_worker,
            a_hand_off_takes_what_the_worker_would_claim,
            a_batch_hands_what_fits_to_a_waiting_worker,
            concurrent_claims_hand_each_run_to_one_worker,
            claims_are_first_in_first_out_within_a_lane,
            claims_stay_within_worker_capacity,
            a_run_too_big_is_skipped_without_blocking_smaller_ones,
            claims_respect_lane_max_concurrency,
            a_reserve_holds_runs_beyond_capacity_within_bounds,
            unknown_and_deregistered_workers_are_refused,
            a_worker_s_secret_hash_is_kept_while_it_is_registered,
            a_worker_with_a_stale_heartbeat_is_handed_nothing,
            lane_loads_count_pending_and_in_flight_runs,
            events_before_reads_a_log_backwards_from_its_tail,
            a_draining_worker_is_handed_nothing_new,
            writes_survive_callers_dropped_mid_transaction,
            a_run_goes_from_pending_to_succeeded_with_events_in_order,
            old_attempts_and_other_workers_are_fenced,
            terminal_runs_never_change,
            cancel_of_pending_is_immediate_and_it_is_never_claimed,
            cancel_of_in_flight_reaches_the_worker_at_its_heartbeat,
            output_past_the_limit_ends_the_run_failed,
            non_utf8_output_round_trips_exactly,
            heartbeat_stamps_held_runs_and_names_the_rest_not_owned,
            list_workers_shows_held_runs_and_reserved_resources,
            a_stale_run_is_retried_then_timed_out,
            a_stale_run_with_one_attempt_ends_timed_out,
            a_claim_never_confirmed_ends_worker_claim_timeout,
            no_heartbeat_timeout_means_reaped_only_for_timeout,
            cancel_requested_with_the_worker_gone_ends_cancelled,
            concurrent_sweeps_retry_each_stale_run_once,
            deregister_hands_runs_back_at_once,
            a_released_attempt_goes_back_uncounted,
            next_reap_deadline_is_the_earliest_deadline,
            signals_are_delivered_after_commit,
            pools_from_config_never_override_pools_set_through_the_api,
            endpoints_register_replace_and_delete,
            probes_are_claimed_once_per_interval_across_callers,
            probe_results_stamp_only_ready_answers_for_the_current_claim,
            an_attempts_dispatch_is_recorded_once_while_current,
            repeated_output_is_stored_once_and_gaps_are_refused,
            heartbeat_grace_moves_stale_deadlines_only_forward,
            pruning_deletes_old_finished_runs_only,
            batched_starts_judge_each_item_and_answer_in_order,
            batched_finishes_judge_each_item_and_answer_in_order,
            batched_finishes_retry_or_end_as_single_finishes_do,
            a_call_s_wait_for_its_transaction_counts_into_its_stamps,
            a_report_starts_finishes_and_claims_the_room_freed_in_one_call,
            a_start_and_a_retried_finish_in_one_call_leave_what_two_calls_would,
            reported_times_place_starts_and_ends_when_they_happened,
            a_report_s_refused_claim_leaves_its_items_standing,
        );
    };
    (@cases $harness:expr; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::$case(&$harness).await;
            }
        )*
    };
}
