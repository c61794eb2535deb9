//! The deployment examples under `deploy/`: checked as far as this machine can check them.

use headroom::config::Config;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_headroom");

/// The `headroom.toml` block of the Kubernetes ConfigMap (a YAML literal block, indented).
fn configmap_toml(yaml: &str) -> String {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "headroom.toml: |").skip(1);
    let first = lines.next().expect("no headroom.toml in the ConfigMap");
    let indent = first.len() - first.trim_start().len();
    std::iter::once(first)
        .chain(lines.take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent))
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_kubernetes_configmap_holds_a_valid_config_where_the_deployment_reads_it() {
    let yaml = std::fs::read_to_string("deploy/kubernetes.yaml").unwrap();
    let toml = configmap_toml(&yaml);
    assert!(toml.contains("[pools.default]"), "{toml}");
    // The vLLM Service name resolves only inside the cluster.
    let local = toml.replace("vllm.inference.svc.cluster.local:8000", "localhost:8000");
    let config = Config::parse(&local, Path::new(".")).unwrap_or_else(|e| panic!("{e}\n{local}"));
    assert_eq!(config.server.listen[0].to_string(), "0.0.0.0:8080");
    assert_eq!(config.admin.listen.port(), 9901);
    assert!(yaml.contains("mountPath: /etc/headroom") && yaml.contains("\"/etc/headroom/headroom.toml\""));
    assert!(yaml.contains("containerPort: 8080") && yaml.contains("containerPort: 9901"));
    assert!(yaml.contains("path: /healthz"), "probes use the admin liveness endpoint");
}

#[test]
fn the_dockerfile_copies_what_exists_and_runs_the_default_config() {
    let docker = std::fs::read_to_string("deploy/Dockerfile").unwrap();
    assert!(docker.contains("COPY config/headroom.toml /etc/headroom/headroom.toml"));
    assert!(Path::new("config/headroom.toml").exists());
    assert!(docker.contains("cargo build --release --locked"));
    assert!(Path::new("Cargo.lock").exists(), "--locked needs the lock file");
    assert!(docker.contains("ENTRYPOINT [\"/usr/local/bin/headroom\""));
}

#[test]
fn the_systemd_unit_verifies_and_reloads_with_sighup() {
    let unit = std::fs::read_to_string("deploy/headroom.service").unwrap();
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    assert!(unit.contains("ExecStartPre=/usr/local/bin/headroom check"));
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("systemd-analyze is not installed: the unit was checked for its reload and check lines only");
        return;
    }
    // Point it at this build and a real config, then let systemd check the rest.
    let dir = tempfile::tempdir().unwrap();
    let config = std::fs::canonicalize("config/headroom.toml").unwrap();
    let local =
        unit.replace("/usr/local/bin/headroom", BIN).replace("/etc/headroom/headroom.toml", config.to_str().unwrap());
    let path = dir.path().join("headroom.service");
    std::fs::write(&path, local).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "systemd-analyze verify: {said}");
    assert!(!said.contains("headroom.service:"), "systemd-analyze found problems: {said}");
}
