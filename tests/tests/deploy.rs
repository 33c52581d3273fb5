//! The Kubernetes manifests in deploy/kubernetes: valid for the Kubernetes
//! API, checked offline against its schemas in strict mode (a field the API
//! does not know fails: tests/kubernetes/validate.py), and consistent with
//! the gateway's configuration where Kubernetes cannot see it: the
//! ConfigMap passes the gateway's own `--check-config`, a pod finishes its
//! drain within its grace period, and the probes and Services reach the
//! ports the gateway listens on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use gateway_tests::{bin, link_flush_deadline, python, repo_root, telemetry_flush, Certs};
use serde_json::Value;

/// Kubernetes versions whose schemas the manifests must pass: the oldest
/// they support (1.30, the first with the preStop `sleep` action on by
/// default) and the newest that the pinned kubernetes-validate bundles.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

/// Runs tests/kubernetes/validate.py on every manifest under `dir`: the
/// documents, or what the schemas say about them.
fn validate(dir: &Path) -> Result<Vec<Value>, String> {
    let mut cmd = Command::new(python());
    cmd.arg(repo_root().join("tests/kubernetes/validate.py"))
        .arg(dir);
    for v in KUBERNETES_VERSIONS {
        cmd.args(["--kubernetes-version", v]);
    }
    let out = cmd.output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    Ok(report["documents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["document"].clone())
        .collect())
}

/// The manifests of deploy/kubernetes, validated once for every test here.
fn manifests() -> &'static [Value] {
    static DOCS: OnceLock<Vec<Value>> = OnceLock::new();
    DOCS.get_or_init(|| {
        validate(&repo_root().join("deploy/kubernetes")).unwrap_or_else(|e| {
            panic!("deploy/kubernetes does not pass the Kubernetes schemas:\n{e}")
        })
    })
}

/// The one manifest of this kind and name.
fn find(kind: &str, name: &str) -> &'static Value {
    let mut found = manifests()
        .iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name);
    let doc = found
        .next()
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes"));
    assert!(found.next().is_none(), "two of {kind} {name}");
    doc
}

/// The gateway's Deployment, its container, and the configuration file
/// that the container is given, from the ConfigMap it mounts.
struct GatewayPod {
    deployment: &'static Value,
    container: &'static Value,
    config_toml: String,
}

impl GatewayPod {
    /// The Deployment `wsgw-gateway` and its container `gateway`.
    fn get() -> Self {
        let deployment = find("Deployment", "wsgw-gateway");
        let pod = &deployment["spec"]["template"]["spec"];
        let container = pod["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "gateway")
            .expect("a container named gateway");
        let args: Vec<&str> = container["args"]
            .as_array()
            .expect("the container's args")
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let path = args
            .windows(2)
            .find(|w| w[0] == "--config" || w[0] == "-c")
            .map(|w| Path::new(w[1]))
            .expect("args name the configuration file with --config");
        // The file the container sees is a key of the ConfigMap mounted at
        // the directory above it.
        let (volume, key) = mounted(pod, container, path);
        let map_name = volume["configMap"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("{} is not in a ConfigMap volume", path.display()));
        let config_toml = find("ConfigMap", map_name)["data"][&key]
            .as_str()
            .unwrap_or_else(|| panic!("ConfigMap {map_name} has no key {key}"))
            .to_owned();
        Self {
            deployment,
            container,
            config_toml,
        }
    }

    /// The configuration file, written where the gateway can read it.
    fn config_file(&self) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("gateway.toml"), &self.config_toml).unwrap();
        dir
    }

    /// The configuration, loaded and validated as the gateway does.
    fn config(&self) -> gateway::Config {
        let dir = self.config_file();
        gateway::Config::load(Some(&dir.path().join("gateway.toml")), &Default::default())
            .unwrap_or_else(|e| panic!("the ConfigMap's gateway.toml: {e}"))
    }

    /// The pod template's spec.
    fn pod(&self) -> &'static Value {
        &self.deployment["spec"]["template"]["spec"]
    }

    /// The container port that `port` (a number or a port's name) means.
    fn port(&self, port: &Value) -> u16 {
        if let Some(n) = port.as_u64() {
            return u16::try_from(n).unwrap();
        }
        let name = port.as_str().unwrap();
        let found = self.container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("the gateway container has no port named {name}"));
        u16::try_from(found["containerPort"].as_u64().unwrap()).unwrap()
    }
}

