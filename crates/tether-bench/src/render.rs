//! The reports for a person.

use std::fmt::Write;

use crate::real::RealReport;
use crate::synthetic::{SyntheticReport, Throughput};
use crate::Percentiles;

// ---- output ------------------------------------------------------------------------------------

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn render_throughput(out: &mut String, t: &Throughput) {
    let l = &t.submit_to_start_ms;
    let _ = writeln!(
        out,
        "  runs/s                     {:>9.1}   ({} runs in {:.2} s, first submit to last finish)",
        t.runs_per_s, t.runs, t.seconds
    );
    let _ = writeln!(
        out,
        "  submit→start ms            p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
        l.p50, l.p90, l.p99, l.max
    );
    let _ = writeln!(
        out,
        "  call round trips ms        {:>6} {:>8} {:>8} {:>8} {:>8}",
        "count", "p50", "p90", "p99", "max"
    );
    for (name, p) in &t.calls_ms {
        let _ = writeln!(
            out,
            "    {:<24} {:>6} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            name, p.count, p.p50, p.p90, p.p99, p.max
        );
    }
    let _ = writeln!(
        out,
        "  HTTP calls per run         {:>9.3}   (submissions, claims, reports, logs; not heartbeats or SSE)",
        t.http_calls_per_run
    );
    if t.reports_per_call > 0.0 {
        let _ = writeln!(
            out,
            "  reports per attempts call  {:>9.1}   (starts and finishes)",
            t.reports_per_call
        );
    }
    let _ = writeln!(
        out,
        "  claims with work           {:>9}   ({} riding on a report call; {:.1} runs per claim; {} worker heartbeats)",
        t.claims, t.riding_claims, t.runs_per_claim, t.heartbeats
    );
    let _ = writeln!(
        out,
        "  events written             {:>9}   ({:.1} per run; {} of {} runs end with `end`)",
        t.events_written,
        t.events_written as f64 / t.runs.max(1) as f64,
        t.runs_ended,
        t.runs
    );
    let _ = writeln!(
        out,
        "  streams followed (SSE)     {:>9}   ({} reached `end` with every seq in order)",
        t.followed, t.followed_complete
    );
    once(out, t.succeeded_once, t.runs);
}

/// The synthetic path's report.
pub(crate) fn synthetic(r: &SyntheticReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "tether bench: {} ({})", r.store, r.database);
    let protocol = if r.protocol == "single" {
        "one call per submission, start and finish"
    } else {
        "batched reports with riding claims"
    };
    let _ = writeln!(
        out,
        "{} no-op runs; {} synthetic workers ({} slots each, {protocol}), {} submitters ({} runs per call); no process spawned",
        r.runs, r.workers, r.claim_batch, r.concurrency, r.submit_batch
    );
    if r.log_every > 0 {
        let _ = writeln!(
            out,
            "1 run in {} prints one line (uploaded by its own logs call)",
            r.log_every
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "Throughput, empty table");
    render_throughput(&mut out, &r.throughput);
    if let Some(p) = &r.paced {
        let l = &p.submit_to_start_ms;
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "One run at a time ({} runs, idle system)\n  submit→start ms            p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
            p.runs, l.p50, l.p90, l.p99, l.max
        );
    }
    if let Some(b) = &r.big_table {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Big table: {} finished runs seeded in {:.1} s; tables {:.0} MiB; {} runs in flight",
            b.seeded_runs,
            b.seed_seconds,
            mib(b.database_bytes),
            b.in_flight
        );
        let _ = writeln!(
            out,
            "  ms                         {:>6} {:>8} {:>8} {:>8} {:>8}",
            "count", "p50", "p90", "p99", "max"
        );
        for (name, p) in [
            ("reaper sweep", &b.reap_sweep_ms),
            ("next reap deadline", &b.next_deadline_ms),
            ("GET /v1/runs?limit=50", &b.list_runs_ms),
            ("claim (1 run, no wait)", &b.claim_ms),
        ] {
            let _ = writeln!(
                out,
                "    {:<24} {:>6} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
                name, p.count, p.p50, p.p90, p.p99, p.max
            );
        }
        let _ = writeln!(
            out,
            "  runs reaped by the timed sweeps: {}; empty claims: {}",
            b.reaped, b.empty_claims
        );
        let _ = writeln!(out);
        let _ = writeln!(out, "Throughput, big table");
        render_throughput(&mut out, &b.throughput);
    }
    out
}

