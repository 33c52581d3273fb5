//! Packaging: the systemd unit (deploy/systemd) passes `systemd-analyze
//! verify` and keeps its documented sandboxing score, its user is the one
//! the sysusers file creates, and its limits fit the gateway's defaults;
//! the container image (deploy/Containerfile) builds the workspace's
//! `gateway`, runs it as a non-root user with arguments the gateway
//! accepts, and exposes the ports it listens on. No container engine is
//! needed: the Containerfile's facts are checked where they can be read.
//! Also the OTLP receiver's self-test (tests/interop/otlp_receiver.py).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use gateway_tests::{bin, link_flush_deadline, python, repo_root, telemetry_flush, Certs};

/// The most the unit's exposure score may be, whatever its header says:
/// the low end of systemd's "OK" band (1.0 to 4.9), where only what the
/// gateway needs is left open (the network, /proc/sys, the real clock).
const MAX_SCORE: f64 = 2.0;

/// Room above `listen.max_sessions` in the open-file limit: listeners,
/// links, the admin server's connections, Redis, the executable's own files
/// (README, "Operations": "a few hundred").
const FD_MARGIN: u64 = 1024;

fn unit_path() -> PathBuf {
    repo_root().join("deploy/systemd/wsgw.service")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The values of `key=` in a unit's text, in order (one line each; the
/// unit uses no continuation lines).
fn unit_values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::trim)
        .collect()
}

/// The one value of `key=` in a unit's text.
fn unit_value<'a>(unit: &'a str, key: &str) -> &'a str {
    match unit_values(unit, key)[..] {
        [v] => v,
        ref vs => panic!("{key}= is set {} times in the unit: {vs:?}", vs.len()),
    }
}

/// `systemd-analyze verify` on `unit` (the text of wsgw.service), offline:
/// verify wants ExecStart's program to exist, so the unit is checked from a
/// temporary directory with /usr/local/bin/gateway replaced by a stand-in
/// executable there. Returns whether it passed and everything it printed.
fn verify(unit: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let stand_in = dir.path().join("gateway");
    std::fs::write(&stand_in, "#!/bin/sh\n").unwrap();
    let mode = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(&stand_in, mode).unwrap();
    let exec = "ExecStart=/usr/local/bin/gateway ";
    assert!(
        unit.contains(exec),
        "the unit does not start /usr/local/bin/gateway"
    );
    let copy = dir.path().join("wsgw.service");
    let moved = unit.replace(exec, &format!("ExecStart={} ", stand_in.display()));
    std::fs::write(&copy, moved).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze (apt-get install systemd)");
    (out.status.success(), text(&out))
}

/// The overall exposure level that `systemd-analyze security --offline`
/// gives the unit file at `path` (0.0 best, 10.0 worst).
fn exposure(path: &Path) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(path)
        .output()
        .expect("systemd-analyze (apt-get install systemd)");
    let all = text(&out);
    assert!(out.status.success(), "systemd-analyze security: {all}");
    all.lines()
        .find_map(|l| {
            l.split_once("Overall exposure level for ")?
                .1
                .split_once(": ")
        })
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{all}"))
}

