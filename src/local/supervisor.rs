//! The supervision loop: reads the state store, carries out what
//! [`crate::scenario`] decides (admission, lifecycle) with child processes,
//! and records every change before acting on the next.
//!
//! One task owns every child. It wakes on a stored command, a child's exit,
//! a restart or stop deadline, or shutdown, then reconciles: stops the
//! workers of stopped or superseded scenarios (SIGTERM to the worker's
//! process group, SIGKILL after STOP_GRACE_MS), restarts workers whose
//! backoff is over, and starts the oldest waiting scenarios while fewer than
//! MAX_WORKERS hold a slot. A worker holds its slot from its start until its
//! process has exited — also while it is being stopped or waits to restart.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use std::io::Write;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{Notify, mpsc, watch};

use super::events::PhaseEvents;
use super::metrics::LocalMetrics;
use super::process::{self, Launch, WorkerCommand};
use super::state::{Record, StateError, StateStore};
use crate::camera_url::{CameraSource, redact_urls};
use crate::scenario::Phase;
use crate::scenario::admission::{self, Waiting};
use crate::scenario::lifecycle::{self, Exit, Intent, Next, RestartPolicy};
use crate::scenario::supervision::{self, Step, View};

pub struct Settings {
    pub max_workers: usize,
    pub policy: RestartPolicy,
    pub stop_grace: Duration,
    pub worker: WorkerCommand,
    pub default_fps: String,
    pub default_model: String,
    /// Worker log lines are JSON objects: forward them unchanged.
    pub json_logs: bool,
    pub state_dir: PathBuf,
    /// Return once every scenario has ended and no worker runs.
    pub exit_when_done: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(
        "workers of a previous run on STATE_DIR={dir} did not stop (PIDs {pids:?}); stop them and start again"
    )]
    OrphansSurvive { dir: PathBuf, pids: Vec<u32> },
}

/// What one reconcile found.
#[derive(Default)]
struct Round {
    /// The earliest pending restart.
    next_restart: Option<chrono::DateTime<Utc>>,
    /// Every scenario has ended (Succeeded, Failed, Stopped).
    all_ended: bool,
}

/// A worker process of this supervisor.
struct Child {
    pid: u32,
    run: u64,
    /// Set once the worker was asked to stop, with why and when.
    stopping: Option<(Intent, Instant)>,
    killed: bool,
}

struct Exited {
    uuid: String,
    pid: u32,
    exit: Exit,
}

pub struct Supervisor {
    state: Arc<StateStore>,
    settings: Settings,
    events: PhaseEvents,
    metrics: Arc<LocalMetrics>,
    wake: Arc<Notify>,
    children: HashMap<String, Child>,
    exits_tx: mpsc::UnboundedSender<Exited>,
    exits_rx: mpsc::UnboundedReceiver<Exited>,
}

impl Supervisor {
    pub fn new(
        state: Arc<StateStore>,
        settings: Settings,
        events: PhaseEvents,
        metrics: Arc<LocalMetrics>,
        wake: Arc<Notify>,
    ) -> Self {
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        Supervisor {
            state,
            settings,
            events,
            metrics,
            wake,
            children: HashMap::new(),
            exits_tx,
            exits_rx,
        }
    }

    /// After a crash of the previous supervisor: stops the workers it left
    /// behind, then puts every scenario that had a worker back in the queue
    /// at its old place. Nothing starts before this returns.
    pub async fn recover(&mut self) -> Result<(), SupervisorError> {
        let dir = &self.settings.state_dir;
        let orphans = process::find_workers(dir);
        if !orphans.is_empty() {
            tracing::warn!(
                count = orphans.len(),
                "stopping workers left behind by a previous supervisor on this STATE_DIR"
            );
            let pids: Vec<(u32, Option<u64>)> = orphans
                .iter()
                .map(|o| (o.pid, process::start_time(o.pid)))
                .collect();
            for (pid, _) in &pids {
                process::signal_group(*pid, libc::SIGTERM);
            }
            let alive = |pids: &[(u32, Option<u64>)]| -> Vec<u32> {
                pids.iter()
                    .filter(|(pid, start)| process::is_running(*pid, *start))
                    .map(|(pid, _)| *pid)
                    .collect()
            };
            let mut left = wait_until_gone(&pids, self.settings.stop_grace, alive).await;
            if !left.is_empty() {
                for pid in &left {
                    process::signal_group(*pid, libc::SIGKILL);
                }
                left = wait_until_gone(&pids, Duration::from_secs(10), alive).await;
            }
            if !left.is_empty() {
                return Err(SupervisorError::OrphansSurvive {
                    dir: dir.clone(),
                    pids: left,
                });
            }
            self.metrics.orphans_stopped.inc_by(orphans.len() as u64);
        }
        for record in self.state.all()? {
            if record.phase.is_some_and(Phase::is_live) {
                self.requeue_without_worker(&record.uuid)?;
                tracing::info!(scenario = %record.uuid, "scenario had a worker when the previous supervisor ended; queued again");
            }
        }
        Ok(())
    }

