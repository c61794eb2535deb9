//! The one place where a failed request becomes a status code.
//!
//! Every failure the data path can produce is a [`ProxyError`] that knows where it came from
//! (client, upstream, gateway) and whether trying another backend is safe; [`ProxyError::status`]
//! maps it exhaustively, without a catch-all, so a new kind cannot silently get the wrong status.

use http::StatusCode;
use std::time::Duration;

/// A boxed error, as `http_body` bodies carry them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the admission queue could not admit a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No backend of the pool takes traffic, and none is starting.
    NoBackend,
    /// The queue was full.
    QueueFull,
    /// The request waited `queue.timeout` without a slot freeing.
    QueueTimeout,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request is malformed or ambiguous (smuggling shapes, bad framing).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The request asks for something the gateway does not do (CONNECT tunnels, transfer codings
    /// other than chunked).
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
    /// The request target is longer than a URI can be.
    #[error("request target too long")]
    UriTooLong,
    /// The request head was not complete within `request_header_timeout`.
    #[error("request header timeout")]
    HeaderTimeout,
    /// The client sent no request body data for `idle_timeout` in the middle of the body.
    #[error("request body timeout: nothing received for {0:?}")]
    BodyTimeout(Duration),
    /// The request body is larger than `max_request_body`.
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(u64),
    /// The request head is larger than `max_header_bytes`.
    #[error("request headers larger than {0} bytes")]
    HeadersTooLarge(usize),
    /// No route matches the request.
    #[error("no route for this request")]
    NoRoute,
    /// The request body names a model no route serves (answered in OpenAI's error shape).
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    /// The request already passed through this headroom (its `Via` carries our token): a
    /// backend points back at the proxy.
    #[error("loop detected: this request already passed through this gateway")]
    LoopDetected,
    /// Admission failed: no backend, queue full, or queue timeout.
    #[error("{}", rejection_text(*.0))]
    Unavailable(Rejection),
    /// Connecting to the backend failed or timed out.
    #[error("cannot connect to backend: {0}")]
    Connect(String),
    /// The backend broke the protocol or closed the connection before a response.
    #[error("bad response from backend: {0}")]
    Upstream(String),
    /// No response head from the backend within `response_header_timeout`.
    #[error("backend did not answer within {0:?}")]
    ResponseTimeout(Duration),
    /// The client's request body failed while it was being forwarded.
    #[error("client request body failed: {0}")]
    ClientBody(String),
}

fn rejection_text(r: Rejection) -> &'static str {
    match r {
        Rejection::NoBackend => "no backend available",
        Rejection::QueueFull => "admission queue full",
        Rejection::QueueTimeout => "timed out in the admission queue",
    }
}

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Client,
    Upstream,
    Gateway,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::ClientBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::UriTooLong => StatusCode::URI_TOO_LONG,
            ProxyError::HeaderTimeout | ProxyError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::NoRoute | ProxyError::ModelNotFound(_) => StatusCode::NOT_FOUND,
            ProxyError::LoopDetected => StatusCode::LOOP_DETECTED,
            ProxyError::Unavailable(Rejection::NoBackend)
            | ProxyError::Unavailable(Rejection::QueueFull)
            | ProxyError::Unavailable(Rejection::QueueTimeout) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::ResponseTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub fn source(&self) -> Source {
        match self {
            ProxyError::BadRequest(_)
            | ProxyError::NotImplemented(_)
            | ProxyError::UriTooLong
            | ProxyError::ClientBody(_)
            | ProxyError::HeaderTimeout
            | ProxyError::BodyTimeout(_)
            | ProxyError::BodyTooLarge(_)
            | ProxyError::HeadersTooLarge(_) => Source::Client,
            ProxyError::ModelNotFound(_) => Source::Client,
            ProxyError::NoRoute | ProxyError::Unavailable(_) | ProxyError::LoopDetected => Source::Gateway,
            ProxyError::Connect(_) | ProxyError::Upstream(_) | ProxyError::ResponseTimeout(_) => Source::Upstream,
        }
    }

    /// Whether sending the same request to another backend is safe regardless of its method:
    /// only when it certainly never reached the first one.
    pub fn retry_safe(&self) -> bool {
        matches!(self, ProxyError::Connect(_))
    }

    /// Seconds for a `Retry-After` header, on the statuses that invite a retry.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            ProxyError::Unavailable(Rejection::NoBackend) => Some(5),
            ProxyError::Unavailable(Rejection::QueueFull) | ProxyError::Unavailable(Rejection::QueueTimeout) => Some(1),
            _ => None,
        }
    }

    /// Whether the client connection must be closed after the error response (framing unknown).
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            ProxyError::BadRequest(_)
                | ProxyError::NotImplemented(_)
                | ProxyError::UriTooLong
                | ProxyError::HeaderTimeout
                | ProxyError::BodyTooLarge(_)
                | ProxyError::ClientBody(_)
        )
    }
}

/// The small JSON error body: `{"error": "...", "request_id": "..."}`.
pub fn error_body(message: &str, request_id: &str) -> bytes::Bytes {
    let v = serde_json::json!({ "error": message, "request_id": request_id });
    bytes::Bytes::from(v.to_string())
}

impl ProxyError {
    /// The body of the error answer: [`error_body`], but for an unknown model, which OpenAI's
    /// clients expect in their own shape.
    pub fn body(&self, request_id: &str) -> bytes::Bytes {
        match self {
            ProxyError::ModelNotFound(model) => crate::openai::model_not_found(model, request_id),
            _ => error_body(&self.to_string(), request_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(ProxyError::BadRequest("x").status(), 400);
        assert_eq!(ProxyError::HeaderTimeout.status(), 408);
        assert_eq!(ProxyError::BodyTooLarge(1).status(), 413);
        assert_eq!(ProxyError::HeadersTooLarge(1).status(), 431);
        assert_eq!(ProxyError::Connect("x".into()).status(), 502);
        assert_eq!(ProxyError::Unavailable(Rejection::QueueFull).status(), 503);
        assert_eq!(ProxyError::ResponseTimeout(Duration::from_secs(1)).status(), 504);
        assert_eq!(ProxyError::LoopDetected.status(), 508);
        assert_eq!(ProxyError::Unavailable(Rejection::QueueTimeout).retry_after(), Some(1));
        assert!(ProxyError::Connect("x".into()).retry_safe());
        assert!(!ProxyError::Upstream("x".into()).retry_safe());
    }

    #[test]
    fn body_is_json() {
        let b = error_body("no \"backend\"", "abc");
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["error"], "no \"backend\"");
        assert_eq!(v["request_id"], "abc");
    }
}
