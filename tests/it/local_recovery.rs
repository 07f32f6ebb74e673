//! `runner local` killed with SIGKILL while workers run and more wait, then
//! started again on the same STATE_DIR: the workers it left behind are
//! stopped before anything new starts, no scenario ever has two workers,
//! MAX_WORKERS holds throughout, and every scenario reaches its end.

use crate::common;
use std::time::{Duration, Instant};

use crate::common::local::{LocalBed, Sampler};
use crate::common::wait_for;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_supervisor_is_replaced_without_duplicates_or_losses() {
    let bed = LocalBed::new("local-crash").await;
    let clip = common::media("Megamind.avi");
    let settings = [("MAX_WORKERS", "2"), ("REALTIME", "true")];
    let sampler = Sampler::start(bed.state_dir());
    let mut first = bed.start(&settings);
    let scenarios: Vec<String> = (1..=5)
        .map(|n| format!("550e8400-e29b-41d4-a716-4466554{n:05}"))
        .collect();
    for s in &scenarios {
        bed.deploy(s, &clip).await;
    }
    wait_for("2 Running and 3 Queued", Duration::from_secs(60), || {
        first.assert_running();
        let rows = bed.list();
        let count = |phase: &str| rows.values().filter(|r| r.phase == phase).count();
        let ready = rows.len() == 5 && count("Running") == 2 && count("Queued") == 3;
        async move { ready.then_some(()) }
    })
    .await;
    let orphans = bed.workers();
    assert_eq!(orphans.len(), 2, "{orphans:?}");

    first.kill9();
    assert_eq!(
        bed.workers().len(),
        2,
        "the workers outlive a killed supervisor"
    );

    let second_started = Instant::now();
    let mut second = bed.start(&settings);
    wait_for(
        "all 5 scenarios Succeeded",
        Duration::from_secs(240),
        || {
            second.assert_running();
            let done = bed
                .list()
                .values()
                .filter(|r| r.phase == "Succeeded")
                .count();
            async move { (done == 5).then_some(()) }
        },
    )
    .await;
    let samples = sampler.finish();
    assert!(
        samples.most_alive == 2,
        "MAX_WORKERS=2 workers at once, never more; saw at most {}",
        samples.most_alive
    );
    assert!(
        samples.doubles.is_empty(),
        "a scenario had two workers at once: {:?}",
        samples.doubles
    );
    // The orphans were stopped by the second supervisor, not left to finish
    // their clip (Megamind.avi plays for 11.3 s in real time), and nothing
    // new started while one was alive.
    let orphan_pids: Vec<u32> = orphans.iter().map(|(pid, _)| *pid).collect();
    for pid in &orphan_pids {
        let (first, last) = samples.lifetimes[pid];
        assert!(
            last.duration_since(first) < Duration::from_secs(9),
            "orphan {pid} lived {:?}, as long as its clip: it was not stopped",
            last.duration_since(first)
        );
        let newcomers: Vec<u32> = samples
            .lifetimes
            .iter()
            .filter(|(other, (started, _))| !orphan_pids.contains(other) && *started <= last)
            .filter(|(_, (started, _))| *started >= second_started)
            .map(|(other, _)| *other)
            .collect();
        assert!(
            newcomers.is_empty(),
            "workers {newcomers:?} started while orphan {pid} was alive"
        );
    }
    let log = std::fs::read_to_string(&second.log_path).unwrap_or_default();
    assert!(
        log.contains("stopping workers left behind by a previous supervisor"),
        "first:\n{}\nsecond:\n{}",
        first.log_tail(),
        second.log_tail()
    );
    assert!(second.terminate().success(), "{}", second.log_tail());
}
