//! Heartbeats → Scenario status: `status.stream` and the `Streaming`
//! condition.
//!
//! A consumer reads HEARTBEAT_TOPIC (every partition, from its end, no
//! consumer group: each replica keeps its own map and only the leader acts
//! on it) and keeps the newest beat per scenario. Status is still written by
//! the reconcile alone, with the resourceVersion its plan was made from, so
//! heartbeats never race a verdict: the reconcile [`fold`]s the newest beat
//! into the status it planned. What decides whether a beat is worth a write
//! is the same pure [`fold`]: a change of state or of the condition's
//! status or reason at once, otherwise at most every STREAM_STATUS_SECS. A
//! sweep once a second finds the Scenarios whose fold would change their
//! status and wakes their reconciles, changes first, at most
//! STREAM_STATUS_WRITES a second.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clap::Args;
use futures::StreamExt;
use futures::channel::mpsc::UnboundedSender;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::crd::{Scenario, ScenarioStatus, StreamStatus};
use crate::heartbeat::{Heartbeat, SILENT_AFTER_BEATS};
use crate::kafka::KafkaContext;
use crate::scenario::health::{StreamTarget, judge};

pub const STREAMING: &str = "Streaming";

/// How heartbeats reach Scenario status.
#[derive(Debug, Clone, Args)]
pub struct StreamStatusArgs {
    /// Seconds between two writes of a Scenario's status.stream while its state and Streaming condition stay the same (changes are written at once).
    #[arg(
        long,
        env = "STREAM_STATUS_SECS",
        value_name = "STREAM_STATUS_SECS",
        default_value = "60",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub stream_status_secs: u64,

    /// Most Scenario status writes that heartbeats cause in any one second, over all Scenarios (changes go first; a write a verdict makes anyway carries the newest heartbeat without counting).
    #[arg(
        long,
        env = "STREAM_STATUS_WRITES",
        value_name = "STREAM_STATUS_WRITES",
        default_value = "20",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub stream_status_writes: u32,
}

/// What a fold did to a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    None,
    /// Newer figures, same state and condition.
    Refresh,
    /// A new state, or the condition's status or reason changed.
    Transition,
}

/// The newest heartbeat of one scenario and how long ago it came.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    pub beat: &'a Heartbeat,
    pub age: Duration,
}

fn stream_of(beat: &Heartbeat) -> StreamStatus {
    StreamStatus {
        state: beat.state.as_str().into(),
        fps: beat.fps,
        camera_fps: beat.camera_fps,
        lag_seconds: beat.last_frame_age_ms.map(|ms| ms as f64 / 1000.0),
        last_frame_time: beat.last_frame_time(),
        frames_dropped: beat.frames_dropped,
        decode_p95_ms: beat.decode_p95_ms,
        inference_p95_ms: beat.inference_p95_ms,
        heartbeat_time: beat.time().unwrap_or_else(Utc::now),
    }
}

/// How often beats come (when none told yet) and how often unchanged
/// figures are written.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub default_interval: Duration,
    pub refresh: Duration,
}

