//! `[pools.X.engine]`: which inference engine a pool's backends run, and how their metrics are
//! read. Pure data; `sections::engine` validates it and `engine` reads the metrics.

use std::time::Duration;

/// Which inference engine a pool's backends run (`[pools.X.engine] kind`): whose metric names to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Vllm,
    Sglang,
    Tgi,
    LlamaCpp,
    /// Every kind's names: the first kind that reports anything wins.
    Auto,
}

impl EngineKind {
    pub const ALLOWED: &'static str = "vllm, sglang, tgi, llamacpp, auto";

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "vllm" => Some(Self::Vllm),
            "sglang" => Some(Self::Sglang),
            "tgi" => Some(Self::Tgi),
            "llamacpp" => Some(Self::LlamaCpp),
            "auto" => Some(Self::Auto),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vllm => "vllm",
            Self::Sglang => "sglang",
            Self::Tgi => "tgi",
            Self::LlamaCpp => "llamacpp",
            Self::Auto => "auto",
        }
    }
}

/// `[pools.X.engine]`: the backends' own load, read from their Prometheus text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Default "/metrics".
    pub metrics_path: String,
    /// How often each backend is read. Default 1s.
    pub interval: Duration,
    pub kind: EngineKind,
}

impl EngineConfig {
    /// A reading older than this (three intervals) counts as none.
    pub fn stale_after_ms(&self) -> u64 {
        u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX).saturating_mul(3)
    }
}