    /// Back to the queue at its old place, with no worker recorded: the
    /// scenario starts again when admission gives it a slot.
    fn requeue_without_worker(&self, uuid: &str) -> Result<(), StateError> {
        self.state.update(uuid, |r| {
            if let Some(r) = r.as_mut() {
                r.phase = None;
                r.pid = None;
                r.pid_start = None;
                r.restart_at = None;
            }
        })
    }

    /// Supervises until `shutdown` turns true, then stops every worker
    /// (SIGTERM, SIGKILL after the grace period) and returns.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            self.metrics.loop_alive();
            let round = self.reconcile().unwrap_or_else(|e| {
                self.metrics.state_errors.inc();
                tracing::error!(error = %e, "cannot read or write the state store; retrying");
                Round::default()
            });
            if self.settings.exit_when_done && round.all_ended {
                tracing::info!("every scenario has ended; exiting (EXIT_WHEN_DONE)");
                break;
            }
            let next = self
                .next_deadline(round.next_restart)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(5));
            tokio::select! {
                Some(exited) = self.exits_rx.recv() => self.on_exit(exited),
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = shutdown.changed() => break,
            }
        }
        self.stop_all().await;
    }

    /// The earliest moment something is due: a SIGKILL after the grace
    /// period, or a restart.
    fn next_deadline(&self, restart: Option<chrono::DateTime<Utc>>) -> Option<Instant> {
        let kills = self.children.values().filter_map(|c| match c.stopping {
            Some((_, at)) if !c.killed => Some(at + self.settings.stop_grace),
            _ => None,
        });
        let restart =
            restart.map(|at| Instant::now() + (at - Utc::now()).to_std().unwrap_or_default());
        kills.chain(restart).min()
    }

    fn reconcile(&mut self) -> Result<Round, SupervisorError> {
        for child in self.children.values_mut() {
            if let Some((_, at)) = child.stopping
                && !child.killed
                && at.elapsed() >= self.settings.stop_grace
            {
                tracing::warn!(
                    pid = child.pid,
                    "worker did not stop within STOP_GRACE_MS; sending SIGKILL"
                );
                process::signal_group(child.pid, libc::SIGKILL);
                child.killed = true;
            }
        }
        let records = self.state.all()?;
        let now = Utc::now();
        let mut waiting = Vec::new();
        let mut restart = Vec::new();
        let mut held = 0;
        let mut round = Round {
            next_restart: None,
            all_ended: true,
        };
        for record in &records {
            let child = self.children.get_mut(&record.uuid);
            let step = supervision::step(View {
                stopped: record.applied.stopped(),
                phase: record.phase,
                worker: child.as_ref().map(|c| c.run == record.run),
                restart_due: record.restart_at.is_none_or(|at| at <= now),
            });
            if step.holds_slot() {
                held += 1;
            }
            round.all_ended &= step == Step::Nothing;
            match step {
                Step::StopWorker(intent) => {
                    if let Some(child) = child {
                        stop(child, intent);
                    }
                }
                Step::MarkStopped => {
                    self.transition(&record.uuid, Phase::Stopped, None, |r| {
                        r.finished_at = Some(Utc::now());
                        r.queue_position = None;
                        r.restart_at = None;
                    })?;
                }
                Step::Wait => waiting.push(Waiting {
                    key: record.uuid.clone(),
                    created: record.enqueued_at,
                }),
                Step::HoldSlot { restart_now: true } => restart.push(record),
                Step::HoldSlot { restart_now: false } => {
                    if let Some(at) = record.restart_at {
                        round.next_restart = Some(round.next_restart.map_or(at, |n| n.min(at)));
                    }
                }
                Step::KeepWorker | Step::Nothing => {}
            }
        }
        for record in restart {
            self.start(record)?;
        }
        let decision = admission::decide(waiting, held, self.settings.max_workers);
        let by_uuid: HashMap<&str, &Record> =
            records.iter().map(|r| (r.uuid.as_str(), r)).collect();
        for uuid in &decision.start {
            if let Some(record) = by_uuid.get(uuid.as_str()) {
                self.start(record)?;
            }
        }
        for (uuid, position) in &decision.queued {
            let position = *position;
            self.transition(uuid, Phase::Queued, None, |r| {
                r.queue_position = Some(position);
            })?;
        }
        self.metrics.queue_length.set(decision.queued.len() as i64);
        self.metrics
            .live_workers
            .set((held + decision.start.len()) as i64);
        Ok(round)
    }

    /// Sets a scenario's phase (and whatever `edit` changes) in one
    /// transaction, publishing an event when the phase changed.
    fn transition(
        &self,
        uuid: &str,
        phase: Phase,
        message: Option<String>,
        edit: impl FnOnce(&mut Record),
    ) -> Result<(), SupervisorError> {
        let old = self.state.update(uuid, |r| {
            let r = r.as_mut()?;
            let old = r.phase;
            r.phase = Some(phase);
            edit(r);
            Some(old)
        })?;
        if let Some(old) = old
            && old != Some(phase)
        {
            let (reason, default) = lifecycle::phase_reason(phase);
            self.events
                .publish(uuid, phase, reason, message.as_deref().unwrap_or(default));
        }
        Ok(())
    }

    fn start(&mut self, record: &Record) -> Result<(), SupervisorError> {
        let fps = record
            .fps
            .map(|f| f.to_string())
            .unwrap_or_else(|| self.settings.default_fps.clone());
        let model = record
            .model
            .clone()
            .unwrap_or_else(|| self.settings.default_model.clone());
        let beats = super::health::file(&self.settings.state_dir, &record.uuid);
        // Private like the rest of the state directory.
        if let Some(dir) = beats.parent()
            && let Err(e) = std::os::unix::fs::DirBuilderExt::mode(
                std::fs::DirBuilder::new().recursive(true),
                0o700,
            )
            .create(dir)
        {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot create the heartbeat folder; `runner local list` shows no stream health");
        }
        let env = [
            ("SCENARIO_UUID", record.uuid.clone()),
            ("CAMERA_URL", record.camera_url.clone()),
            ("VIDEO_FPS", fps),
            ("MODEL", model),
            ("HEARTBEAT_FILE", beats.display().to_string()),
        ];
        let launch = Launch {
            env: &env,
            origin: record.origin,
            finite: crate::scenario::source::is_finite(&record.camera_url),
        };
        let mut child = match self.settings.worker.spawn(&launch) {
            Ok(child) => child,
            Err(e) => {
                let error = format!(
                    "cannot start {}: {e}",
                    self.settings.worker.program.display()
                );
                tracing::error!(scenario = %record.uuid, "{error}");
                return self.ended(
                    &record.uuid,
                    Intent::Run,
                    record.run,
                    Exit::Code(127),
                    Some(error),
                );
            }
        };
        let Some(pid) = child.id() else {
            return Ok(());
        };
        let pid_start = process::start_time(pid);
        let uuid = record.uuid.clone();
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward_lines(out, None));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward_lines(
                err,
                Some(LogOf {
                    uuid: uuid.clone(),
                    json: self.settings.json_logs,
                    camera: CameraSource::parse(&record.camera_url, Some(Path::new("/"))).ok(),
                }),
            ));
        }
        let exits = self.exits_tx.clone();
        tokio::spawn({
            let uuid = uuid.clone();
            async move {
                let exit = match child.wait().await {
                    Ok(status) => match (status.code(), status.signal()) {
                        (Some(code), _) => Exit::Code(code),
                        (None, Some(sig)) => Exit::Signal(sig),
                        (None, None) => Exit::Code(-1),
                    },
                    Err(_) => Exit::Code(-1),
                };
                let _ = exits.send(Exited { uuid, pid, exit });
            }
        });
        self.children.insert(
            uuid.clone(),
            Child {
                pid,
                run: record.run,
                stopping: None,
                killed: false,
            },
        );
        self.metrics.workers_started.inc();
        let restarted = record.phase == Some(Phase::Starting);
        let message = if restarted {
            format!(
                "worker restarted (restart {} of {})",
                record.restarts, self.settings.policy.budget
            )
        } else {
            "worker is running".to_string()
        };
        tracing::info!(scenario = %uuid, pid, "worker started");
        self.transition(&uuid, Phase::Running, Some(message), |r| {
            r.pid = Some(pid);
            r.pid_start = pid_start;
            r.restart_at = None;
            r.queue_position = None;
            if !restarted {
                r.started_at = Some(Utc::now());
            }
        })
    }

    fn on_exit(&mut self, exited: Exited) {
        let (intent, run) = match self.children.get(&exited.uuid) {
            Some(child) if child.pid == exited.pid => (
                child.stopping.map_or(Intent::Run, |(intent, _)| intent),
                child.run,
            ),
            _ => return,
        };
        self.children.remove(&exited.uuid);
        tracing::info!(scenario = %exited.uuid, pid = exited.pid, "{}", exited.exit.describe());
        if let Err(e) = self.ended(&exited.uuid, intent, run, exited.exit, None) {
            self.metrics.state_errors.inc();
            tracing::error!(error = %e, scenario = %exited.uuid, "cannot record a worker's end");
        }
    }

    /// Records what follows a worker's end, as [`lifecycle::after_exit`] decides.
    fn ended(
        &self,
        uuid: &str,
        intent: Intent,
        run: u64,
        exit: Exit,
        error: Option<String>,
    ) -> Result<(), SupervisorError> {
        let Some(record) = self.state.get(uuid)? else {
            return Ok(());
        };
        // The store is the truth: a stop or a newer deploy stored after the
        // worker ended by itself still decides.
        let intent = if record.applied.stopped() {
            Intent::Stop
        } else if record.run != run {
            Intent::Supersede
        } else {
            intent
        };
        let error = error.unwrap_or_else(|| exit.describe());
        let next = lifecycle::after_exit(
            intent,
            exit,
            crate::scenario::source::is_finite(&record.camera_url),
            record.restarts,
            &self.settings.policy,
            rand::random::<f64>(),
        );
        let finish = |r: &mut Record| {
            r.pid = None;
            r.pid_start = None;
            r.restart_at = None;
            r.finished_at = Some(Utc::now());
        };
        match next {
            Next::Succeeded => self.transition(uuid, Phase::Succeeded, None, finish),
            Next::Stopped => self.transition(uuid, Phase::Stopped, None, finish),
            Next::Failed => {
                let message = format!(
                    "{error}; restart budget of {} spent",
                    self.settings.policy.budget
                );
                let last = message.clone();
                self.transition(uuid, Phase::Failed, Some(message), |r| {
                    finish(r);
                    r.last_error = Some(last);
                })
            }
            Next::Restart { restart, delay } => {
                self.metrics.worker_restarts.inc();
                let message = format!(
                    "{error}; restart {restart} of {} in {:.1} s",
                    self.settings.policy.budget,
                    delay.as_secs_f64()
                );
                let at = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
                self.transition(uuid, Phase::Starting, Some(message), |r| {
                    r.pid = None;
                    r.pid_start = None;
                    r.restarts = restart;
                    r.restart_at = Some(at);
                    r.last_error = Some(error.clone());
                })
            }
            Next::Requeue => {
                self.requeue_without_worker(uuid)?;
                Ok(())
            }
            Next::Keep => Ok(()),
        }
    }

    /// SIGTERM to every worker, SIGKILL to those still there after the grace
    /// period. Scenarios keep their phase and resume on the next start.
    async fn stop_all(&mut self) {
        if self.children.is_empty() {
            return;
        }
        tracing::info!(workers = self.children.len(), "stopping every worker");
        for child in self.children.values_mut() {
            stop(child, Intent::Shutdown);
        }
        let grace = tokio::time::sleep(self.settings.stop_grace);
        tokio::pin!(grace);
        let mut killed = false;
        let give_up = tokio::time::sleep(self.settings.stop_grace + Duration::from_secs(10));
        tokio::pin!(give_up);
        while !self.children.is_empty() {
            tokio::select! {
                Some(exited) = self.exits_rx.recv() => {
                    self.children.remove(&exited.uuid);
                    // It runs again on the next start; until then it is listed as queued.
                    if let Err(e) = self.requeue_without_worker(&exited.uuid) {
                        tracing::error!(error = %e, scenario = %exited.uuid, "cannot record a stopped worker");
                    }
                }
                _ = &mut grace, if !killed => {
                    for child in self.children.values() {
                        tracing::warn!(pid = child.pid, "worker did not stop within STOP_GRACE_MS; sending SIGKILL");
                        process::signal_group(child.pid, libc::SIGKILL);
                    }
                    killed = true;
                }
                _ = &mut give_up => {
                    tracing::error!(workers = self.children.len(), "workers still running after SIGKILL");
                    return;
                }
            }
        }
    }
}