/// Folds the newest beat (`seen`) into `status` as planned; `quiet` is how
/// long the worker has been heard from by nobody (no beat since this
/// controller started, and none recorded newer). Pure.
pub fn fold(
    status: &mut ScenarioStatus,
    target: Option<&StreamTarget>,
    seen: Option<Seen<'_>>,
    quiet: Option<Duration>,
    timing: Timing,
    now: DateTime<Utc>,
    generation: Option<i64>,
) -> Change {
    let live = status.phase.is_some_and(|p| p.is_live());
    let (value, reason, message, stream) = if !live {
        match status.condition(STREAMING) {
            Some(c) if c.status == "True" => {
                let phase = status.phase.map_or("none", |p| p.as_str());
                (
                    false,
                    "NoWorker",
                    format!("no worker runs (phase {phase})"),
                    None,
                )
            }
            _ => return Change::None,
        }
    } else {
        let interval = seen.map_or(timing.default_interval, |s| {
            Duration::from_secs(s.beat.interval_secs.max(1))
        });
        let silent_after = interval * SILENT_AFTER_BEATS;
        // A worker still starting has not had its first chance to beat.
        let running = status.phase == Some(crate::scenario::Phase::Running);
        let silence = seen.map(|s| s.age).or(quiet.filter(|_| running));
        let stream = seen.map(|s| stream_of(s.beat));
        if let Some(quiet) = silence.filter(|q| *q >= silent_after) {
            (
                false,
                "HeartbeatsMissing",
                format!(
                    "no heartbeat for {} s (one is due every {} s): the worker is stuck, gone or cut off from Kafka",
                    quiet.as_secs(),
                    interval.as_secs()
                ),
                stream,
            )
        } else if let Some(s) = seen {
            let default = StreamTarget::default();
            let j = judge(s.beat, target.unwrap_or(&default));
            (j.streaming, j.reason, j.message, stream)
        } else {
            return Change::None;
        }
    };
    let same_condition = status
        .condition(STREAMING)
        .is_some_and(|c| (c.status == "True") == value && c.reason == reason);
    let change = match (&status.stream, &stream) {
        _ if !same_condition => Change::Transition,
        (Some(old), Some(new)) if old.state != new.state => Change::Transition,
        (None, Some(_)) => Change::Transition,
        (Some(old), Some(new))
            if new.heartbeat_time > old.heartbeat_time
                && (new.heartbeat_time - old.heartbeat_time)
                    .to_std()
                    .unwrap_or_default()
                    >= timing.refresh =>
        {
            Change::Refresh
        }
        _ => Change::None,
    };
    if change == Change::None {
        return change;
    }
    if let Some(stream) = stream {
        status.stream = Some(stream);
    }
    super::plan::set_condition(status, STREAMING, value, reason, &message, now, generation);
    change
}

/// Heartbeat counters and the wake queue's length.
#[derive(Default)]
pub struct HealthMetrics {
    pub heartbeats: Counter,
    pub heartbeats_invalid: Counter,
    pub stream_wakes: Counter,
    pub stream_wakes_waiting: Gauge,
}

impl HealthMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "heartbeats",
            "Worker heartbeats read",
            self.heartbeats.clone(),
        );
        r.register(
            "heartbeats_invalid",
            "Messages on the heartbeat topic that are not heartbeats (logged and skipped)",
            self.heartbeats_invalid.clone(),
        );
        r.register(
            "stream_status_wakes",
            "Reconciles woken to write a Scenario's stream health",
            self.stream_wakes.clone(),
        );
        r.register(
            "stream_status_waiting",
            "Scenarios waiting for their stream health to be written (STREAM_STATUS_WRITES)",
            self.stream_wakes_waiting.clone(),
        );
    }
}

struct Latest {
    beat: Heartbeat,
    at: Instant,
}

/// The newest beat per scenario UUID, and what to fold them with.
pub struct Health {
    latest: Mutex<HashMap<String, Latest>>,
    started: Instant,
    pub timing: Timing,
    pub metrics: Arc<HealthMetrics>,
    /// When the status writes heartbeats caused in the last second were let
    /// through (at most STREAM_STATUS_WRITES of them).
    writes: Mutex<VecDeque<Instant>>,
    writes_per_second: u32,
}

impl Health {
    pub fn new(args: &StreamStatusArgs, heartbeat_secs: u64, metrics: Arc<HealthMetrics>) -> Self {
        Health {
            latest: Mutex::new(HashMap::new()),
            started: Instant::now(),
            timing: Timing {
                refresh: Duration::from_secs(args.stream_status_secs),
                default_interval: Duration::from_secs(heartbeat_secs),
            },
            metrics,
            writes: Mutex::new(VecDeque::new()),
            writes_per_second: args.stream_status_writes,
        }
    }

    /// Lets one status write that only heartbeats cause go ahead, if fewer
    /// than STREAM_STATUS_WRITES went ahead in the last second; a refused
    /// one is written when the sweep wakes its Scenario again.
    pub fn take_write(&self) -> bool {
        let mut writes = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        admit(&mut writes, Instant::now(), self.writes_per_second)
    }