/// The volume mounted at `path`'s directory in `container`, and the
/// file's name in it.
fn mounted<'a>(pod: &'a Value, container: &Value, path: &Path) -> (&'a Value, String) {
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| path.parent() == m["mountPath"].as_str().map(Path::new))
        .unwrap_or_else(|| panic!("no volume is mounted at {}'s directory", path.display()));
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("no volume named {}", mount["name"]));
    let key = path.file_name().unwrap().to_str().unwrap().to_owned();
    (volume, key)
}

/// Whether every label `selector` asks for is on `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_object().unwrap();
    !selector.is_empty() && selector.iter().all(|(k, v)| labels[k] == *v)
}

/// Every manifest passes the Kubernetes API's schemas (strict: no field the
/// API does not know), and the fleet's parts are all there.
#[test]
fn the_manifests_pass_the_kubernetes_schemas() {
    for (kind, name) in [
        ("ConfigMap", "wsgw-gateway"),
        ("Deployment", "wsgw-gateway"),
        ("Service", "wsgw-gateway"),
        ("Service", "wsgw-gateway-admin"),
        ("PodDisruptionBudget", "wsgw-gateway"),
        ("Deployment", "wsgw-redis"),
        ("Service", "wsgw-redis"),
    ] {
        find(kind, name);
    }
}

/// The validation this file relies on fails a manifest with a misspelt
/// field, which Kubernetes would refuse: without that, the test above
/// could not fail.
#[test]
fn a_manifest_with_an_unknown_field_fails_validation() {
    let dir = tempfile::tempdir().unwrap();
    let src = repo_root().join("deploy/kubernetes/deployment.yaml");
    let good = std::fs::read_to_string(src).unwrap();
    let bad = good.replace("terminationGracePeriodSeconds:", "terminationGracePeriod:");
    assert_ne!(good, bad);
    std::fs::write(dir.path().join("deployment.yaml"), bad).unwrap();
    let err = validate(dir.path()).expect_err("a misspelt field passed validation");
    assert!(
        err.contains("'terminationGracePeriod'") && err.contains("unexpected"),
        "{err}"
    );
}

/// The ConfigMap's configuration passes the gateway's own check, as the
/// container runs it; its certificate is the Secret's, at the path where
/// the Deployment mounts it; its Redis is the Service of the example.
#[test]
fn the_configmap_passes_the_gateways_own_check() {
    let gw = GatewayPod::get();
    // The Secret is not in the repository: this run's certificate stands
    // in for it.
    let certs = Certs::new();
    let dir = gw.config_file();
    let out = Command::new(bin("gateway"))
        .arg("--check-config")
        .arg("--config")
        .arg(dir.path().join("gateway.toml"))
        .arg("--tls-cert")
        .arg(certs.cert())
        .arg("--tls-key")
        .arg(certs.key())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "gateway --check-config: {stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");

    // tls.cert and tls.key are the keys of a kubernetes.io/tls Secret, at
    // the directory where the Deployment mounts it.
    let c = gw.config();
    assert!(!c.listen.wss.is_empty(), "the example serves wss");
    for (path, key) in [(&c.tls.cert, "tls.crt"), (&c.tls.key, "tls.key")] {
        let path = path.as_deref().expect("tls.cert and tls.key are set");
        let (volume, file) = mounted(gw.pod(), gw.container, path);
        assert!(
            volume["secret"]["secretName"].is_string(),
            "{} is not in a Secret volume",
            path.display()
        );
        assert_eq!(file, key, "{}", path.display());
    }

    // fleet.redis_url names the example's Redis Service and its port.
    let url = c
        .fleet
        .redis_url
        .as_deref()
        .expect("fleet.redis_url is set");
    let authority = url
        .strip_prefix("redis://")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("{url}: not redis://host:port/db"));
    let (host, port) = authority.rsplit_once(':').unwrap_or((authority, "6379"));
    let service = find("Service", host.split('.').next().unwrap());
    assert!(
        service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["port"].as_u64().map(|n| n.to_string()).as_deref() == Some(port)),
        "Service {host} has no port {port}"
    );
}

