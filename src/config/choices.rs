//! A pool's enumerated choices (`balance`, `protocol`): their values, names and the allowed
//! list the config errors quote.

/// How a pool picks a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalanceKind {
    /// Weighted least-connection (default).
    LeastConn,
    RoundRobin,
    /// Smooth weighted round robin.
    WeightedRoundRobin,
    /// Weighted power of two random choices.
    P2c,
    /// Weighted least load: headroom's own in-flight count plus each engine's waiting queue (and
    /// KV-cache pressure), from `[pools.X.engine]`.
    LeastLoad,
    /// Prefix-cache-aware: where the prompt's longest prefix was sent, unless that backend is
    /// loaded past `[pools.X.prefix] balance_threshold`; else least load (`[pools.X.prefix]`).
    Prefix,
}

impl BalanceKind {
    pub const ALLOWED: &'static str = "least_conn, round_robin, weighted_round_robin, p2c, least_load, prefix";

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "least_conn" => Self::LeastConn,
            "round_robin" => Self::RoundRobin,
            "weighted_round_robin" => Self::WeightedRoundRobin,
            "p2c" => Self::P2c,
            "least_load" => Self::LeastLoad,
            "prefix" => Self::Prefix,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::LeastConn => "least_conn",
            Self::RoundRobin => "round_robin",
            Self::WeightedRoundRobin => "weighted_round_robin",
            Self::P2c => "p2c",
            Self::LeastLoad => "least_load",
            Self::Prefix => "prefix",
        }
    }
}

/// The protocol spoken to a pool's backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 with keep-alive (default).
    Http1,
    /// HTTP/2: over cleartext with prior knowledge, or over TLS (ALPN `h2`) with `tls = true`.
    H2c,
    /// With `tls = true`, whatever the backend picks by ALPN (h2 preferred); else HTTP/1.1.
    Auto,
}

impl Protocol {
    pub const ALLOWED: &'static str = "http1, h2c, auto";
}
