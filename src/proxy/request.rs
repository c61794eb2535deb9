//! The request's own phases, before and around the backend: `check` (request hygiene: framing,
//! method, header size, loops, the declared length), `host` (the authority routing and the
//! upstream request see), and `to_upstream` (the request as the backend gets it: hop-by-hop
//! fields out, the forwarding headers and request id in, origin form, HTTP/1.1).

use super::headers::{self, Client, Scan, Via, X_REQUEST_ID};
use crate::config::ServerConfig;
use crate::error::ProxyError;
use crate::http1::framing::parse_length;
use crate::http1::{AmbiguousFraming, ExtraFields};
use http::header::{self, HeaderValue};
use http::{Method, Uri, Version};
use std::borrow::Cow;

/// Refuses what no backend should see; returns the declared body length, if any.
pub(super) fn check(
    parts: &http::request::Parts,
    scan: &Scan,
    server: &ServerConfig,
    via: &Via,
) -> Result<Option<u64>, ProxyError> {
    if parts.version != Version::HTTP_2 && parts.extensions.get::<AmbiguousFraming>().is_some() {
        return Err(ProxyError::BadRequest(
            "ambiguous framing: Content-Length with Transfer-Encoding, or Content-Length twice",
        ));
    }
    if parts.method == Method::CONNECT {
        return Err(ProxyError::NotImplemented("CONNECT (tunnels) is not supported"));
    }
    if scan.bytes > server.max_header_bytes {
        return Err(ProxyError::HeadersTooLarge(server.max_header_bytes));
    }
    if via.seen_in(&parts.headers, scan) {
        crate::telemetry::loop_detected();
        return Err(ProxyError::LoopDetected);
    }
    let mut lengths = parts.headers.get_all(header::CONTENT_LENGTH).iter();
    let declared = match (lengths.next(), lengths.next()) {
        (None, _) => None,
        (Some(v), None) => Some(parse_length(v.as_bytes()).ok_or(ProxyError::BadRequest("invalid Content-Length"))?),
        (Some(_), Some(_)) => return Err(ProxyError::BadRequest("duplicate Content-Length")),
    };
    if declared.is_some_and(|n| n > server.max_request_body) {
        return Err(ProxyError::BodyTooLarge(server.max_request_body));
    }
    Ok(declared)
}

/// The authority of the request: a target in absolute form (HTTP/1.1) or h2's :authority names
/// the host, whatever Host says (RFC 9112 §3.2.2, RFC 9113 §8.3.1); routing and the upstream
/// request see that one.
pub(super) fn authority(parts: &http::request::Parts) -> Result<HeaderValue, ProxyError> {
    super::authority::request_authority(&parts.uri, &parts.headers).map_err(ProxyError::BadRequest)
}

/// A Host value without its port, lower-case (borrowed when it already is).
pub(super) fn host_without_port(raw: &str) -> Cow<'_, str> {
    let host = match raw.rfind(':') {
        Some(i) if !raw.ends_with(']') && raw[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &raw[..i],
        _ => raw,
    };
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// Whether requests of `method` have no body by custom (an h2 request of these methods is
/// waited on briefly for an empty last DATA frame rather than sent upstream chunked).
pub(super) fn bodiless(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS)
}

/// Rewrites the request as its backend gets it; the forwarding headers and the request id it
/// adds (rather than extends) are returned apart, for the encoder to write after the map.
pub(super) fn to_upstream(
    parts: &mut http::request::Parts,
    scan: &Scan,
    client: &Client,
    authority: HeaderValue,
    via: &Via,
    request_id: &HeaderValue,
) -> Result<ExtraFields, ProxyError> {
    headers::strip_hop_by_hop(&mut parts.headers, scan);
    headers::strip_expect(&mut parts.headers, scan);
    let via = via.value(parts.version);
    let mut extra = ExtraFields::with_capacity(256 + 2 * authority.len());
    headers::add_forwarding(&mut parts.headers, &mut extra, scan, client, Some(&authority), via);
    if scan.has_request_id() {
        // The request's id (the client's first, or one made up for an empty one) is what the
        // backend sees, once: not a second the client sent, nor an empty one.
        parts.headers.insert(X_REQUEST_ID, request_id.clone());
    } else {
        extra.push(&X_REQUEST_ID, &[request_id.as_bytes()]);
    }
    if parts.uri.authority().is_some() {
        parts.headers.insert(header::HOST, authority);
    }
    // Upstream requests are origin-form (the h2c sender makes its own absolute form).
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        parts.uri = path.parse::<Uri>().map_err(|_| ProxyError::BadRequest("invalid request target"))?;
    }
    parts.version = Version::HTTP_11;
    Ok(extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_without_port_strips_ports_only() {
        assert_eq!(host_without_port("API.example:8080"), "api.example");
        assert_eq!(host_without_port("[::1]:80"), "[::1]");
        assert_eq!(host_without_port("[::1]"), "[::1]");
        assert_eq!(host_without_port("b.example"), "b.example");
    }
}
