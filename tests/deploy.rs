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
    // The admin listener is not loopback: the config needs the token the Deployment gives it
    // from the Secret, and `headroom check` refuses it without one.
    assert!(local.contains("token_env = \"HEADROOM_ADMIN_TOKEN\""), "{local}");
    assert!(
        yaml.contains("name: HEADROOM_ADMIN_TOKEN")
            && yaml.contains("secretKeyRef: { name: headroom-admin, key: token }")
    );
    assert!(yaml.contains("create secret generic headroom-admin"), "says how to create the Secret");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("headroom.toml");
    std::fs::write(&file, &local).unwrap();
    let check = |token: Option<&str>| {
        let mut cmd = Command::new(BIN);
        cmd.arg("--config").arg(&file).arg("check").env_remove("HEADROOM_ADMIN_TOKEN");
        if let Some(t) = token {
            cmd.env("HEADROOM_ADMIN_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let without = check(None);
    assert!(!without.status.success(), "an exposed admin API without a token must not pass check");
    let said = String::from_utf8_lossy(&without.stdout).to_string() + &String::from_utf8_lossy(&without.stderr);
    assert!(said.contains("HEADROOM_ADMIN_TOKEN"), "{without:?}");
    let with = check(Some("0123456789abcdef0123456789abcdef"));
    assert!(with.status.success(), "{with:?}");
    let config = Config::parse(&local.replace("token_env = \"HEADROOM_ADMIN_TOKEN\"", ""), Path::new("."));
    assert!(config.is_err(), "without the token line the same config is refused");
    let config = Config::parse(
        &local.replace("0.0.0.0:9901", "127.0.0.1:9901").replace("token_env = \"HEADROOM_ADMIN_TOKEN\"", ""),
        Path::new("."),
    )
    .unwrap_or_else(|e| panic!("{e}\n{local}"));
    assert_eq!(config.admin.listen.port(), 9901);
    assert_eq!(config.server.listen[0].to_string(), "0.0.0.0:8080");
    assert!(yaml.contains("mountPath: /etc/headroom") && yaml.contains("\"/etc/headroom/headroom.toml\""));
    assert!(yaml.contains("containerPort: 8080") && yaml.contains("containerPort: 9901"));
    assert!(yaml.contains("path: /healthz"), "probes use the admin liveness endpoint");
}

#[test]
fn the_kubernetes_network_policy_lets_only_operators_and_prometheus_reach_the_admin_port() {
    let yaml = std::fs::read_to_string("deploy/kubernetes.yaml").unwrap();
    let policy = yaml
        .split("\n---\n")
        .find(|doc| doc.contains("kind: NetworkPolicy"))
        .expect("deploy/kubernetes.yaml has a NetworkPolicy");
    assert!(policy.contains("matchLabels: { app: headroom }"), "{policy}");
    assert!(policy.contains("policyTypes: [Ingress]"), "{policy}");
    // Two rules: the data port from anywhere, the admin port only from the named peers.
    let rules: Vec<&str> = policy.split("\n    - ").skip(1).collect();
    assert_eq!(rules.len(), 2, "{policy}");
    assert!(rules[0].contains("port: 8080") && !rules[0].contains("from:"), "{}", rules[0]);
    assert!(rules[1].contains("port: 9901") && rules[1].contains("from:"), "{}", rules[1]);
    assert!(rules[1].contains("headroom-admin: \"true\"") && rules[1].contains("monitoring"), "{}", rules[1]);
}

#[test]
fn the_dockerfile_copies_what_exists_and_runs_the_default_config() {
    let docker = std::fs::read_to_string("deploy/Dockerfile").unwrap();
    assert!(docker.contains("COPY config/headroom.toml /etc/headroom/headroom.toml"));
    assert!(Path::new("config/headroom.toml").exists());
    // The shipped build is the dist profile (fat LTO), and it is what gets copied.
    assert!(docker.contains("cargo build --profile dist --locked"));
    assert!(docker.contains("COPY --from=build /src/target/dist/headroom /usr/local/bin/headroom"));
    let cargo = std::fs::read_to_string("Cargo.toml").unwrap();
    assert!(cargo.contains("[profile.dist]\ninherits = \"release\""), "Cargo.toml has no dist profile");
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

#[test]
fn the_replicas_example_runs_three_headroom_replicas_on_a_three_member_etcd() {
    let yaml = std::fs::read_to_string("deploy/kubernetes-replicas.yaml").unwrap();
    let toml = configmap_toml(&yaml);
    let local = toml.replace("vllm.inference.svc.cluster.local:8000", "localhost:8000");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("headroom.toml");
    std::fs::write(&file, &local).unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&file)
        .arg("check")
        .env("HEADROOM_ADMIN_TOKEN", "0123456789abcdef0123456789abcdef")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    std::env::set_var("HEADROOM_ADMIN_TOKEN", "0123456789abcdef0123456789abcdef");
    let config = Config::parse(&local, Path::new(".")).unwrap_or_else(|e| panic!("{e}\n{local}"));
    let cluster = config.cluster.expect("the example's config has a [cluster] section");
    // One endpoint per etcd member of the StatefulSet, each by its stable DNS name.
    assert_eq!(cluster.etcd.len(), 3);
    for i in 0..3 {
        assert_eq!(cluster.etcd[i].authority, format!("headroom-etcd-{i}.headroom-etcd:2379"));
        assert!(yaml.contains(&format!("headroom-etcd-{i}=http://headroom-etcd-{i}.headroom-etcd:2380")));
    }
    let docs: Vec<&str> = yaml.split("\n---\n").collect();
    let doc = |kind: &str, name: &str| {
        *docs
            .iter()
            .find(|d| d.contains(&format!("kind: {kind}")) && d.contains(&format!("name: {name}\n")))
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    assert!(doc("StatefulSet", "headroom-etcd").contains("replicas: 3"));
    assert!(doc("StatefulSet", "headroom-etcd").contains("--auto-compaction-retention"), "etcd compacts its history");
    let group = doc("Deployment", "headroom-group");
    assert!(group.contains("replicas: 3") && group.contains("configMap: { name: headroom-group }"));
    assert!(group.contains("secretKeyRef: { name: headroom-admin, key: token }"));
    // Only the replicas reach etcd's client port.
    let policy = doc("NetworkPolicy", "headroom-etcd");
    assert!(policy.contains("matchLabels: { app: headroom-group }") && policy.contains("port: 2379"), "{policy}");
}
