//! The container image (`Dockerfile`), checked without a container engine:
//! the runtime stage must install a Debian package for every shared library
//! the `runner` binary loads, run as a numeric non-root user and start the
//! binary in exec form. Libraries are read from the binary built for these
//! tests (`readelf -d` for the ones it links directly, `ldd` for the whole
//! tree) and mapped to packages with Debian's package database (`dpkg -S`),
//! so these tests need the Debian bookworm build environment the image's
//! build stage uses (scripts/deps sets it up).

use crate::common;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Packages every Debian image has (Essential or required by apt itself);
/// the runtime stage may rely on them without naming them.
const BASE_PACKAGES: &[&str] = &["libc6", "libgcc-s1"];

/// The runtime stage's user: the same numeric UID/GID as worker Pods.
const RUNTIME_USER: &str = "65532:65532";

fn dockerfile() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// One `FROM` section of the Dockerfile, its instructions with continuation
/// lines joined and comments removed.
#[derive(Debug)]
struct Stage {
    base: String,
    name: Option<String>,
    instructions: Vec<String>,
}

impl Stage {
    fn with(&self, keyword: &str) -> Vec<&str> {
        self.instructions
            .iter()
            .filter(|i| {
                i.split_whitespace()
                    .next()
                    .is_some_and(|k| k.eq_ignore_ascii_case(keyword))
            })
            .map(|i| i[keyword.len()..].trim())
            .collect()
    }

    /// The packages named by `apt-get install` in this stage's RUN instructions.
    fn apt_packages(&self) -> BTreeSet<String> {
        let mut packages = BTreeSet::new();
        for run in self.with("RUN") {
            let words: Vec<&str> = run.split_whitespace().collect();
            let mut i = 0;
            while i < words.len() {
                if words[i] == "install"
                    && i > 0
                    && (words[i - 1] == "apt-get" || words[i - 1] == "apt")
                {
                    i += 1;
                    while i < words.len() && !["&&", ";", "||", "|"].contains(&words[i]) {
                        if !words[i].starts_with('-') {
                            packages.insert(words[i].to_string());
                        }
                        i += 1;
                    }
                } else {
                    i += 1;
                }
            }
        }
        packages
    }
}

fn stages(text: &str) -> Vec<Stage> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        if !current.trim().is_empty() {
            instructions.push(current.trim().to_string());
        }
        current.clear();
    }
    let mut stages: Vec<Stage> = Vec::new();
    for instruction in instructions {
        let mut words = instruction.split_whitespace();
        if words.next().is_some_and(|k| k.eq_ignore_ascii_case("FROM")) {
            let args: Vec<&str> = words.filter(|w| !w.starts_with("--")).collect();
            let name = match args.as_slice() {
                [_, kw, name] if kw.eq_ignore_ascii_case("AS") => Some(name.to_string()),
                _ => None,
            };
            stages.push(Stage {
                base: args.first().copied().unwrap_or_default().to_string(),
                name,
                instructions: Vec::new(),
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.instructions.push(instruction);
        }
    }
    stages
}

fn run(program: &str, args: &[&str]) -> String {
    common::run_ok(
        Command::new(program).args(args),
        "these checks need Debian's binutils and dpkg (scripts/deps)",
    )
}

fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_runner")
}

/// The libraries the binary names in its dynamic section (DT_NEEDED).
fn needed_libraries() -> BTreeSet<String> {
    run("readelf", &["-d", binary()])
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| {
            let start = l.find('[')? + 1;
            let end = l.rfind(']')?;
            Some(l[start..end].to_string())
        })
        .collect()
}

/// Every library the dynamic loader resolves for the binary: soname → path.
fn loaded_libraries() -> BTreeMap<String, PathBuf> {
    let text = run("ldd", &[binary()]);
    let mut libs = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("linux-vdso") || line.starts_with("linux-gate") {
            continue;
        }
        assert!(!line.contains("not found"), "ldd cannot resolve: {line}");
        if let Some((soname, rest)) = line.split_once(" => ") {
            let path = rest.split_whitespace().next().unwrap_or_default();
            libs.insert(soname.trim().to_string(), PathBuf::from(path));
        } else if let Some(path) = line.split_whitespace().next() {
            // The dynamic loader itself: "/lib64/ld-linux-x86-64.so.2 (0x...)".
            let soname = Path::new(path)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            libs.insert(soname, PathBuf::from(path));
        }
    }
    libs
}

