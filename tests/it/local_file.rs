//! `runner local --scenarios FILE` without Kafka: a fixed set of cameras,
//! edits applied on SIGHUP, results of every worker on standard output as
//! whole JSON lines, `runner local list` showing what runs.

use crate::common;
use std::time::Duration;

use crate::common::local::LocalBed;
use crate::common::wait_for;

const A: &str = "550e8400-e29b-41d4-a716-446655440001";
const B: &str = "550e8400-e29b-41d4-a716-446655440002";
const C: &str = "550e8400-e29b-41d4-a716-446655440003";

fn entry(uuid: &str, clip: &str) -> String {
    format!(
        "- scenario_uuid: {uuid}\n  camera_url: {}\n",
        common::media(clip)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenarios_file_edits_apply_on_sighup_without_kafka() {
    let bed = LocalBed::new("local-file").await;
    let file = bed.logs.path().join("scenarios.yaml");
    std::fs::write(&file, entry(A, "vtest.avi") + &entry(B, "vtest.avi")).unwrap();
    let file_arg = file.display().to_string();
    let mut local = bed.start(&[
        ("SCENARIOS_FILE", file_arg.as_str()),
        ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1"),
        ("SINK", "stdout"),
        ("REALTIME", "true"),
        ("MAX_WORKERS", "2"),
    ]);
    let running = |uuid: &str| {
        let row = bed.list().get(uuid).cloned();
        row.filter(|r| r.phase == "Running").and_then(|r| r.pid)
    };
    let b_pid = wait_for("A and B Running", Duration::from_secs(60), || {
        local.assert_running();
        let pids = running(A).zip(running(B));
        async move { pids.map(|(_, b)| b) }
    })
    .await;
    // A has delivered results before it is removed, so its results on
    // stdout show that a stopped worker's output is kept.
    wait_for(
        "A's first result on stdout",
        Duration::from_secs(60),
        || {
            let out = local.stdout();
            async move { out.contains(A).then_some(()) }
        },
    )
    .await;

    // Remove A, change B's camera, add C.
    std::fs::write(&file, entry(B, "tree.avi") + &entry(C, "vtest.avi")).unwrap();
    local.signal("-HUP");
    wait_for(
        "A Stopped, B replaced, C Running",
        Duration::from_secs(60),
        || {
            local.assert_running();
            let rows = bed.list();
            let done = rows.get(A).is_some_and(|r| r.phase == "Stopped")
                && running(B).is_some_and(|p| p != b_pid)
                && running(C).is_some();
            async move { done.then_some(()) }
        },
    )
    .await;
    let workers = bed.workers();
    assert_eq!(workers.len(), 2, "{workers:?}");
    assert!(workers.iter().all(|(_, uuid)| uuid != A), "{workers:?}");

    // A file that does not load changes nothing.
    std::fs::write(&file, "- scenario_uuid: nope\n").unwrap();
    local.signal("-HUP");
    wait_for("the refusal logged", Duration::from_secs(30), || {
        let log = std::fs::read_to_string(&local.log_path).unwrap_or_default();
        async move { log.contains("scenarios file not applied").then_some(()) }
    })
    .await;
    assert!(running(B).is_some() && running(C).is_some());

    assert!(local.terminate().success(), "{}", local.log_tail());
    assert!(bed.workers().is_empty(), "SIGTERM stops every worker");
    let stdout = local.stdout();
    let mut seen = std::collections::HashSet::new();
    for line in stdout.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a whole JSON line ({e}): {line}"));
        seen.insert(v["scenario_uuid"].as_str().unwrap().to_string());
    }
    assert!(
        seen.contains(A) && seen.contains(B) && seen.contains(C),
        "results of every worker on stdout: {seen:?}"
    );
    let rows = bed.list();
    assert_eq!(rows[A].phase, "Stopped");
    for running in [B, C] {
        let row = &rows[running];
        assert_eq!(
            (row.phase.as_str(), row.pid),
            ("Queued", None),
            "a scenario stopped with the supervisor waits for its next start"
        );
    }
}

#[test]
fn a_bad_scenarios_file_stops_start_up_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("scenarios.yaml");
    std::fs::write(
        &file,
        format!("- scenario_uuid: {A}\n  camera_url: ftp://cam/1\n"),
    )
    .unwrap();
    let out = common::runner()
        .args(["local", "--scenarios"])
        .arg(&file)
        .env("STATE_DIR", dir.path().join("state"))
        .output()
        .expect("run runner local");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("scenarios.yaml") && stderr.contains(A) && stderr.contains("ftp"),
        "{stderr}"
    );
}

