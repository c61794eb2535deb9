//! The config file's shape, exactly as written in TOML. Every struct denies unknown fields, and the
//! values that validation may reject keep their source span so errors can point at line:column.
//! Nothing here checks meaning: that is `validate`'s job.

use super::forms::{Listen, SizeText};
use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: FileServer,
    #[serde(default)]
    pub admin: FileAdmin,
    #[serde(default)]
    pub routes: Vec<FileRoute>,
    #[serde(default)]
    pub pools: BTreeMap<String, Spanned<FilePool>>,
    pub cluster: Option<FileCluster>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCluster {
    pub etcd: Spanned<Vec<Spanned<String>>>,
    pub name: Option<Spanned<String>>,
    pub prefix: Option<Spanned<String>>,
    pub lease_ttl: Option<Spanned<String>>,
    pub username: Option<Spanned<String>>,
    pub password_env: Option<Spanned<String>>,
    pub ca_file: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileServer {
    pub listen: Option<Spanned<Listen>>,
    pub request_header_timeout: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub send_timeout: Option<Spanned<String>>,
    pub max_inflight_per_connection: Option<Spanned<u32>>,
    pub max_header_bytes: Option<Spanned<SizeText>>,
    pub max_request_body: Option<Spanned<SizeText>>,
    pub route_body_limit: Option<Spanned<SizeText>>,
    pub shutdown_timeout: Option<Spanned<String>>,
    pub workers: Option<Spanned<usize>>,
    pub state_dir: Option<Spanned<String>>,
    pub tls: Option<Spanned<FileTls>>,
    pub access_log: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
    pub handshake_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub certs: Vec<FileSniCert>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSniCert {
    pub server_names: Spanned<Vec<String>>,
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAdmin {
    pub listen: Option<Spanned<String>>,
    pub history_interval: Option<Spanned<String>>,
    pub token_env: Option<Spanned<String>>,
    pub token_file: Option<Spanned<String>>,
    pub allow_link_local_backends: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    pub path_prefix: Option<Spanned<String>>,
    pub host: Option<Spanned<String>>,
    pub model: Option<Spanned<String>>,
    pub model_prefix: Option<Spanned<String>>,
    pub pool: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePool {
    pub balance: Option<Spanned<String>>,
    pub protocol: Option<Spanned<String>>,
    pub max_inflight_per_backend: Option<Spanned<u32>>,
    pub connect_timeout: Option<Spanned<String>>,
    pub response_header_timeout: Option<Spanned<String>>,
    pub stream_idle_timeout: Option<Spanned<String>>,
    pub panic_threshold: Option<Spanned<f64>>,
    pub slow_start: Option<Spanned<String>>,
    pub honor_retry_after: Option<bool>,
    pub models: Option<Spanned<Vec<String>>>,
    pub discover_models: Option<bool>,
    pub queue: Option<FileQueue>,
    #[serde(default)]
    pub backends: Vec<FileBackend>,
    pub launch: Option<Spanned<FileLaunch>>,
    pub health: Option<FileHealth>,
    pub outlier: Option<FileOutlier>,
    pub retry: Option<FileRetry>,
    pub engine: Option<Spanned<FileEngine>>,
    pub prefix: Option<Spanned<FilePrefix>>,
    pub autoscale: Option<Spanned<FileAutoscale>>,
    pub tls: Option<bool>,
    pub tls_ca: Option<Spanned<String>>,
    pub tls_server_name: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAutoscale {
    pub min_backends: Option<Spanned<u32>>,
    pub max_backends: Option<Spanned<u32>>,
    pub target_inflight_per_backend: Option<Spanned<u32>>,
    pub scale_up_queue_depth: Option<Spanned<u32>>,
    pub scale_up_window: Option<Spanned<String>>,
    pub scale_down_window: Option<Spanned<String>>,
    pub cooldown: Option<Spanned<String>>,
    pub provision_timeout: Option<Spanned<String>>,
    pub replace_unhealthy_after: Option<Spanned<String>>,
    pub signal: Option<Spanned<String>>,
    pub provider: Option<Spanned<FileProvider>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileProvider {
    pub kind: Spanned<String>,
    pub command: Option<Spanned<Vec<String>>>,
    pub url: Option<Spanned<String>>,
    pub token_env: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub retry_backoff: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRetry {
    pub attempts: Option<Spanned<u32>>,
    pub on: Option<Spanned<Vec<String>>>,
    pub budget_percent: Option<Spanned<u32>>,
    pub idempotent_only: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEngine {
    pub metrics_path: Option<Spanned<String>>,
    pub interval: Option<Spanned<String>>,
    pub kind: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePrefix {
    pub block_chars: Option<Spanned<u64>>,
    pub index_blocks: Option<Spanned<u64>>,
    pub balance_threshold: Option<Spanned<u64>>,
    pub min_match: Option<Spanned<f64>>,
    pub affinity_header: Option<Spanned<String>>,
    pub hash_balance_factor: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileOutlier {
    pub consecutive_failures: Option<Spanned<u32>>,
    pub base_ejection: Option<Spanned<String>>,
    pub max_ejection: Option<Spanned<String>>,
    pub max_ejected_percent: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHealth {
    pub path: Option<Spanned<String>>,
    pub interval: Option<Spanned<String>>,
    pub fast_interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub healthy_threshold: Option<Spanned<u32>>,
    pub unhealthy_threshold: Option<Spanned<u32>>,
    pub expect_status: Option<Spanned<String>>,
    pub gate_new_backends: Option<bool>,
    pub reuse_connection: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileQueue {
    pub max_depth: Option<Spanned<usize>>,
    pub timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBackend {
    pub addr: Spanned<String>,
    pub weight: Option<Spanned<u32>>,
    pub max_inflight: Option<Spanned<u32>>,
    pub backup: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLaunch {
    pub command: Spanned<Vec<String>>,
    pub count: Option<Spanned<u32>>,
    pub weight: Option<Spanned<u32>>,
    pub max_inflight: Option<Spanned<u32>>,
    pub ready_timeout: Option<Spanned<String>>,
}