/// The paths under which Debian's package database may list `path`. Debian
/// bookworm's merged /usr means a library may be registered under /lib or
/// /usr/lib, and alternatives (BLAS, LAPACK) are symlinks into the owning
/// package's own directory, so the path as given, its /usr twin and the
/// fully resolved path are all tried.
fn candidate_paths(path: &Path) -> Vec<PathBuf> {
    let mut candidates = vec![path.to_path_buf()];
    let text = path.to_string_lossy();
    if let Some(rest) = text.strip_prefix("/usr") {
        candidates.push(PathBuf::from(rest));
    } else {
        candidates.push(PathBuf::from(format!("/usr{text}")));
    }
    if let Ok(real) = std::fs::canonicalize(path) {
        let real_text = real.to_string_lossy().into_owned();
        candidates.push(real.clone());
        if let Some(rest) = real_text.strip_prefix("/usr") {
            candidates.push(PathBuf::from(rest));
        }
    }
    candidates
}

/// The owning package of each library path, asked of `dpkg -S` in one call.
fn owners(paths: &[&PathBuf]) -> BTreeMap<PathBuf, String> {
    let mut all: BTreeSet<PathBuf> = BTreeSet::new();
    for path in paths {
        all.extend(candidate_paths(path));
    }
    // dpkg -S exits non-zero when any path is unowned (most /usr twins are);
    // the owned ones are still printed.
    let out = Command::new("dpkg")
        .arg("-S")
        .args(&all)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run dpkg: {e}; these checks need Debian's package database (scripts/deps)"
            )
        });
    let mut by_path: BTreeMap<PathBuf, String> = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if line.starts_with("diversion by") {
            continue;
        }
        if let Some((packages, path)) = line.split_once(": ") {
            let first = packages.split(',').next().unwrap_or_default().trim();
            let name = first.split(':').next().unwrap_or_default();
            if !name.is_empty() {
                by_path.insert(PathBuf::from(path.trim()), name.to_string());
            }
        }
    }
    paths
        .iter()
        .filter_map(|path| {
            candidate_paths(path)
                .iter()
                .find_map(|c| by_path.get(c))
                .map(|owner| ((*path).clone(), owner.clone()))
        })
        .collect()
}

/// What the package database says about one installed package.
#[derive(Debug, Default)]
struct Installed {
    /// Depends and Pre-Depends: groups of alternatives.
    depends: Vec<Vec<String>>,
}

fn installed_packages() -> (BTreeMap<String, Installed>, BTreeMap<String, Vec<String>>) {
    let text = run(
        "dpkg-query",
        &[
            "-W",
            "-f",
            "${db:Status-Abbrev}\t${Package}\t${Depends}, ${Pre-Depends}\t${Provides}\n",
        ],
    );
    let mut packages = BTreeMap::new();
    let mut providers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let name_of = |item: &str| -> String {
        item.split_whitespace()
            .next()
            .unwrap_or_default()
            .split(':')
            .next()
            .unwrap_or_default()
            .to_string()
    };
    for line in text.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        let [status, package, depends, provides] = fields.as_slice() else {
            continue;
        };
        if !status.starts_with("ii") {
            continue;
        }
        let depends = depends
            .split(',')
            .map(str::trim)
            .filter(|group| !group.is_empty())
            .map(|group| group.split('|').map(name_of).collect())
            .collect();
        for provided in provides.split(',').map(name_of).filter(|p| !p.is_empty()) {
            providers
                .entry(provided)
                .or_default()
                .push(package.to_string());
        }
        packages.insert(package.to_string(), Installed { depends });
    }
    (packages, providers)
}

/// Every installed package that installing `roots` brings along (Depends and
/// Pre-Depends, any installed alternative, virtual packages through their
/// installed providers).
fn dependency_closure(roots: &BTreeSet<String>) -> BTreeSet<String> {
    let (packages, providers) = installed_packages();
    let mut seen = BTreeSet::new();
    let mut queue: VecDeque<String> = roots.iter().cloned().collect();
    while let Some(name) = queue.pop_front() {
        let real: Vec<String> = if packages.contains_key(&name) {
            vec![name.clone()]
        } else {
            providers.get(&name).cloned().unwrap_or_default()
        };
        for package in real {
            if !seen.insert(package.clone()) {
                continue;
            }
            for group in &packages[&package].depends {
                queue.extend(group.iter().cloned());
            }
        }
    }
    seen
}

fn runtime_stage(stages: &[Stage]) -> &Stage {
    stages.last().expect("the Dockerfile has at least one FROM")
}