#[test]
fn list_without_state_says_where_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::runner()
        .args(["local", "list"])
        .env("STATE_DIR", dir.path())
        .output()
        .expect("run runner local list");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("start `runner local`"), "{stderr}");
}

#[test]
fn local_help_documents_its_settings() {
    let out = common::runner()
        .args(["local", "--help"])
        .output()
        .expect("run runner local --help");
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "STATE_DIR",
        "SCENARIOS_FILE",
        "KAFKA_INGEST",
        "MAX_WORKERS",
        "CONSUMER_GROUP",
        "RESTART_BUDGET",
        "RESTART_BACKOFF_MS",
        "STOP_GRACE_MS",
        "EXIT_WHEN_DONE",
        "EVENTS_TOPIC",
        "RESULTS_TOPIC",
        "VIDEO_FILE_ROOT",
    ] {
        assert!(
            help.contains(&format!("env: {var}")),
            "local --help lacks {var}"
        );
    }
}

/// The README's run command: a scenarios file, MAX_WORKERS below the number
/// of scenarios, results on stdout, no Kafka, exit when every clip has ended.
#[test]
fn the_demo_runs_every_clip_through_the_queue_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("scenarios.yaml");
    std::fs::write(
        &file,
        entry(A, "Megamind.avi") + &entry(B, "Megamind_bugy.avi") + &entry(C, "Megamind.avi"),
    )
    .unwrap();
    let state = dir.path().join("state");
    let out = common::runner()
        .arg("local")
        .arg("--scenarios")
        .arg(&file)
        .args([
            "--max-workers",
            "2",
            "--exit-when-done",
            "--",
            "--sink",
            "stdout",
        ])
        .env("STATE_DIR", &state)
        .env("VIDEO_FILE_ROOT", common::MEDIA_DIR)
        .env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
        .output()
        .expect("run runner local");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let mut per_scenario = std::collections::HashMap::<String, usize>::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a whole JSON line ({e}): {line}"));
        *per_scenario
            .entry(v["scenario_uuid"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(per_scenario.get(A), per_scenario.get(C), "{per_scenario:?}");
    assert!(per_scenario.get(A).is_some_and(|n| *n > 0) && per_scenario.contains_key(B));
    assert!(
        stderr.contains("WaitingForSlot"),
        "the third scenario waited for a slot: {stderr}"
    );
    let list = common::run_ok(
        common::runner()
            .args(["local", "list"])
            .env("STATE_DIR", &state),
        "the runner binary is built by cargo test",
    );
    let rows = common::local::parse_list(&list);
    assert!(rows.values().all(|r| r.phase == "Succeeded"), "{list}");
}

/// Kafka and the file together: both feed the same store, and the file
/// stops only what it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_and_the_file_together() {
    let bed = LocalBed::new("local-both").await;
    let file = bed.logs.path().join("scenarios.yaml");
    std::fs::write(&file, entry(A, "vtest.avi")).unwrap();
    let file_arg = file.display().to_string();
    let mut local = bed.start(&[
        ("SCENARIOS_FILE", file_arg.as_str()),
        ("KAFKA_INGEST", "true"),
        ("REALTIME", "true"),
    ]);
    bed.deploy(B, &common::media("vtest.avi")).await;
    let phase = |uuid: &str| bed.list().get(uuid).map(|r| r.phase.clone());
    wait_for(
        "A from the file and B from Kafka Running",
        Duration::from_secs(60),
        || {
            local.assert_running();
            let both =
                phase(A).as_deref() == Some("Running") && phase(B).as_deref() == Some("Running");
            async move { both.then_some(()) }
        },
    )
    .await;
    std::fs::write(&file, "").unwrap();
    local.signal("-HUP");
    wait_for("A Stopped", Duration::from_secs(30), || {
        let stopped = phase(A).as_deref() == Some("Stopped");
        async move { stopped.then_some(()) }
    })
    .await;
    assert_eq!(
        phase(B).as_deref(),
        Some("Running"),
        "the file never stops what Kafka started"
    );
    let workers = bed.workers();
    assert_eq!(workers.len(), 1, "{workers:?}");
    assert!(local.terminate().success(), "{}", local.log_tail());
}