    fn record(&self, beat: Heartbeat) {
        let key = beat.scenario_uuid.to_string();
        let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        // A worker restarted begins again at seq 1; otherwise an older
        // (redelivered) beat does not replace a newer one.
        if let Some(old) = latest.get(&key)
            && beat.seq != 1
            && beat.seq <= old.beat.seq
            && beat.timestamp <= old.beat.timestamp
        {
            return;
        }
        latest.insert(
            key,
            Latest {
                beat,
                at: Instant::now(),
            },
        );
    }

    /// Folds what is known of `scenario`'s worker into `status`.
    pub fn fold_into(
        &self,
        status: &mut ScenarioStatus,
        scenario: &Scenario,
        now: DateTime<Utc>,
    ) -> Change {
        let latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        let entry = latest.get(&scenario.spec.scenario_uuid.to_ascii_lowercase());
        let seen = entry.map(|l| Seen {
            beat: &l.beat,
            age: l.at.elapsed(),
        });
        // No beat since this controller started: silent for as long as it
        // listened, or since the last beat written, whichever is shorter.
        let quiet = if entry.is_none() {
            let listened = self.started.elapsed();
            let since_written = status
                .stream
                .as_ref()
                .map(|s| s.heartbeat_time)
                .or(status.start_time)
                .and_then(|t| (now - t).to_std().ok());
            Some(since_written.map_or(listened, |w| w.min(listened)))
        } else {
            None
        };
        fold(
            status,
            scenario.spec.target.as_ref(),
            seen,
            quiet,
            self.timing,
            now,
            scenario.metadata.generation,
        )
    }
}

/// Whether one more event at `now` keeps `window` (the times of the events
/// let through, oldest first) within `per_second` in every second; records
/// it when it does.
fn admit(window: &mut VecDeque<Instant>, now: Instant, per_second: u32) -> bool {
    while window
        .front()
        .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
    {
        window.pop_front();
    }
    if window.len() >= per_second as usize {
        return false;
    }
    window.push_back(now);
    true
}

/// The consumer of HEARTBEAT_TOPIC: assigns every partition from its end and
/// keeps the newest beat per scenario; looks for new partitions every minute.
pub async fn consume(consumer: StreamConsumer<KafkaContext>, topic: String, health: Arc<Health>) {
    let mut assigned = 0usize;
    let mut next_look = Instant::now();
    let mut stream_started = false;
    loop {
        if Instant::now() >= next_look {
            // A metadata call blocks for up to its timeout.
            let found = tokio::task::block_in_place(|| {
                consumer
                    .client()
                    .fetch_metadata(Some(&topic), Duration::from_secs(10))
                    .ok()
                    .and_then(|m| m.topics().first().map(|t| t.partitions().len()))
                    .unwrap_or(0)
            });
            if found > assigned {
                let mut list = TopicPartitionList::new();
                for p in 0..found as i32 {
                    let _ = list.add_partition_offset(&topic, p, Offset::End);
                }
                match consumer.assign(&list) {
                    Ok(()) => {
                        tracing::info!(topic, partitions = found, "reading heartbeats");
                        assigned = found;
                        stream_started = true;
                    }
                    Err(e) => tracing::warn!(topic, error = %e, "cannot read heartbeats; retrying"),
                }
            } else if assigned == 0 {
                tracing::debug!(topic, "heartbeat topic not there yet");
            }
            next_look = Instant::now()
                + if assigned == 0 {
                    Duration::from_secs(5)
                } else {
                    Duration::from_secs(60)
                };
        }
        if !stream_started {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let wait = next_look.saturating_duration_since(Instant::now());
        let mut messages = consumer.stream();
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                msg = messages.next() => match msg {
                    Some(Ok(m)) => read(m.payload(), &health),
                    Some(Err(e)) => tracing::warn!(error = %e, "reading heartbeats failed"),
                    None => break,
                },
            }
        }
    }
}

fn read(payload: Option<&[u8]>, health: &Health) {
    match payload.map(serde_json::from_slice::<Heartbeat>) {
        Some(Ok(beat)) => {
            health.metrics.heartbeats.inc();
            health.record(beat);
        }
        Some(Err(e)) => {
            health.metrics.heartbeats_invalid.inc();
            tracing::warn!(error = %e, "a message on the heartbeat topic is not a heartbeat; skipped");
        }
        None => {
            health.metrics.heartbeats_invalid.inc();
            tracing::warn!("an empty message on the heartbeat topic; skipped");
        }
    }
}

