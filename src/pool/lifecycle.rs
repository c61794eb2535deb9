//! A backend's lifecycle states, as the hot path stores them (one byte) and the API names them.

/// Lifecycle state of a backend. Only `Healthy` takes new requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BackendState {
    Healthy = 0,
    /// Takes no new requests; in-flight ones finish.
    Draining = 1,
    /// New, waiting for its first passing health check (when the pool gates new backends).
    Starting = 2,
    /// Failed `unhealthy_threshold` active checks in a row.
    Unhealthy = 3,
    /// Taken out by passive ejection until a time.
    Ejected = 4,
}

impl BackendState {
    pub const ALL: [BackendState; 5] = [Self::Healthy, Self::Starting, Self::Unhealthy, Self::Ejected, Self::Draining];

    pub(super) fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Healthy,
            2 => Self::Starting,
            3 => Self::Unhealthy,
            4 => Self::Ejected,
            _ => Self::Draining,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Draining => "draining",
            Self::Starting => "starting",
            Self::Unhealthy => "unhealthy",
            Self::Ejected => "ejected",
        }
    }
}
