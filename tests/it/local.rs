//! `runner local` against the test bed's Kafka broker, with real worker
//! processes on Debian's OpenCV sample clips.

use crate::common;
use std::collections::HashMap;
use std::time::Duration;

use crate::common::http_get;
use crate::common::local::{LocalBed, Sampler, TopicLog};
use crate::common::wait_for;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};

fn uuid(n: u32) -> String {
    format!("550e8400-e29b-41d4-a716-4466554{n:05}")
}

/// Results one worker gives for `clip` at VIDEO_FPS=2 (run once without pacing).
fn results_per_run(clip: &str) -> usize {
    let out = common::run_ok(
        common::worker(&uuid(99999), clip)
            .args(["--sink", "stdout", "--video-fps", "2"])
            .env("VIDEO_FILE_ROOT", common::MEDIA_DIR),
        "the runner binary is built by cargo test",
    );
    out.lines().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_workers_fifo_and_every_phase_change_published() {
    let bed = LocalBed::new("local-fifo").await;
    let clip = common::media("Megamind.avi");
    let expected = results_per_run(&clip);
    assert!(expected > 0);
    let events = TopicLog::start(&bed.bootstrap, &bed.events);
    let results = TopicLog::start(&bed.bootstrap, &bed.results);
    let sampler = Sampler::start(bed.state_dir());
    let mut local = bed.start(&[
        ("MAX_WORKERS", "2"),
        ("REALTIME", "true"),
        ("VIDEO_FPS", "2"),
    ]);
    let scenarios: Vec<String> = (1..=6).map(uuid).collect();
    for s in &scenarios {
        bed.deploy(s, &clip).await;
    }
    wait_for(
        "all 6 scenarios Succeeded",
        Duration::from_secs(180),
        || {
            local.assert_running();
            let done = bed
                .list()
                .values()
                .filter(|r| r.phase == "Succeeded")
                .count();
            async move { (done == 6).then_some(()) }
        },
    )
    .await;
    let samples = sampler.finish();
    assert!(samples.taken > 10, "{samples:?}");
    assert!(
        samples.most_alive == 2,
        "MAX_WORKERS=2 workers at once, never more, while four wait; saw at most {}",
        samples.most_alive
    );
    assert!(samples.doubles.is_empty(), "{:?}", samples.doubles);

    wait_for(
        "the phase changes on scenario_events",
        Duration::from_secs(30),
        || {
            let ended = scenarios
                .iter()
                .all(|s| events.phases(s).last().map(String::as_str) == Some("Succeeded"));
            async move { ended.then_some(()) }
        },
    )
    .await;
    let mut running_order = Vec::new();
    for (_, v) in events.all() {
        if v["phase"] == "Running" {
            running_order.push(v["scenario_uuid"].as_str().unwrap().to_string());
        }
        for field in ["scenario_uuid", "phase", "reason", "message", "timestamp"] {
            assert!(v[field].is_string(), "{field} in {v}");
        }
    }
    assert_eq!(running_order, scenarios, "started first come, first served");
    for (i, s) in scenarios.iter().enumerate() {
        let phases = events.phases(s);
        let want: &[&str] = if i < 2 {
            &["Running", "Succeeded"]
        } else {
            &["Queued", "Running", "Succeeded"]
        };
        assert_eq!(phases, want, "phases of scenario {i}");
    }

    wait_for(
        "every result on the results topic",
        Duration::from_secs(30),
        || {
            let n = results.all().len();
            async move { (n >= 6 * expected).then_some(()) }
        },
    )
    .await;
    let mut per_scenario: HashMap<String, usize> = HashMap::new();
    for (key, v) in results.all() {
        assert_eq!(key.as_deref(), v["scenario_uuid"].as_str());
        *per_scenario.entry(key.unwrap()).or_default() += 1;
    }
    for s in &scenarios {
        assert_eq!(per_scenario.get(s), Some(&expected), "results of {s}");
    }
    assert!(local.terminate().success(), "{}", local.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_run_once_bad_messages_go_to_the_dlq_and_undeploy_stops() {
    let bed = LocalBed::new("local-dup").await;
    let clip = common::media("vtest.avi");
    let events = TopicLog::start(&bed.bootstrap, &bed.events);
    let dlq = TopicLog::start(&bed.bootstrap, &bed.dlq);
    let sampler = Sampler::start(bed.state_dir());
    let mut local = bed.start(&[("MAX_WORKERS", "4"), ("REALTIME", "true")]);
    let s = uuid(1);
    for _ in 0..100 {
        bed.deploy(&s, &clip).await;
    }
    let bad: [&[u8]; 3] = [
        b"not json",
        br#"{"scenario_uuid": "550e8400-e29b-41d4-a716-446655440000"}"#,
        br#"{"worker_id": "11223344-5566-7788-99aa-bbccddeeeff0", "scenario_uuid": "550e8400-e29b-41d4-a716-446655440000", "camera_url": "ftp://cam/1"}"#,
    ];
    for payload in bad {
        bed.send(&bed.deploy, None, payload).await;
    }
    wait_for("3 dead letters", Duration::from_secs(60), || {
        local.assert_running();
        let n = dlq.all().len();
        async move { (n == 3).then_some(()) }
    })
    .await;
    let addr = local
        .metrics_addr()
        .expect("the metrics address in the log");
    // Commands of different scenarios are handled side by side: the dead
    // letters may come before the last of the 100 deploys is handled.
    wait_for("the 100 deploys handled", Duration::from_secs(60), || {
        let addr = addr.clone();
        async move {
            let metrics = http_get(&addr, "/metrics").await.1;
            metrics
                .contains("vap_local_ingested_total{kind=\"deploy\",result=\"refreshed\"} 99")
                .then_some(())
        }
    })
    .await;
    let rows = bed.list();
    assert_eq!(rows.len(), 1, "one scenario for 100 deploys: {rows:?}");
    assert_eq!(rows[&s].phase, "Running");
    assert_eq!(bed.workers().len(), 1);
    let mut reasons = dlq_reasons(&bed, 3).await;
    reasons.sort();
    assert_eq!(reasons, ["camera_url", "missing_field", "not_json"]);

    assert_eq!(http_get(&addr, "/healthz").await.0, 200);
    assert_eq!(http_get(&addr, "/readyz").await.0, 200);
    let (status, metrics) = http_get(&addr, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "vap_local_dead_lettered_total{category=\"not_json\"} 1",
        "vap_local_ingested_total{kind=\"deploy\",result=\"created\"} 1",
        "vap_local_ingested_total{kind=\"deploy\",result=\"refreshed\"} 99",
        "vap_local_live_workers 1",
        "vap_local_workers_started_total 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }

    // A second supervisor on the same STATE_DIR refuses to start.
    let mut second = bed.start(&[]);
    assert!(!second.wait_exit().success());
    let log = std::fs::read_to_string(&second.log_path).unwrap();
    assert!(
        log.contains("another `runner local` uses STATE_DIR"),
        "{log}"
    );
    assert_eq!(bed.workers().len(), 1, "the running worker is left alone");

    bed.undeploy(&s).await;
    wait_for(
        "the worker gone and the phase Stopped",
        Duration::from_secs(30),
        || {
            let stopped = bed.list()[&s].phase == "Stopped" && bed.workers().is_empty();
            async move { stopped.then_some(()) }
        },
    )
    .await;
    let samples = sampler.finish();
    assert_eq!(
        samples.pids.get(&s).map(|p| p.len()),
        Some(1),
        "one worker ever"
    );
    wait_for(
        "Stopped on scenario_events",
        Duration::from_secs(30),
        || {
            let phases = events.phases(&s);
            async move { (phases == ["Running", "Stopped"]).then_some(()) }
        },
    )
    .await;
    assert!(local.terminate().success(), "{}", local.log_tail());
}

/// `runner local` bounds its queue like the controller: with one slot and
/// one place, the third of three scenarios is dead-lettered as `queue_full`
/// and never reaches the state; a stop makes room for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_past_max_queued_is_dead_lettered() {
    let bed = LocalBed::new("local-qfull").await;
    let clip = common::media("vtest.avi");
    let dlq = TopicLog::start(&bed.bootstrap, &bed.dlq);
    let mut local = bed.start(&[
        ("MAX_WORKERS", "1"),
        ("MAX_QUEUED", "1"),
        ("REALTIME", "true"),
    ]);
    let (a, b, c) = (uuid(41), uuid(42), uuid(43));
    bed.deploy(&a, &clip).await;
    wait_listed(&bed, &a, "Running").await;
    bed.deploy(&b, &clip).await;
    wait_listed(&bed, &b, "Queued").await;
    bed.deploy(&c, &clip).await;
    wait_for("a dead letter", Duration::from_secs(60), || {
        local.assert_running();
        let n = dlq.all().len();
        async move { (n == 1).then_some(()) }
    })
    .await;
    assert_eq!(dlq_reasons(&bed, 1).await, ["queue_full"]);
    let rows = bed.list();
    assert_eq!(rows[&b].phase, "Queued", "{rows:?}");
    assert!(!rows.contains_key(&c), "{rows:?}");

    bed.undeploy(&b).await;
    wait_listed(&bed, &b, "Stopped").await;
    bed.deploy(&c, &clip).await;
    wait_listed(&bed, &c, "Queued").await;
    assert_eq!(dlq.all().len(), 1);
    assert!(local.terminate().success(), "{}", local.log_tail());
}

/// Waits until `runner local list` shows `scenario` in `phase`.
async fn wait_listed(bed: &LocalBed, scenario: &str, phase: &str) {
    wait_for(
        &format!("{scenario} {phase}"),
        Duration::from_secs(60),
        || {
            let there = bed.list().get(scenario).is_some_and(|r| r.phase == phase);
            async move { there.then_some(()) }
        },
    )
    .await;
}

async fn dlq_reasons(bed: &LocalBed, count: usize) -> Vec<String> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bed.bootstrap)
        .set("group.id", common::unique_name("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&bed.dlq]).unwrap();
    let mut reasons = Vec::new();
    for _ in 0..count {
        let msg = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("a dead letter within 30 s")
            .unwrap();
        let headers = msg.headers().expect("headers");
        let reason = headers
            .iter()
            .find(|h| h.key == "reason")
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .expect("reason header");
        reasons.push(reason);
    }
    reasons
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_workers_fail_after_the_budget_and_killed_ones_restart() {
    let bed = LocalBed::new("local-restart").await;
    let events = TopicLog::start(&bed.bootstrap, &bed.events);
    let mut local = bed.start(&[
        ("MAX_WORKERS", "1"),
        ("REALTIME", "true"),
        ("RESTART_BUDGET", "2"),
        ("RESTART_BACKOFF_MS", "200"),
    ]);
    let failing = uuid(1);
    let good = uuid(2);
    bed.deploy(&failing, &format!("{}/no-such-clip.avi", common::MEDIA_DIR))
        .await;
    bed.deploy(&good, &common::media("vtest.avi")).await;
    wait_for(
        "the failing scenario Failed",
        Duration::from_secs(60),
        || {
            local.assert_running();
            let phase = bed
                .list()
                .get(&failing)
                .map(|r| (r.phase.clone(), r.restarts));
            async move { (phase == Some(("Failed".into(), 2))).then_some(()) }
        },
    )
    .await;
    let first = wait_for(
        "the queued scenario Running in the freed slot",
        Duration::from_secs(30),
        || {
            let row = bed.list().get(&good).cloned();
            async move { row.filter(|r| r.phase == "Running").and_then(|r| r.pid) }
        },
    )
    .await;
    // The events reach the topic's reader a little after the state changes.
    let phases = wait_for(
        "the failing scenario's Failed event",
        Duration::from_secs(30),
        || {
            let phases = events.phases(&failing);
            async move { (phases.last().map(String::as_str) == Some("Failed")).then_some(phases) }
        },
    )
    .await;
    assert_eq!(
        phases,
        [
            "Running", "Starting", "Running", "Starting", "Running", "Failed"
        ],
        "two restarts, then Failed"
    );

    common::run_ok(
        std::process::Command::new("kill").args(["-KILL", &first.to_string()]),
        "kill(1) is part of procps",
    );
    let row = wait_for(
        "the killed worker restarted",
        Duration::from_secs(30),
        || {
            let row = bed.list().get(&good).cloned();
            async move { row.filter(|r| r.phase == "Running" && r.pid.is_some_and(|p| p != first)) }
        },
    )
    .await;
    assert_eq!(row.restarts, 1);
    let workers = bed.workers();
    assert_eq!(workers.len(), 1, "{workers:?}");
    let starting = wait_for(
        "a Starting event for the restart",
        Duration::from_secs(30),
        || {
            let found = events
                .all()
                .into_iter()
                .find(|(_, v)| v["scenario_uuid"] == good.as_str() && v["phase"] == "Starting");
            async move { found }
        },
    )
    .await;
    assert!(
        starting.1["message"].as_str().unwrap().contains("SIGKILL"),
        "{}",
        starting.1
    );
    assert!(local.terminate().success(), "{}", local.log_tail());
    assert!(bed.workers().is_empty(), "SIGTERM stops every worker");
}