fn mib_of_kib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn line(out: &mut String, name: &str, p: &Percentiles) {
    let _ = writeln!(
        out,
        "  {name:<26} p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}  ({} samples)",
        p.p50, p.p90, p.p99, p.max, p.count
    );
}

/// The "succeeded exactly once" line every section ends with.
fn once(out: &mut String, succeeded: impl std::fmt::Display, of: impl std::fmt::Display) {
    let _ = writeln!(out, "  succeeded exactly once     {succeeded:>9}   of {of}");
}

/// Runs handed back unstarted (they waited past a local queue's limit), when any were.
fn handed_back(out: &mut String, runs: u64) {
    if runs > 0 {
        let _ = writeln!(
            out,
            "  handed back unstarted      {runs:>9}   (waited past a local queue's limit; ran once)"
        );
    }
}

/// The real path's report.
pub(crate) fn real(r: &RealReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "tether bench --real: {} ({})", r.store, r.database);
    let _ = writeln!(
        out,
        "`{}` in real processes; {} `tether worker` process(es) of {} cpus; a `tether server` child process",
        r.command.join(" "),
        r.workers,
        r.cpus
    );
    let d = &r.drain;
    let _ = writeln!(out);
    let _ = writeln!(out, "Drain: {} runs queued, then drained", d.runs);
    let _ = writeln!(
        out,
        "  runs/s                     {:>9.1}   (first start to last finish: {:.2} s; queued in {:.2} s with POST /v1/runs/batch)",
        d.runs_per_s, d.seconds, d.submit_seconds
    );
    line(&mut out, "refill gap ms", &d.refill_gap_ms);
    once(&mut out, d.succeeded_once, d.runs);
    handed_back(&mut out, d.handed_back);
    if let Some(i) = &r.idle {
        let _ = writeln!(out);
        let _ = writeln!(out, "One run at a time ({} runs, idle system)", i.runs);
        line(&mut out, "submit→start ms", &i.submit_to_start_ms);
        once(&mut out, i.succeeded_once, i.runs);
    }
    if let Some(b) = &r.backlog {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Backlog: {} runs queued in {:.1} s, drained by fresh workers in {:.1} s ({:.1} runs/s)",
            b.runs, b.submit_seconds, b.drain_seconds, b.runs_per_s
        );
        let _ = writeln!(
            out,
            "  server RSS MiB             before {:.1}  queued {:.1}  peak while draining {:.1}  after {:.1}  (VmHWM {:.1})",
            mib_of_kib(b.server_before.rss_kib),
            mib_of_kib(b.server_queued.rss_kib),
            mib_of_kib(b.server_peak_rss_kib),
            mib_of_kib(b.server_after.rss_kib),
            mib_of_kib(b.server_after.hwm_kib)
        );
        let _ = writeln!(
            out,
            "  worker RSS MiB             peak (VmHWM) {:.1}  at the end {:.1}",
            mib_of_kib(b.worker_peak_hwm_kib),
            mib_of_kib(b.worker_after_rss_kib)
        );
        once(&mut out, b.succeeded_once, b.runs);
        handed_back(&mut out, b.handed_back);
    }
    if let Some(f) = &r.followers {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Followers: {} of {} connected to one run's events in {:.1} s, watched {:.1} s",
            f.connected, f.followers, f.connect_seconds, f.watched_seconds
        );
        let _ = writeln!(
            out,
            "  server RSS MiB             before {:.1}  connected {:.1}  ({:.1} KiB per follower)",
            mib_of_kib(f.server_before.rss_kib),
            mib_of_kib(f.server_connected.rss_kib),
            f.per_follower_kib
        );
        line(&mut out, "heartbeat gap ms", &f.heartbeat_gap_ms);
        let _ = writeln!(
            out,
            "  heartbeats on time         {:>9}   of {} (every {:.0} ms, none later than 1.5×)",
            f.on_time, f.followers, f.heartbeat_interval_ms
        );
        let _ = writeln!(
            out,
            "  reached `end`              {:>9}   of {} (once the run was cancelled)",
            f.ended, f.followers
        );
    }
    out
}