/// A pod stopped by a deploy or an eviction finishes its drain before
/// Kubernetes kills it: the preStop sleep, then `shutdown.drain_timeout`,
/// then the links' flush all fit in `terminationGracePeriodSeconds` (a
/// SIGKILL mid-drain loses the sessions not yet taken over). And no two
/// pods drain at once in a rolling deploy.
#[test]
fn a_pod_drains_within_its_grace_period() {
    let gw = GatewayPod::get();
    let s = gw.config().shutdown;
    let pre_stop = Duration::from_secs(
        gw.container["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_u64()
            .expect("a preStop sleep"),
    );
    let grace = Duration::from_secs(
        gw.pod()["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds"),
    );
    let needed = pre_stop + s.drain_timeout + link_flush_deadline() + telemetry_flush();
    assert!(
        grace > needed,
        "terminationGracePeriodSeconds {grace:?} must exceed preStop {pre_stop:?} + \
         drain_timeout {:?} + link flush {:?} + telemetry flush {:?} = {needed:?}",
        s.drain_timeout,
        link_flush_deadline(),
        telemetry_flush()
    );
    // Sessions are handed off over close_spread, and the last of them
    // still have time to resume elsewhere before drain_timeout.
    assert!(!s.close_spread.is_zero(), "a fleet spreads its handoffs");
    assert!(s.close_spread < s.drain_timeout);
    let min_ready = Duration::from_secs(
        gw.deployment["spec"]["minReadySeconds"]
            .as_u64()
            .unwrap_or(0),
    );
    assert!(
        min_ready >= pre_stop + s.drain_timeout,
        "minReadySeconds {min_ready:?} < preStop + drain_timeout: drains would overlap"
    );
}

/// The probes ask the admin listener, on its port; the container's ports
/// are the ones the gateway listens on; the Services and the disruption
/// budget select the gateway's pods and reach those ports.
#[test]
fn probes_and_services_reach_the_gateways_ports() {
    let gw = GatewayPod::get();
    let c = gw.config();
    let admin = c.admin.listen.expect("admin.listen is set").port();
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &gw.container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(
            gw.port(&get["port"]),
            admin,
            "{probe}: not admin.listen's port"
        );
    }
    let wss = c.listen.wss[0].port();
    assert_eq!(gw.port(&Value::from("wss")), wss, "container port wss");
    assert_eq!(
        gw.port(&Value::from("admin")),
        admin,
        "container port admin"
    );

    let template = &gw.deployment["spec"]["template"];
    let labels = &template["metadata"]["labels"];
    assert!(selects(
        &gw.deployment["spec"]["selector"]["matchLabels"],
        labels
    ));
    let pdb = find("PodDisruptionBudget", "wsgw-gateway");
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], labels));
    for (service, port) in [("wsgw-gateway", wss), ("wsgw-gateway-admin", admin)] {
        let spec = &find("Service", service)["spec"];
        assert!(selects(&spec["selector"], labels), "Service {service}");
        let target = &spec["ports"][0]["targetPort"];
        assert_eq!(gw.port(target), port, "Service {service}'s targetPort");
    }
}
