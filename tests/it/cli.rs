//! The `runner` command line as an operator meets it.

use crate::common;

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

/// Whether a log line of `level` (`INFO`, `WARN`, `ERROR`) is in `stderr`.
fn has_level(stderr: &str, level: &str) -> bool {
    stderr
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(level))
}

/// `runner worker` on a refused camera URL: one INFO line at start-up, then
/// one ERROR line.
fn refused_worker(log_level: Option<&str>) -> (Option<i32>, String) {
    let mut cmd = common::worker("550e8400-e29b-41d4-a716-446655440000", "ftp://x/a.mp4");
    cmd.args(["--sink", "stdout"]);
    if let Some(level) = log_level {
        cmd.env("LOG_LEVEL", level);
    }
    let out = cmd.output().expect("run runner");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn log_level_hides_lines_below_it_in_any_case() {
    for level in ["WARNING", "warning", "Warning", "ERROR"] {
        let (code, stderr) = refused_worker(Some(level));
        assert_eq!(code, Some(1), "LOG_LEVEL={level}: {stderr}");
        assert!(
            !has_level(&stderr, "INFO") && !stderr.contains("vap-runner starting"),
            "LOG_LEVEL={level} hides INFO lines:\n{stderr}"
        );
        assert!(
            has_level(&stderr, "ERROR") && stderr.contains("CAMERA_URL refused"),
            "LOG_LEVEL={level} still shows the error:\n{stderr}"
        );
    }
    for level in [Some("INFO"), Some("info"), Some("DEBUG"), None] {
        let (code, stderr) = refused_worker(level);
        assert_eq!(code, Some(1), "LOG_LEVEL={level:?}: {stderr}");
        assert!(
            has_level(&stderr, "INFO") && stderr.contains("vap-runner starting"),
            "LOG_LEVEL={level:?} (unset: INFO) shows INFO lines:\n{stderr}"
        );
        assert!(has_level(&stderr, "ERROR"), "{stderr}");
    }
}

/// The variables `runner <command> --help` names (`[env: VAR=…]`).
fn help_variables(command: &str) -> Vec<String> {
    let out = run(&[command, "--help"], &[]);
    assert!(out.status.success(), "runner {command} --help");
    String::from_utf8_lossy(&out.stdout)
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .map(str::to_string)
        .collect()
}

/// The variables in the first column of the settings table of `runner <command>`.
fn table_variables(page: &str, command: &str) -> Vec<String> {
    let heading = format!("### `runner {command}`\n");
    page.split_once(&heading)
        .unwrap_or_else(|| panic!("docs/configuration.md has no {heading:?}"))
        .1
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|row| {
            let cell = row.split('|').nth(1)?.trim();
            Some(cell.strip_prefix('`')?.strip_suffix('`')?.to_string())
        })
        .filter(|v| v != "variable")
        .collect()
}

#[test]
fn the_configuration_page_is_generated_from_the_command_line() {
    let out = run(&["docs"], &[("LOG_LEVEL", "ERROR")]);
    assert!(out.status.success(), "runner docs");
    let generated = String::from_utf8(out.stdout).expect("UTF-8");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md");
    let page = std::fs::read_to_string(path).expect("docs/configuration.md");
    let (begin, end) = (
        generated.lines().next().unwrap_or_default(),
        generated.lines().last().unwrap_or_default(),
    );
    let committed = page.split_once(begin).and_then(|(_, rest)| {
        let (block, _) = rest.split_once(end)?;
        Some(format!("{begin}{block}{end}\n"))
    });
    assert!(
        committed.as_deref() == Some(generated.as_str()),
        "docs/configuration.md's settings reference differs from `runner docs`: run scripts/docs"
    );
    // Both ways: the page's table of each command names exactly what its --help does.
    for command in ["worker", "controller", "local"] {
        let mut documented = table_variables(&page, command);
        let mut help = help_variables(command);
        documented.sort();
        help.sort();
        assert_eq!(
            documented, help,
            "docs/configuration.md against `runner {command} --help`: run scripts/docs"
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
