//! A real etcd cluster for the replicas' tests: `n` members of Debian's `etcd` on loopback
//! ports, each in its own temporary data directory, started and stopped by the test (installed by
//! `scripts/install-test-deps` when missing).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Member {
    pub name: String,
    pub client: SocketAddr,
    peer: SocketAddr,
    dir: std::path::PathBuf,
    child: Option<Child>,
}

pub struct EtcdCluster {
    pub members: Vec<Member>,
    token: String,
    /// Certificate and key its client port serves TLS with, if any.
    tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster answers.
    pub async fn start(n: usize) -> EtcdCluster {
        Self::start_with(n, None).await
    }

    /// Starts `n` members serving TLS on their client ports with `tls` (certificate, key).
    pub async fn start_with(n: usize, tls: Option<(std::path::PathBuf, std::path::PathBuf)>) -> EtcdCluster {
        super::ensure_test_tool("etcd-server", || Command::new("etcd").arg("--version").output().is_ok());
        let dir = tempfile::tempdir().unwrap();
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: super::free_addr(),
                peer: super::free_addr(),
                dir: dir.path().join(format!("m{i}")),
                child: None,
            })
            .collect();
        let token = format!("headroom-test-{}", std::process::id());
        let mut c = EtcdCluster { members, token, tls, _dir: dir };
        for i in 0..n {
            c.start_member(i);
        }
        for i in 0..n {
            c.wait_healthy(i).await;
        }
        c
    }

    fn initial_cluster(&self) -> String {
        self.members.iter().map(|m| format!("{}=http://{}", m.name, m.peer)).collect::<Vec<_>>().join(",")
    }

    /// Starts member `i` (again, on its data directory, after `stop_member`).
    pub fn start_member(&mut self, i: usize) {
        let initial = self.initial_cluster();
        let scheme = self.scheme();
        let mut cmd = Command::new("etcd");
        if let Some((cert, key)) = &self.tls {
            cmd.args(["--cert-file", cert.to_str().unwrap(), "--key-file", key.to_str().unwrap()]);
        }
        let m = &mut self.members[i];
        let child = cmd
            .args(["--name", &m.name, "--data-dir", m.dir.to_str().unwrap()])
            .args(["--listen-client-urls", &format!("{scheme}://{}", m.client)])
            .args(["--advertise-client-urls", &format!("{scheme}://{}", m.client)])
            .args(["--listen-peer-urls", &format!("http://{}", m.peer)])
            .args(["--initial-advertise-peer-urls", &format!("http://{}", m.peer)])
            .args(["--initial-cluster", &initial, "--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd starts");
        m.child = Some(child);
    }

    /// Kills member `i` (SIGKILL).
    pub fn stop_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Waits until member `i` says it is healthy (it has a leader); over TLS, until it listens.
    pub async fn wait_healthy(&self, i: usize) {
        if self.tls.is_some() {
            return super::wait_listening(self.members[i].client).await;
        }
        let url = format!("http://{}/health", self.members[i].client);
        super::poll_until(Duration::from_secs(30), "etcd member healthy", || {
            let url = url.clone();
            async move {
                let req = http::Request::get(url).body(super::full(bytes::Bytes::new())).unwrap();
                match tokio::time::timeout(Duration::from_secs(1), super::client().request(req)).await {
                    Ok(Ok(r)) => {
                        use http_body_util::BodyExt;
                        let body = r.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        String::from_utf8_lossy(&body).contains("\"true\"")
                    }
                    _ => false,
                }
            }
        })
        .await;
    }

    /// The `etcd = [...]` value for a replica's `[cluster]`.
    pub fn endpoints_toml(&self) -> String {
        let list: Vec<String> = self.members.iter().map(|m| format!("\"{}://{}\"", self.scheme(), m.client)).collect();
        format!("[{}]", list.join(", "))
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.stop_member(i);
        }
    }
}