/// The stage called `name` and the stages it is built on (`FROM <stage>`),
/// nearest first; the last one starts from an image.
fn ancestry<'a>(stages: &'a [Stage], name: &str) -> Vec<&'a Stage> {
    let mut chain = Vec::new();
    let mut next = Some(name.to_string());
    while let Some(wanted) = next.take() {
        let Some(stage) = stages
            .iter()
            .find(|s| s.name.as_deref() == Some(wanted.as_str()))
        else {
            break;
        };
        chain.push(stage);
        if stages
            .iter()
            .any(|s| s.name.as_deref() == Some(stage.base.as_str()))
        {
            next = Some(stage.base.clone());
        }
    }
    chain
}

/// `name:tag` of a base image reference, without its `@sha256:` pin.
fn image_name(reference: &str) -> &str {
    reference.split('@').next().unwrap_or_default()
}

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// The patterns of .dockerignore, comments and blank lines left out.
fn dockerignore() -> Vec<String> {
    std::fs::read_to_string(repo_path(".dockerignore"))
        .expect(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

#[test]
fn build_stage_compiles_on_bookworm_with_the_projects_video_stack() {
    let text = dockerfile();
    let stages = stages(&text);
    assert!(
        stages.len() >= 2,
        "the Dockerfile must be multi-stage (build + runtime), found {} stage(s)",
        stages.len()
    );
    let chain = ancestry(&stages, "build");
    let root = chain.last().expect("a stage named `build`");
    let base = image_name(&root.base);
    assert!(
        base.starts_with("rust:") && base.ends_with("-bookworm")
            || base.starts_with("debian:bookworm"),
        "the build stage must be Debian bookworm (rust:*-bookworm or debian:bookworm), not {}",
        root.base
    );
    let packages: BTreeSet<String> = chain.iter().flat_map(|s| s.apt_packages()).collect();
    for needed in [
        "clang",
        "libclang-dev",
        "cmake",
        "nasm",
        "zlib1g-dev",
        "libssl-dev",
    ] {
        assert!(
            packages.contains(needed),
            "the build stage does not install {needed}: {packages:?}"
        );
    }
    let runs = chain
        .iter()
        .flat_map(|s| s.with("RUN"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        runs.contains("scripts/opencv build") && runs.contains("scripts/build"),
        "the build stage must build the video stack and the release binary with the \
         project's recipe (scripts/opencv, scripts/build):\n{runs}"
    );
    let recipe =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build"))
            .expect("scripts/build");
    assert!(
        recipe.contains("cargo build --release --locked --bin runner"),
        "scripts/build must build the locked release binary"
    );
}

#[test]
fn runtime_stage_is_slim_non_root_and_starts_the_binary_without_a_shell() {
    let text = dockerfile();
    let stages = stages(&text);
    let runtime = runtime_stage(&stages);
    assert_eq!(image_name(&runtime.base), "debian:bookworm-slim");

    let copies = runtime.with("COPY");
    assert!(
        copies
            .iter()
            .any(|c| c.starts_with("--from=build") && c.ends_with(" /usr/local/bin/runner")),
        "the runtime stage must copy the binary from the build stage to /usr/local/bin/runner: {copies:?}"
    );
    assert!(
        runtime.apt_packages().contains("ca-certificates"),
        "the runtime stage needs ca-certificates for https/rtsps cameras"
    );

    let users = runtime.with("USER");
    assert_eq!(
        users.last().copied(),
        Some(RUNTIME_USER),
        "the last USER of the runtime stage must be the numeric non-root {RUNTIME_USER}"
    );
    // Nothing after USER may need root (package installation must come before it).
    let user_at = runtime
        .instructions
        .iter()
        .rposition(|i| i.starts_with("USER"))
        .unwrap();
    assert!(
        runtime.instructions[user_at..]
            .iter()
            .all(|i| !i.starts_with("RUN")),
        "no RUN after USER in the runtime stage: the image needs no shell at run time"
    );

    let entrypoints = runtime.with("ENTRYPOINT");
    assert_eq!(
        entrypoints.last().copied(),
        Some(r#"["/usr/local/bin/runner"]"#),
        "ENTRYPOINT must be the exec form [\"/usr/local/bin/runner\"]"
    );
    for cmd in runtime.with("CMD") {
        assert!(
            cmd.starts_with('['),
            "CMD must be exec form (JSON array), not a shell command: {cmd}"
        );
    }
}

#[test]
fn runtime_packages_cover_every_library_the_binary_loads() {
    let text = dockerfile();
    let stages = stages(&text);
    let listed = runtime_stage(&stages).apt_packages();
    let mut provided: BTreeSet<String> = listed.clone();
    provided.extend(BASE_PACKAGES.iter().map(|p| p.to_string()));

    let loaded = loaded_libraries();
    let paths: Vec<&PathBuf> = loaded.values().collect();
    let owned = owners(&paths);
    let package_of = |soname: &str| -> String {
        let path = loaded
            .get(soname)
            .unwrap_or_else(|| panic!("ldd does not resolve {soname}"));
        owned.get(path).cloned().unwrap_or_else(|| {
            panic!(
                "no Debian package owns {} ({soname}); the image could not provide it",
                path.display()
            )
        })
    };

    // What the binary links directly must be named in the runtime stage (or
    // be part of every Debian image).
    let mut missing = Vec::new();
    for soname in needed_libraries() {
        let package = package_of(&soname);
        if !provided.contains(&package) {
            missing.push(format!("{soname} (package {package})"));
        }
    }
    assert!(
        missing.is_empty(),
        "the runtime stage of the Dockerfile does not install the packages of libraries `runner` links directly: {}",
        missing.join(", ")
    );

    // Everything the loader pulls in behind them must come with those
    // packages' dependencies.
    let closure = dependency_closure(&provided);
    for package in &listed {
        assert!(
            closure.contains(package),
            "{package} (runtime stage) is not an installed Debian package here; \
             the runtime stage must name packages of this Debian release"
        );
    }
    let mut uncovered = Vec::new();
    for soname in loaded.keys() {
        let package = package_of(soname);
        if !closure.contains(&package) {
            uncovered.push(format!("{soname} (package {package})"));
        }
    }
    assert!(
        uncovered.is_empty(),
        "libraries `runner` loads that neither the runtime stage's packages nor their dependencies provide: {}",
        uncovered.join(", ")
    );
}

#[test]
fn runtime_stage_lists_no_development_packages() {
    let text = dockerfile();
    let stages = stages(&text);
    let listed = runtime_stage(&stages).apt_packages();
    let dev: Vec<&String> = listed
        .iter()
        .filter(|p| {
            p.ends_with("-dev")
                || ["clang", "cmake", "gcc", "build-essential"].contains(&p.as_str())
        })
        .collect();
    assert!(
        dev.is_empty(),
        "the runtime stage must carry only runtime libraries, not {dev:?}"
    );
}

/// OpenCV and FFmpeg are linked into the binary: the loader maps no OpenCV,
/// FFmpeg, GStreamer or GUI library, and `--version` names the build.
#[test]
fn the_binary_carries_its_video_stack_inside() {
    let loaded = loaded_libraries();
    let foreign: Vec<&String> = loaded
        .keys()
        .filter(|soname| {
            [
                "libopencv",
                "libav",
                "libsw",
                "libgst",
                "libgdal",
                "libQt",
                "libgtk",
            ]
            .iter()
            .any(|prefix| soname.starts_with(prefix))
        })
        .collect();
    assert!(
        foreign.is_empty(),
        "`runner` loads video libraries from the system: {foreign:?}"
    );
    assert!(
        loaded.len() <= 12,
        "`runner` loads {} shared libraries, expected the C/C++ runtime, zlib and OpenSSL only: {:?}",
        loaded.len(),
        loaded.keys().collect::<Vec<_>>()
    );
    let version = common::run_ok(common::runner().arg("--version"), "the test binary");
    for expected in [
        "OpenCV 4.",
        "built by scripts/opencv",
        "dnn",
        "objdetect",
        "videoio",
        "FFMPEG",
    ] {
        assert!(
            version.contains(expected),
            "`runner --version` does not say {expected:?}:\n{version}"
        );
    }
}

/// The runtime stage's filesystem, built without a container engine by
/// scripts/runtime-rootfs from a minimal Debian root and the Dockerfile's
/// package list and scripts/fetch-model's files, runs the worker on vtest.avi
/// (HOG, and YOLO through the ONNX Runtime library the image carries) and
/// prints the CRD as the image's non-root user.
#[test]
fn runtime_stage_runs_the_worker_and_the_crd_as_its_non_root_user() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "this test builds a Debian root and enters it with chroot: run the tests as root \
         (scripts/test on the CI machine is)"
    );
    let work = tempfile::tempdir().expect("temporary directory");
    let root = work.path().join("root");
    let report = common::run_ok(
        Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/runtime-rootfs"))
            .arg(&root)
            .arg(binary())
            .arg(crate::worker_yolo::model_dir()),
        "scripts/runtime-rootfs needs debootstrap (scripts/deps)",
    );
    eprintln!("{}", report.trim());
    std::fs::create_dir_all(root.join("data")).expect("data directory");
    std::fs::copy(common::media("vtest.avi"), root.join("data/vtest.avi")).expect("copy vtest.avi");

    let in_root = |args: &[&str]| {
        let mut cmd = Command::new("/usr/sbin/chroot");
        cmd.arg(format!("--userspec={RUNTIME_USER}"))
            .arg(&root)
            .arg("/usr/local/bin/runner")
            .args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin");
        common::run_ok(&mut cmd, "chroot comes with coreutils")
    };
    // One worker run on vtest.avi: its results, checked for count and JSON.
    let run_worker = |model: &str| -> Vec<serde_json::Value> {
        let results = in_root(&[
            "worker",
            "--scenario-uuid",
            "550e8400-e29b-41d4-a716-446655440000",
            "--camera-url",
            "/data/vtest.avi",
            "--video-file-root",
            "/data",
            "--sink",
            "stdout",
            "--model",
            model,
            "--metrics-addr",
            "127.0.0.1:0",
        ]);
        let lines: Vec<serde_json::Value> = results
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        assert_eq!(
            lines.len(),
            159,
            "{model}: vtest.avi at VIDEO_FPS=2 gives 159 results"
        );
        lines
    };
    let with_person = run_worker("hog")
        .iter()
        .filter(|r| r["detections"].as_array().is_some_and(|d| !d.is_empty()))
        .count();
    assert!(
        with_person > 100,
        "HOG finds people in most frames inside the runtime root, found them in {with_person}"
    );
    // MODEL_DIR's default is where the image keeps the model and ONNX Runtime.
    let people: usize = run_worker("yolo")
        .iter()
        .map(|r| {
            r["detections"]
                .as_array()
                .map_or(0, |d| d.iter().filter(|d| d["class"] == "person").count())
        })
        .sum();
    assert!(
        people > 3 * 159,
        "YOLO finds the people of vtest.avi inside the runtime root: {people} in 159 frames"
    );

    let crd = in_root(&["crd"]);
    let expected =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/scenario.yaml"))
            .expect("crds/scenario.yaml");
    assert_eq!(crd, expected, "`runner crd` inside the runtime root");
}

/// The build context is an allow-list: everything is left out but what the
/// build reads, so tests, the fuzz corpus, charts, docs and build output never
/// change a layer.
#[test]
fn build_context_lets_in_only_what_the_build_reads() {
    let patterns = dockerignore();
    assert_eq!(
        patterns.first().map(String::as_str),
        Some("*"),
        ".dockerignore must start by leaving everything out (`*`), then let paths in: {patterns:?}"
    );
    let allowed: BTreeSet<&str> = patterns
        .iter()
        .filter_map(|p| p.strip_prefix('!'))
        .map(|p| p.trim_matches('/'))
        .collect();
    assert!(
        patterns[1..].iter().all(|p| p.starts_with('!')),
        "after `*`, .dockerignore only lets paths in: {patterns:?}"
    );
    // What cargo reads for `runner` (Cargo.toml names build.rs, src/ and benches/).
    let mut needed: BTreeSet<String> = ["Cargo.toml", "Cargo.lock", "build.rs", "src", "benches"]
        .iter()
        .map(|p| p.to_string())
        .collect();
    // Every file the Dockerfile copies from the context.
    for stage in stages(&dockerfile()) {
        for copy in stage.with("COPY") {
            if copy.contains("--from=") {
                continue;
            }
            let words: Vec<&str> = copy
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            for source in &words[..words.len().saturating_sub(1)] {
                if *source != "." {
                    needed.insert(source.trim_matches('/').to_string());
                }
            }
        }
    }
    for path in &needed {
        assert!(
            allowed.contains(path.as_str()),
            ".dockerignore leaves out {path}, which the build reads; it lets in {allowed:?}"
        );
        assert!(
            repo_path(path).exists(),
            "{path} is let in but does not exist"
        );
    }
    for path in [
        "tests",
        "fuzz",
        "charts",
        "docs",
        "examples",
        "target",
        ".git",
        ".run",
        "README.md",
    ] {
        assert!(
            !allowed
                .iter()
                .any(|a| *a == path || a.starts_with(&format!("{path}/"))),
            ".dockerignore lets in {path}, which the build does not read"
        );
    }
}

/// Source changes do not rebuild the dependencies: a cargo-chef recipe (the
/// manifests only) is cooked in a layer of its own before the sources are
/// copied in.
#[test]
fn dependencies_are_built_in_a_layer_before_the_sources_arrive() {
    let text = dockerfile();
    let stages = stages(&text);
    let prepare = stages
        .iter()
        .find(|s| {
            s.with("RUN")
                .iter()
                .any(|r| r.contains("cargo chef prepare"))
        })
        .expect("a stage that prepares cargo-chef's recipe");
    let build = stages
        .iter()
        .find(|s| s.name.as_deref() == Some("build"))
        .expect("a stage named `build`");
    let position = |needle: &str| {
        build
            .instructions
            .iter()
            .position(|i| i.contains(needle))
            .unwrap_or_else(|| {
                panic!(
                    "the build stage has no `{needle}`: {:?}",
                    build.instructions
                )
            })
    };
    let recipe = position(&format!(
        "--from={}",
        prepare.name.as_deref().unwrap_or_default()
    ));
    let cook = position("cargo chef cook");
    let sources = build
        .instructions
        .iter()
        .position(|i| i == "COPY . .")
        .expect("the build stage copies the sources (COPY . .)");
    let compile = build
        .instructions
        .iter()
        .position(|i| i.starts_with("RUN") && i.contains("scripts/build"))
        .expect("the build stage builds the binary with scripts/build");
    assert!(
        recipe < cook && cook < sources && sources < compile,
        "the build stage must copy the recipe, cook it, then copy the sources and build: {:?}",
        build.instructions
    );
    for run in build.with("RUN") {
        if run.contains("cargo chef cook") {
            assert!(
                run.contains("--release")
                    && run.contains("--locked")
                    && run.contains("scripts/opencv env"),
                "the dependencies are built as scripts/build builds them (release, locked, \
                 against the video stack): {run}"
            );
        }
    }
}

/// The container build keeps one video stack cache per architecture (the
/// cache mount's id names the target architecture) and builds of one
/// architecture take turns at it.
#[test]
fn video_stack_cache_mount_is_per_architecture_and_locked() {
    let text = dockerfile();
    let stages = stages(&text);
    let run = stages
        .iter()
        .flat_map(|s| s.with("RUN"))
        .find(|r| r.contains("scripts/opencv build"))
        .expect("a RUN that builds the video stack");
    let mount = run
        .split_whitespace()
        .find(|w| w.starts_with("--mount=type=cache"))
        .unwrap_or_else(|| panic!("the video stack's RUN has no cache mount: {run}"));
    let options: BTreeMap<&str, &str> = mount["--mount=".len()..]
        .split(',')
        .filter_map(|o| o.split_once('='))
        .collect();
    assert!(
        options
            .get("id")
            .is_some_and(|id| id.contains("${TARGETARCH}") || id.contains("${TARGETPLATFORM}")),
        "the cache mount's id must name the target architecture: {mount}"
    );
    assert_eq!(
        options.get("sharing").copied(),
        Some("locked"),
        "two builds must not share the cache mount at once: {mount}"
    );
    assert!(
        run.contains("$(scripts/opencv arch)") && run.contains("TARGETARCH"),
        "the build must check that it runs on the target architecture: {run}"
    );
}

/// scripts/opencv's cache key names the architecture, so an arm64 build
/// never finds amd64 libraries under its key (nor the other way round).
#[test]
fn video_stack_key_names_the_architecture() {
    let opencv = |args: &[&str]| {
        common::run_ok(
            Command::new(repo_path("scripts/opencv")).args(args),
            "scripts/opencv is the project's recipe",
        )
        .trim()
        .to_string()
    };
    let amd64 = opencv(&["key", "amd64"]);
    let arm64 = opencv(&["key", "arm64"]);
    assert_ne!(
        amd64, arm64,
        "amd64 and arm64 builds must not share a cache key"
    );
    assert!(
        amd64.contains("-amd64-"),
        "the key names the architecture: {amd64}"
    );
    assert!(
        arm64.contains("-arm64-"),
        "the key names the architecture: {arm64}"
    );
    let here = opencv(&["arch"]);
    assert_eq!(
        opencv(&["key"]),
        opencv(&["key", &here]),
        "without an argument the key is this machine's ({here})"
    );
    assert!(
        std::process::Command::new(repo_path("scripts/opencv"))
            .args(["key", "../x"])
            .output()
            .is_ok_and(|o| !o.status.success()),
        "an architecture name cannot be a path"
    );
}

/// Whitespace-separated words, double quotes grouping (and removed), as the
/// Dockerfile reads LABEL's `key="value with spaces"` pairs.
fn words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

fn sha256_of(path: &Path) -> String {
    let out = run("sha256sum", &[path.to_str().unwrap()]);
    out.split_whitespace().next().unwrap().to_string()
}

/// A source is taken from the first URL that serves a file with the pinned
/// SHA-256: a missing file or one with other bytes sends scripts/opencv on to
/// the next URL, and when none matches nothing is kept.
#[test]
fn video_stack_sources_fall_back_until_the_hash_matches() {
    let work = tempfile::tempdir().expect("temporary directory");
    let good = work.path().join("good.tar.xz");
    let bad = work.path().join("bad.tar.xz");
    std::fs::write(&good, b"the release tarball").unwrap();
    std::fs::write(&bad, b"something else").unwrap();
    let sum = sha256_of(&good);
    let cache = work.path().join("cache");
    let url = |p: &Path| format!("file://{}", p.display());
    let missing = format!("file://{}/missing.tar.xz", work.path().display());
    let fetch = |urls: &[String]| {
        Command::new(repo_path("scripts/opencv"))
            .arg("fetch")
            .arg("ffmpeg_test.orig.tar.xz")
            .arg(&sum)
            .args(urls)
            .env("VAP_CACHE", &cache)
            .output()
            .expect("scripts/opencv")
    };

    let none = fetch(&[missing.clone(), url(&bad)]);
    assert!(
        !none.status.success(),
        "no URL has the pinned file: scripts/opencv must fail"
    );
    let said = String::from_utf8_lossy(&none.stderr);
    assert!(
        said.contains("checksum mismatch") && said.contains("no source of ffmpeg_test.orig.tar.xz"),
        "scripts/opencv says why: {said}"
    );
    let kept: Vec<_> = std::fs::read_dir(cache.join("src")).unwrap().collect();
    assert!(kept.is_empty(), "nothing unverified is kept: {kept:?}");

    let found = fetch(&[missing.clone(), url(&bad), url(&good)]);
    assert!(
        found.status.success(),
        "the third URL has the pinned file: {}",
        String::from_utf8_lossy(&found.stderr)
    );
    let path = PathBuf::from(String::from_utf8_lossy(&found.stdout).trim());
    assert_eq!(path, cache.join("src/ffmpeg_test.orig.tar.xz"));
    assert_eq!(std::fs::read(&path).unwrap(), b"the release tarball");

    // A verified file in the cache is used without asking any URL.
    let cached = fetch(std::slice::from_ref(&missing));
    assert!(cached.status.success(), "the cached file is used");

    // FFmpeg's tarball has sources beyond Debian's pool, all with one pin.
    let sources = common::run_ok(
        Command::new(repo_path("scripts/opencv")).arg("sources"),
        "scripts/opencv is the project's recipe",
    );
    let ffmpeg: Vec<Vec<&str>> = sources
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.first() == Some(&"ffmpeg"))
        .collect();
    let hosts: BTreeSet<&str> = ffmpeg
        .iter()
        .filter_map(|w| w.get(3)?.split('/').nth(2))
        .collect();
    assert!(
        hosts.contains("deb.debian.org")
            && hosts.contains("snapshot.debian.org")
            && ffmpeg.len() >= 3,
        "FFmpeg's tarball needs fallbacks beyond Debian's pool: {sources}"
    );
    let pins: BTreeSet<&str> = ffmpeg.iter().filter_map(|w| w.get(2).copied()).collect();
    assert_eq!(
        pins.len(),
        1,
        "every source of one file has the same pin: {sources}"
    );
}

/// Every base image is pinned by digest with its tag beside it, and
/// scripts/pin-base-images (the update path) reads the same list.
#[test]
fn base_images_are_pinned_by_digest() {
    let text = dockerfile();
    let stages = stages(&text);
    let names: BTreeSet<&str> = stages.iter().filter_map(|s| s.name.as_deref()).collect();
    let mut pinned = Vec::new();
    for stage in &stages {
        if names.contains(stage.base.as_str()) {
            continue;
        }
        let (name, digest) = stage.base.split_once("@sha256:").unwrap_or_else(|| {
            panic!(
                "{} is not pinned by digest (scripts/pin-base-images)",
                stage.base
            )
        });
        assert!(
            name.contains(':'),
            "{}: keep the tag beside the digest",
            stage.base
        );
        assert!(
            digest.len() == 64
                && digest
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
            "{}: not a SHA-256 digest",
            stage.base
        );
        pinned.push(stage.base.clone());
    }
    assert!(
        pinned.len() >= 2,
        "the build and runtime images: {pinned:?}"
    );
    let listed = common::run_ok(
        Command::new(repo_path("scripts/pin-base-images")).arg("--list"),
        "scripts/pin-base-images --list needs no registry",
    );
    assert_eq!(listed.lines().collect::<Vec<_>>(), pinned);
}

/// scripts/pin-base-images against a stand-in registry (a `skopeo` that
/// serves one index): the pins move to the index's digest, --check accepts
/// them, and an image without an arm64 build is refused.
#[test]
fn pin_base_images_pins_multi_platform_indexes() {
    let work = tempfile::tempdir().expect("temporary directory");
    let bin = work.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let index = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"platform":{"os":"linux","architecture":"amd64"}},{"platform":{"os":"linux","architecture":"arm64","variant":"v8"}}]}"#;
    let amd64_only = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"platform":{"os":"linux","architecture":"amd64"}}]}"#;
    std::fs::write(work.path().join("index.json"), index).unwrap();
    std::fs::write(work.path().join("amd64.json"), amd64_only).unwrap();
    let skopeo = bin.join("skopeo");
    std::fs::write(
        &skopeo,
        format!(
            "#!/bin/sh\nexec cat {}/\"${{FAKE_INDEX:-index.json}}\"\n",
            work.path().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&skopeo, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let copy = work.path().join("Dockerfile");
    std::fs::copy(repo_path("Dockerfile"), &copy).unwrap();
    let digest = sha256_of(&work.path().join("index.json"));
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let pin = |args: &[&str], index: &str| {
        Command::new(repo_path("scripts/pin-base-images"))
            .args(args)
            .env("DOCKERFILE", &copy)
            .env("PATH", &path)
            .env("FAKE_INDEX", index)
            .output()
            .expect("scripts/pin-base-images")
    };

    let moved = pin(&[], "index.json");
    assert!(
        moved.status.success(),
        "{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    let after = std::fs::read_to_string(&copy).unwrap();
    let before = dockerfile();
    assert_eq!(after.lines().count(), before.lines().count());
    for stage in stages(&after)
        .iter()
        .filter(|s| s.base.contains("@sha256:"))
    {
        assert!(
            stage.base.ends_with(&format!("@sha256:{digest}")),
            "{} is not pinned to the registry's index",
            stage.base
        );
        let tag = image_name(&stage.base);
        assert!(
            before.contains(&format!("{tag}@sha256:")),
            "the tag {tag} is kept"
        );
    }
    let checked = pin(&["--check"], "index.json");
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );

    let refused = pin(&[], "amd64.json");
    assert!(
        !refused.status.success(),
        "an index without arm64 must be refused"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("linux/arm64"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&copy).unwrap(),
        after,
        "a refused pin changes nothing"
    );
}

/// The image says where it comes from, which release and commit it is and
/// under which licences (the project's and those of what `runner` links
/// statically), and carries their texts.
#[test]
fn runtime_stage_labels_its_source_release_and_licences() {
    let text = dockerfile();
    let stages = stages(&text);
    let runtime = runtime_stage(&stages);
    let labels: BTreeMap<String, String> = runtime
        .with("LABEL")
        .iter()
        .flat_map(|l| words(l))
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let label = |key: &str| {
        labels
            .get(key)
            .unwrap_or_else(|| panic!("the runtime stage has no label {key}: {labels:?}"))
            .as_str()
    };
    assert!(label("org.opencontainers.image.source").starts_with("https://github.com/"));
    assert_eq!(
        label("org.opencontainers.image.licenses"),
        "Apache-2.0 AND LGPL-2.1-or-later AND BSD-2-Clause"
    );
    let args: Vec<&str> = runtime.with("ARG");
    for (key, arg) in [
        ("org.opencontainers.image.version", "VERSION"),
        ("org.opencontainers.image.revision", "REVISION"),
    ] {
        assert_eq!(
            label(key),
            format!("${{{arg}}}"),
            "{key} comes from the build argument {arg}"
        );
        assert!(
            args.iter().any(|a| a.split('=').next() == Some(arg)),
            "the runtime stage declares ARG {arg}: {args:?}"
        );
    }
    assert!(
        runtime
            .with("COPY")
            .contains(&"LICENSE THIRD_PARTY_NOTICES.md /usr/share/doc/vap-runner/"),
        "the image carries LICENSE and THIRD_PARTY_NOTICES.md"
    );
    let notices = std::fs::read_to_string(repo_path("THIRD_PARTY_NOTICES.md")).unwrap();
    assert!(
        notices.contains("LGPL"),
        "THIRD_PARTY_NOTICES.md gives FFmpeg's LGPL notice"
    );
    assert!(
        std::fs::read_to_string(repo_path("LICENSE"))
            .unwrap()
            .contains("Apache License"),
        "LICENSE is the Apache License"
    );
}
