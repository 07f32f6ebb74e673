//! The `runner` command line as an operator meets it.

mod common;

fn run(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    common::runner()
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run runner")
}

#[test]
fn invalid_settings_stop_start_up_in_one_line() {
    let cases = [
        ("MAX_WORKERS", "0", "at least 1"),
        ("MAX_WORKERS", "lots", "at least 1"),
        ("VIDEO_FPS", "0", "greater than 0"),
        ("VIDEO_FPS", "fast", "greater than 0"),
        ("LOG_LEVEL", "loud", "DEBUG, INFO, WARNING, ERROR"),
        ("KAFKA_BOOTSTRAP_SERVERS", "nohost", "host:port"),
    ];
    for (var, value, allowed) in cases {
        let out = run(&["controller"], &[(var, value)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.contains(var) && stderr.contains(value) && stderr.contains(allowed),
            "{var}={value}: {stderr}"
        );
    }
}

#[test]
fn log_level_accepts_any_case() {
    let out = run(&["crd"], &[("LOG_LEVEL", "warning")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn help_documents_every_setting_with_its_variable() {
    let out = run(&["worker", "--help"], &[]);
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "SCENARIO_UUID",
        "CAMERA_URL",
        "KAFKA_BOOTSTRAP_SERVERS",
        "VIDEO_FPS",
        "RESULTS_TOPIC",
        "MODEL",
        "MOCK_SEED",
        "VIDEO_FILE_ROOT",
        "READ_TIMEOUT_MS",
        "METRICS_ADDR",
        "LOG_LEVEL",
        "MODEL_DIR",
        "CONFIDENCE_THRESHOLD",
        "NMS_THRESHOLD",
        "MODEL_INPUT_SIZE",
        "DETECT_CLASSES",
        "INFERENCE_THREADS",
        "RTSP_TRANSPORT",
        "WATCHDOG_SECS",
    ] {
        assert!(
            help.contains(&format!("env: {var}")),
            "worker --help lacks {var}"
        );
    }
    let out = run(&["controller", "--help"], &[]);
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "CONSUMER_GROUP",
        "MAX_WORKERS",
        "VIDEO_FPS",
        "KAFKA_BOOTSTRAP_SERVERS",
        "LOG_FORMAT",
    ] {
        assert!(
            help.contains(&format!("env: {var}")),
            "controller --help lacks {var}"
        );
    }
}

#[test]
fn crds_directory_matches_the_rust_types() {
    let out = run(&["crd"], &[]);
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/scenario.yaml");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        generated == committed,
        "crds/scenario.yaml is stale; regenerate it with `cargo run --bin runner -- crd > crds/scenario.yaml`"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let out = common::worker("550e8400-e29b-41d4-a716-446655440000", "ftp://x/a.mp4")
        .args(["--sink", "stdout"])
        .env("LOG_FORMAT", "json")
        .output()
        .expect("run runner");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.lines().count() >= 2, "{stderr}");
    for line in stderr.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v.get("level").is_some() && v.get("message").is_some(),
            "{line}"
        );
    }
}