/// Scenarios waiting for a status write, changes before refreshes.
#[derive(Default)]
struct Waiting {
    transitions: VecDeque<String>,
    refreshes: VecDeque<String>,
    queued: HashSet<String>,
}

impl Waiting {
    fn push(&mut self, name: String, change: Change) {
        if change == Change::None || !self.queued.insert(name.clone()) {
            return;
        }
        match change {
            Change::Transition => self.transitions.push_back(name),
            _ => self.refreshes.push_back(name),
        }
    }

    fn pop(&mut self) -> Option<String> {
        let name = self
            .transitions
            .pop_front()
            .or_else(|| self.refreshes.pop_front())?;
        self.queued.remove(&name);
        Some(name)
    }

    fn len(&self) -> usize {
        self.queued.len()
    }
}

/// Once a second: finds the Scenarios whose status a fold would change and
/// wakes their reconciles, at most `per_second` a second.
pub async fn pace(
    health: Arc<Health>,
    scenarios: Store<Scenario>,
    namespace: String,
    wake: UnboundedSender<ObjectRef<Scenario>>,
    per_second: u32,
) {
    let mut waiting = Waiting::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Utc::now();
        for s in scenarios.state() {
            let Some(mut status) = s.status.clone() else {
                continue;
            };
            let change = health.fold_into(&mut status, &s, now);
            waiting.push(s.name_any(), change);
        }
        // Spread this second's wakes over the second.
        let budget = per_second.min(waiting.len() as u32);
        for i in 0..budget {
            let Some(name) = waiting.pop() else { break };
            health.metrics.stream_wakes.inc();
            let _ = wake.unbounded_send(ObjectRef::new(&name).within(&namespace));
            if i + 1 < budget {
                tokio::time::sleep(Duration::from_secs(1) / per_second).await;
            }
        }
        health
            .metrics
            .stream_wakes_waiting
            .set(waiting.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_second_lets_more_writes_through_than_the_cap() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut window = VecDeque::new();
        let admitted: Vec<u64> = (0..4000)
            .step_by(10)
            .filter(|ms| admit(&mut window, at(*ms), 20))
            .collect();
        // Every one-second span, wherever it starts, holds at most 20.
        for (i, first) in admitted.iter().enumerate() {
            let within = admitted[i..]
                .iter()
                .take_while(|t| **t < first + 1000)
                .count();
            assert!(
                within <= 20,
                "{within} writes in the second from {first} ms"
            );
        }
        // And the cap is used: 20 in each of the four seconds.
        assert_eq!(admitted.len(), 80);
    }
    use crate::heartbeat::StreamState;
    use crate::scenario::Phase;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const T: Timing = Timing {
        default_interval: Duration::from_secs(10),
        refresh: Duration::from_secs(60),
    };

    fn beat(state: StreamState, at: &str) -> Heartbeat {
        Heartbeat {
            scenario_uuid: uuid::Uuid::nil(),
            timestamp: at.into(),
            state,
            seq: 2,
            interval_secs: 10,
            fps: 2.0,
            camera_fps: 10.0,
            frames: 20,
            frame_number: 40,
            last_frame_age_ms: Some(100),
            frames_dropped: 0,
            decode_p95_ms: Some(3.0),
            inference_p95_ms: Some(20.0),
        }
    }

    fn running() -> ScenarioStatus {
        ScenarioStatus {
            phase: Some(Phase::Running),
            ..Default::default()
        }
    }

    fn now() -> DateTime<Utc> {
        "2026-01-11T12:35:00Z".parse().unwrap()
    }

    fn fold_beat(status: &mut ScenarioStatus, b: &Heartbeat, age: Duration) -> Change {
        fold(
            status,
            None,
            Some(Seen { beat: b, age }),
            None,
            T,
            now(),
            Some(1),
        )
    }

    #[test]
    fn changes_are_written_at_once_figures_at_most_every_refresh() {
        let mut st = running();
        let first = beat(StreamState::Streaming, "2026-01-11T12:30:00.000Z");
        assert_eq!(fold_beat(&mut st, &first, S(1)), Change::Transition);
        let stream = st.stream.clone().unwrap();
        assert_eq!((stream.state.as_str(), stream.fps), ("streaming", 2.0));
        assert_eq!(
            stream.last_frame_time.unwrap().to_rfc3339(),
            "2026-01-11T12:29:59.900+00:00"
        );
        assert_eq!(st.condition(STREAMING).unwrap().reason, "Streaming");
        // Ten seconds later, other figures: not yet.
        let mut later = beat(StreamState::Streaming, "2026-01-11T12:30:10.000Z");
        later.fps = 1.9;
        assert_eq!(fold_beat(&mut st, &later, S(1)), Change::None);
        assert_eq!(st.stream.as_ref().unwrap().fps, 2.0);
        // A minute after the written one: a refresh.
        let minute = beat(StreamState::Streaming, "2026-01-11T12:31:00.000Z");
        assert_eq!(fold_beat(&mut st, &minute, S(1)), Change::Refresh);
        // A new state: at once.
        let dark = beat(StreamState::CameraDark, "2026-01-11T12:31:05.000Z");
        assert_eq!(fold_beat(&mut st, &dark, S(1)), Change::Transition);
        let c = st.condition(STREAMING).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "CameraDark")
        );
    }

    #[test]
    fn a_silent_worker_is_named() {
        let mut st = running();
        let b = beat(StreamState::Streaming, "2026-01-11T12:30:00.000Z");
        assert_eq!(fold_beat(&mut st, &b, S(1)), Change::Transition);
        assert_eq!(fold_beat(&mut st, &b, S(29)), Change::None);
        assert_eq!(fold_beat(&mut st, &b, S(31)), Change::Transition);
        let c = st.condition(STREAMING).unwrap();
        assert_eq!(c.reason, "HeartbeatsMissing");
        assert!(c.message.contains("no heartbeat for 31 s"), "{}", c.message);
        // Nothing heard since start-up, for long enough.
        let mut quiet = running();
        let change = fold(&mut quiet, None, None, Some(S(45)), T, now(), None);
        assert_eq!(change, Change::Transition);
        assert_eq!(
            quiet.condition(STREAMING).unwrap().reason,
            "HeartbeatsMissing"
        );
        let mut young = running();
        let change = fold(&mut young, None, None, Some(S(5)), T, now(), None);
        assert_eq!(change, Change::None);
    }

    #[test]
    fn a_target_shows_in_the_condition() {
        let mut st = running();
        let mut slow = beat(StreamState::Streaming, "2026-01-11T12:30:00.000Z");
        slow.fps = 1.0;
        slow.inference_p95_ms = Some(900.0);
        let target = StreamTarget {
            fps: Some(2.0),
            max_frame_age_seconds: None,
        };
        let seen = Seen {
            beat: &slow,
            age: S(1),
        };
        fold(&mut st, Some(&target), Some(seen), None, T, now(), None);
        let c = st.condition(STREAMING).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "InferenceTooSlow")
        );
    }

    #[test]
    fn a_scenario_without_a_worker_is_not_streaming() {
        let mut st = running();
        let b = beat(StreamState::Streaming, "2026-01-11T12:30:00.000Z");
        fold_beat(&mut st, &b, S(1));
        st.phase = Some(Phase::Stopped);
        assert_eq!(fold_beat(&mut st, &b, S(1)), Change::Transition);
        let c = st.condition(STREAMING).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "NoWorker")
        );
        assert_eq!(fold_beat(&mut st, &b, S(1)), Change::None);
        // Queued, never streamed: no condition at all.
        let mut queued = ScenarioStatus {
            phase: Some(Phase::Queued),
            ..Default::default()
        };
        assert_eq!(fold_beat(&mut queued, &b, S(1)), Change::None);
        assert!(queued.condition(STREAMING).is_none());
    }

    #[test]
    fn changes_wait_before_refreshes_and_once_each() {
        let mut w = Waiting::default();
        w.push("a".into(), Change::Refresh);
        w.push("b".into(), Change::Transition);
        w.push("a".into(), Change::Refresh);
        w.push("c".into(), Change::None);
        assert_eq!(w.len(), 2);
        assert_eq!(w.pop().as_deref(), Some("b"));
        assert_eq!(w.pop().as_deref(), Some("a"));
        assert_eq!(w.pop(), None);
    }
}