/// The score the unit's header documents ("rates it N").
fn documented_score(unit: &str) -> f64 {
    unit.lines()
        .find_map(|l| l.split_once("rates it ")?.1.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the unit's header says what `systemd-analyze security` rates it")
}

/// A systemd time span of whole seconds ("45s" or "45").
fn seconds(span: &str) -> Duration {
    span.strip_suffix('s')
        .unwrap_or(span)
        .parse()
        .map(Duration::from_secs)
        .unwrap_or_else(|_| panic!("{span}: not a number of seconds"))
}

/// deploy/gateway.example.toml, loaded as the gateway does.
fn example_config() -> gateway::Config {
    let path = repo_root().join("deploy/gateway.example.toml");
    gateway::Config::load(Some(&path), &Default::default())
        .unwrap_or_else(|e| panic!("deploy/gateway.example.toml: {e}"))
}

/// Runs the gateway with `args` (a unit's or an image's), but with the
/// example configuration instead of their `--config` file and this run's
/// certificate, under `--check-config`: the arguments must be ones it
/// accepts.
fn check_args(what: &str, args: &[&str]) {
    let certs = Certs::new();
    let example = repo_root().join("deploy/gateway.example.toml");
    let at = args
        .iter()
        .position(|a| *a == "--config" || *a == "-c")
        .unwrap_or_else(|| panic!("{what}: no --config in {args:?}"));
    let mut cmd = Command::new(bin("gateway"));
    for (i, a) in args.iter().enumerate() {
        if i == at + 1 {
            cmd.arg(&example);
        } else {
            cmd.arg(a);
        }
    }
    let out = cmd
        .arg("--check-config")
        .arg("--tls-cert")
        .arg(certs.cert())
        .arg("--tls-key")
        .arg(certs.key())
        .output()
        .unwrap();
    assert!(out.status.success(), "{what}: {args:?}: {}", text(&out));
}

/// The unit passes `systemd-analyze verify` without a word about it, and
/// the check can fail: a misspelt key (which systemd ignores with only a
/// warning, leaving the service unsandboxed) is caught.
#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let unit = read(&unit_path());
    let (ok, said) = verify(&unit);
    assert!(ok, "systemd-analyze verify failed:\n{said}");
    assert!(
        !said.contains("wsgw"),
        "systemd-analyze verify warns about the unit:\n{said}"
    );

    let misspelt = unit.replace("ProtectSystem=strict", "ProtectSystm=strict");
    assert_ne!(misspelt, unit);
    let (_, said) = verify(&misspelt);
    assert!(said.contains("ProtectSystm"), "{said}");
}

/// `systemd-analyze security` rates the unit at most what its header says,
/// and at most [`MAX_SCORE`]; without its sandboxing the same check rates
/// it worse.
#[test]
fn the_unit_keeps_its_exposure_score() {
    let unit = read(&unit_path());
    let documented = documented_score(&unit);
    assert!(
        documented <= MAX_SCORE,
        "documented score {documented} > {MAX_SCORE}"
    );
    let score = exposure(&unit_path());
    assert!(
        score <= documented,
        "systemd-analyze security rates deploy/systemd/wsgw.service {score}, above the \
         documented {documented}"
    );

    let dir = tempfile::tempdir().unwrap();
    let weakened = dir.path().join("wsgw.service");
    let lines: Vec<&str> = unit
        .lines()
        .filter(|l| !l.starts_with("Protect") && !l.starts_with("Private"))
        .collect();
    std::fs::write(&weakened, lines.join("\n")).unwrap();
    let worse = exposure(&weakened);
    assert!(worse > MAX_SCORE, "an unsandboxed unit rated {worse}");
}

/// The unit runs as the user and group that deploy/systemd/wsgw.sysusers
/// creates (checked with systemd-sysusers on an empty root).
#[test]
fn the_units_user_is_the_one_sysusers_creates() {
    let unit = read(&unit_path());
    let (user, group) = (unit_value(&unit, "User"), unit_value(&unit, "Group"));
    assert_ne!(user, "root");
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let out = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(repo_root().join("deploy/systemd/wsgw.sysusers"))
        .output()
        .expect("systemd-sysusers (apt-get install systemd)");
    assert!(out.status.success(), "systemd-sysusers: {}", text(&out));
    let passwd = read(&root.path().join("etc/passwd"));
    let groups = read(&root.path().join("etc/group"));
    assert!(
        passwd.lines().any(|l| l.starts_with(&format!("{user}:"))),
        "{passwd}"
    );
    assert!(
        groups.lines().any(|l| l.starts_with(&format!("{group}:"))),
        "{groups}"
    );
}

