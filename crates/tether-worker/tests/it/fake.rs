//! An in-memory [`AttemptReporter`] that records what it is told.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tether_api::Assignment;
use tether_worker::{
    supervise, AppendAck, AttemptControl, AttemptEnd, AttemptReporter, AttemptStats, Finish,
    OutputChunk, OutputStream, ReportError, SupervisorOptions,
};

#[derive(Debug, Default)]
pub struct Record {
    pub pid: Option<u32>,
    pub chunks: Vec<OutputChunk>,
    pub finishes: Vec<Finish>,
    pub append_calls: usize,
    /// What happened, in order: `start`, `started` (its answer), `append`, `finish`.
    pub calls: Vec<&'static str>,
}

#[derive(Debug, Default, Clone)]
pub struct Behaviour {
    /// `start` answers `409`.
    pub start_stale: bool,
    /// `append` answers `stop: true` once this many bytes were taken.
    pub stop_after_bytes: Option<usize>,
    /// The first this-many `append` calls fail as if the server were away.
    pub transient_append_failures: usize,
    /// Each `append` takes this long (a slow server).
    pub append_delay: Option<Duration>,
    /// `start` takes this long to answer.
    pub start_delay: Option<Duration>,
}

#[derive(Debug, Default)]
pub struct FakeReporter {
    pub record: Mutex<Record>,
    pub behaviour: Mutex<Behaviour>,
}

impl FakeReporter {
    pub fn new() -> Arc<FakeReporter> {
        Arc::new(FakeReporter::default())
    }

    pub fn with(behaviour: Behaviour) -> Arc<FakeReporter> {
        Arc::new(FakeReporter {
            record: Mutex::default(),
            behaviour: Mutex::new(behaviour),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.record.lock().unwrap().pid
    }

    pub fn output(&self, stream: OutputStream) -> Vec<u8> {
        let record = self.record.lock().unwrap();
        record
            .chunks
            .iter()
            .filter(|c| c.stream == stream)
            .flat_map(|c| c.data.iter().copied())
            .collect()
    }

    pub fn chunks(&self) -> Vec<OutputChunk> {
        self.record.lock().unwrap().chunks.clone()
    }

    pub fn finishes(&self) -> Vec<Finish> {
        self.record.lock().unwrap().finishes.clone()
    }

    /// Polls until the process has started, for at most `limit`.
    pub async fn wait_for_pid(&self, limit: Duration) -> u32 {
        tether_testkit::eventually("the process to start", limit, async || self.pid()).await
    }
}

#[async_trait]
impl AttemptReporter for FakeReporter {
    async fn start(
        &self,
        _run_id: &str,
        _attempt: u32,
        pid: u32,
        _at: std::time::Instant,
    ) -> Result<(), ReportError> {
        {
            let mut record = self.record.lock().unwrap();
            record.pid = Some(pid);
            record.calls.push("start");
        }
        let behaviour = self.behaviour.lock().unwrap().clone();
        if let Some(delay) = behaviour.start_delay {
            tokio::time::sleep(delay).await;
        }
        self.record.lock().unwrap().calls.push("started");
        if behaviour.start_stale {
            return Err(ReportError::Stale);
        }
        Ok(())
    }

    async fn append(
        &self,
        _run_id: &str,
        _attempt: u32,
        chunks: &[OutputChunk],
    ) -> Result<AppendAck, ReportError> {
        let behaviour = self.behaviour.lock().unwrap().clone();
        if let Some(delay) = behaviour.append_delay {
            tokio::time::sleep(delay).await;
        }
        {
            let mut record = self.record.lock().unwrap();
            record.append_calls += 1;
            record.calls.push("append");
            if record.append_calls <= behaviour.transient_append_failures {
                return Err(ReportError::Transient("server away".into()));
            }
            record.chunks.extend_from_slice(chunks);
        }
        let taken: usize = self
            .record
            .lock()
            .unwrap()
            .chunks
            .iter()
            .map(|c| c.data.len())
            .sum();
        let stop = behaviour
            .stop_after_bytes
            .is_some_and(|limit| taken >= limit);
        Ok(AppendAck {
            stop,
            resend_from: None,
        })
    }

    async fn finish(
        &self,
        _run_id: &str,
        _attempt: u32,
        finish: &Finish,
        _at: std::time::Instant,
    ) -> Result<(), ReportError> {
        let mut record = self.record.lock().unwrap();
        record.finishes.push(finish.clone());
        record.calls.push("finish");
        Ok(())
    }
}

pub fn assignment(command: &[&str]) -> Assignment {
    Assignment {
        run_id: "run-1".into(),
        attempt: 1,
        command: command.iter().map(|s| s.to_string()).collect(),
        env: Default::default(),
        cwd: None,
        timeout_ms: None,
        stall_timeout_ms: None,
        output_limit_bytes: 1 << 30,
        resources: None,
    }
}

pub fn sh(script: &str) -> Assignment {
    assignment(&["sh", "-c", script])
}

pub fn options() -> SupervisorOptions {
    SupervisorOptions {
        kill_grace: Duration::from_millis(500),
        ..SupervisorOptions::default()
    }
}

/// Supervises `assignment` in a task of its own; the control steers it, the handle ends with
/// it.
pub fn spawned(
    assignment: Assignment,
    reporter: Arc<FakeReporter>,
    options: SupervisorOptions,
) -> (AttemptControl, tokio::task::JoinHandle<AttemptEnd>) {
    let (control, rx) = AttemptControl::new();
    let task = tokio::spawn(supervise(
        assignment,
        reporter,
        Arc::new(AttemptStats::new()),
        rx,
        options,
    ));
    (control, task)
}

/// Supervises `assignment` to its end (at most `limit`), with a control nobody uses.
pub async fn run(
    assignment: Assignment,
    reporter: Arc<FakeReporter>,
    limit: Duration,
) -> AttemptEnd {
    let (control, rx) = AttemptControl::new();
    let end = tokio::time::timeout(
        limit,
        supervise(
            assignment,
            reporter,
            Arc::new(AttemptStats::new()),
            rx,
            options(),
        ),
    )
    .await
    .expect("the attempt did not end in time");
    drop(control);
    end
}