/// Asks a worker to stop (once); a stop outranks a replacement.
fn stop(child: &mut Child, intent: Intent) {
    match child.stopping {
        None => {
            process::signal_group(child.pid, libc::SIGTERM);
            child.stopping = Some((intent, Instant::now()));
        }
        Some((Intent::Supersede, at)) if intent == Intent::Stop || intent == Intent::Shutdown => {
            child.stopping = Some((intent, at));
        }
        Some(_) => {}
    }
}

async fn wait_until_gone(
    pids: &[(u32, Option<u64>)],
    within: Duration,
    alive: impl Fn(&[(u32, Option<u64>)]) -> Vec<u32>,
) -> Vec<u32> {
    let deadline = Instant::now() + within;
    loop {
        let left = alive(pids);
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whose log lines are forwarded.
struct LogOf {
    uuid: String,
    /// JSON log lines: passed on without a prefix.
    json: bool,
    /// The scenario's camera, whose credentials no forwarded line may show.
    camera: Option<CameraSource>,
}

impl LogOf {
    /// A log line of the worker as the supervisor writes it: scrubbed of the
    /// camera's credentials and of every URL's secrets (the worker scrubs
    /// its own lines; this covers anything that reached its standard error
    /// otherwise), and in text logs marked with the scenario's UUID.
    fn line(&self, raw: &[u8]) -> Vec<u8> {
        let text = String::from_utf8_lossy(raw);
        let scrubbed = match &self.camera {
            Some(camera) => camera.scrub(&text),
            None => redact_urls(&text),
        };
        if self.json {
            scrubbed.into_bytes()
        } else {
            format!("[scenario {}] {scrubbed}", self.uuid).into_bytes()
        }
    }
}

/// Copies a worker's output to the supervisor's, one whole line per locked
/// write, so lines of different workers never mix: standard output as it is
/// (results with SINK=stdout), log lines on standard error scrubbed and, in
/// text logs, marked with the scenario's UUID ([`LogOf::line`]).
async fn forward_lines(from: impl AsyncRead + Unpin, log_of: Option<LogOf>) {
    let mut reader = BufReader::new(from);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if !line.ends_with(b"\n") {
                    line.push(b'\n');
                }
                let written = match &log_of {
                    None => {
                        let mut stdout = std::io::stdout().lock();
                        stdout.write_all(&line).and_then(|()| stdout.flush())
                    }
                    Some(log_of) => std::io::stderr().lock().write_all(&log_of.line(&line)),
                };
                if written.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayed_log_lines_are_scrubbed_and_marked() {
        let camera = "http://admin:pw@cam.example/live/index.m3u8";
        let text = LogOf {
            uuid: "550e8400-e29b-41d4-a716-446655440000".into(),
            json: false,
            camera: CameraSource::parse(camera, Some(Path::new("/"))).ok(),
        };
        let line = b"[hls @ 0x1] Error when loading first segment 'http://admin:pw@cam.example/live/seg0.ts'\n";
        assert_eq!(
            String::from_utf8(text.line(line)).unwrap(),
            "[scenario 550e8400-e29b-41d4-a716-446655440000] [hls @ 0x1] Error when loading first segment 'http://***@cam.example/live/seg0.ts'\n"
        );
        let json = LogOf {
            json: true,
            camera: None,
            ..text
        };
        let line = br#"{"level":"WARN","message":"'rtsp://u:Secret1@cam/a'"}"#;
        assert_eq!(
            String::from_utf8(json.line(line)).unwrap(),
            r#"{"level":"WARN","message":"'rtsp://***@cam/a'"}"#
        );
    }
}