/// The unit's limits fit the gateway's defaults: systemd does not kill a
/// draining gateway (TimeoutStopSec exceeds drain_timeout and the links'
/// flush), the open-file limit holds `max_sessions` sessions, and its
/// command line is one the gateway accepts.
#[test]
fn the_units_limits_fit_the_gateway() {
    let unit = read(&unit_path());
    let c = example_config();
    assert_eq!(unit_value(&unit, "KillSignal"), "SIGTERM");
    let stop = seconds(unit_value(&unit, "TimeoutStopSec"));
    let needed = c.shutdown.drain_timeout + link_flush_deadline() + telemetry_flush();
    assert!(
        stop > needed,
        "TimeoutStopSec {stop:?} must exceed drain_timeout + link flush + telemetry flush = \
         {needed:?}"
    );
    let nofile: u64 = unit_value(&unit, "LimitNOFILE").parse().unwrap();
    let sessions = c.listen.max_sessions as u64;
    assert!(
        nofile >= sessions + FD_MARGIN,
        "LimitNOFILE {nofile} < max_sessions {sessions} + {FD_MARGIN}"
    );
    assert_eq!(
        unit_value(&unit, "ExecReload"),
        "/bin/kill -HUP $MAINPID",
        "reload is SIGHUP (certificates)"
    );
    let exec: Vec<&str> = unit_value(&unit, "ExecStart").split_whitespace().collect();
    assert_eq!(exec[0], "/usr/local/bin/gateway");
    check_args("the unit's ExecStart", &exec[1..]);
}

/// One instruction of a Containerfile: its keyword (upper case) and the
/// rest of its line, continuation lines joined.
struct Instruction {
    keyword: String,
    args: String,
}

/// deploy/Containerfile's instructions, split into its stages.
fn containerfile() -> Vec<Vec<Instruction>> {
    let src = read(&repo_root().join("deploy/Containerfile"));
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in src.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<Vec<Instruction>> = Vec::new();
    for l in logical {
        let (keyword, args) = l.split_once(char::is_whitespace).unwrap_or((&l, ""));
        let keyword = keyword.to_uppercase();
        if keyword == "FROM" {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("a Containerfile starts with FROM")
            .push(Instruction {
                keyword,
                args: args.trim().to_owned(),
            });
    }
    stages
}

/// The arguments of the one `keyword` instruction in `stage`.
fn instruction<'a>(stage: &'a [Instruction], keyword: &str) -> &'a str {
    let mut found = stage.iter().filter(|i| i.keyword == keyword);
    let i = found
        .next()
        .unwrap_or_else(|| panic!("no {keyword} in the stage"));
    assert!(found.next().is_none(), "two {keyword} in one stage");
    &i.args
}

/// An exec-form (JSON array) instruction's words.
fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("{args}: not exec form: {e}"))
}

/// The workspace member whose package is `name`: its manifest.
fn workspace_package(name: &str) -> toml::Table {
    let root: toml::Table = read(&repo_root().join("Cargo.toml")).parse().unwrap();
    root["workspace"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| read(&repo_root().join(m.as_str().unwrap()).join("Cargo.toml")))
        .map(|s| s.parse::<toml::Table>().unwrap())
        .find(|m| m["package"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no package {name} in the workspace"))
}

/// The image builds the `gateway` binary of the workspace's package `wsgw`
/// with the locked dependencies, and the runtime stage runs that binary.
#[test]
fn the_image_builds_and_runs_the_gateway() {
    let stages = containerfile();
    assert!(stages.len() >= 2, "a build stage and a runtime stage");
    let build = &stages[0];
    let runtime = stages.last().unwrap();
    let from = instruction(build, "FROM");
    let stage_name = from
        .split_whitespace()
        .skip_while(|w| !w.eq_ignore_ascii_case("as"))
        .nth(1)
        .expect("the build stage is named (FROM ... AS name)");

    let cargo = build
        .iter()
        .filter(|i| i.keyword == "RUN")
        .find_map(|i| i.args.split_once("cargo build").map(|(_, rest)| rest))
        .expect("the build stage runs cargo build");
    let words: Vec<&str> = cargo.split_whitespace().collect();
    let after = |flag: &str| {
        words
            .windows(2)
            .find(|w| w[0] == flag)
            .map(|w| w[1])
            .unwrap_or_else(|| panic!("cargo build without {flag}"))
    };
    assert!(words.contains(&"--release"), "{cargo}");
    assert!(words.contains(&"--locked"), "{cargo}");
    let (package, binary) = (after("-p"), after("--bin"));
    let manifest = workspace_package(package);
    let bins: Vec<&str> = manifest["bin"]
        .as_array()
        .map(|b| b.iter().filter_map(|b| b["name"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        bins.contains(&binary),
        "package {package} has no bin {binary}: {bins:?}"
    );
    assert_eq!(binary, "gateway");

    // The runtime copies what cargo built, from the build stage's target
    // directory, to the program it runs.
    let workdir = instruction(build, "WORKDIR");
    let built = format!("{}/target/release/{binary}", workdir.trim_end_matches('/'));
    let copy = instruction(runtime, "COPY");
    let copy: Vec<&str> = copy.split_whitespace().collect();
    assert_eq!(
        copy,
        [
            &format!("--from={stage_name}"),
            built.as_str(),
            "/usr/local/bin/gateway"
        ]
    );
    let entrypoint = exec_form(instruction(runtime, "ENTRYPOINT"));
    assert_eq!(entrypoint, [copy[2]]);
    let cmd = exec_form(instruction(runtime, "CMD"));
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    check_args("the image's CMD", &cmd);
    assert_eq!(instruction(runtime, "STOPSIGNAL"), "SIGTERM");

    // The build context keeps what the build needs and leaves out the
    // target directory (gigabytes) and the virtualenv.
    let ignore = read(&repo_root().join(".dockerignore"));
    let ignored: BTreeSet<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "patches",
        "protocol",
        "gateway",
        "loadtest",
        "tests",
    ] {
        assert!(
            !ignored.contains(needed),
            ".dockerignore leaves out {needed}"
        );
    }
    for big in ["target", ".venv", ".git"] {
        assert!(ignored.contains(big), ".dockerignore keeps {big}");
    }
}

/// The image runs as a non-root user, the same one that the Kubernetes
/// Deployment sets (numeric, so that runAsNonRoot can check it), and
/// exposes the ports of listen.wss and admin.listen in the example
/// configuration.
#[test]
fn the_image_is_non_root_and_exposes_the_gateways_ports() {
    let stages = containerfile();
    let runtime = stages.last().unwrap();
    let user = instruction(runtime, "USER");
    let uid = user.split(':').next().unwrap();
    assert!(uid != "root" && uid != "0", "USER {user} is root");
    let uid: u32 = uid
        .parse()
        .unwrap_or_else(|_| panic!("USER {user}: not numeric, runAsNonRoot cannot check it"));
    let deployment = read(&repo_root().join("deploy/kubernetes/deployment.yaml"));
    let run_as: u32 = deployment
        .lines()
        .find_map(|l| l.trim().strip_prefix("runAsUser:"))
        .expect("runAsUser in deployment.yaml")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        uid, run_as,
        "the image's USER and the Deployment's runAsUser"
    );

    let exposed: BTreeSet<u16> = instruction(runtime, "EXPOSE")
        .split_whitespace()
        .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
        .collect();
    let c = example_config();
    let listens: BTreeSet<u16> = [
        c.listen.wss[0].port(),
        c.admin.listen.expect("admin.listen").port(),
    ]
    .into();
    assert_eq!(
        exposed, listens,
        "EXPOSE and the example's wss and admin ports"
    );
}

/// The OTLP receiver the metrics tests use records what it is sent over
/// gRPC and HTTP, headers included (its own self-test).
#[test]
fn the_otlp_receiver_passes_its_self_test() {
    let out = Command::new(python())
        .arg(repo_root().join("tests/interop/otlp_receiver.py"))
        .arg("--self-test")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "otlp_receiver.py --self-test: {}",
        text(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("self-test OK"));
}
