//! Header hygiene for both directions: hop-by-hop headers out, forwarding headers in.
//!
//! One pass over the header names finds the hop-by-hop ones (and measures the head for the 431
//! limit); removal only happens when one is present, which for most requests is never.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;
use std::net::IpAddr;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// A fresh request id: 32 hex digits.
pub fn new_request_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}

/// What one pass over a header map found.
pub struct Scan {
    /// Approximate size of the header block in bytes (names, values, separators).
    pub bytes: usize,
    hop_by_hop: bool,
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == KEEP_ALIVE
        || name.as_str().starts_with("proxy-")
}

pub fn scan(headers: &HeaderMap) -> Scan {
    let mut bytes = 0;
    let mut hop_by_hop = false;
    for (name, value) in headers {
        bytes += name.as_str().len() + value.len() + 4;
        hop_by_hop |= is_hop_by_hop(name);
    }
    Scan { bytes, hop_by_hop }
}

/// Removes the hop-by-hop headers: Connection and every header it names, Keep-Alive, TE,
/// Trailer, Transfer-Encoding, Upgrade and Proxy-*.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, scan: &Scan) {
    if !scan.hop_by_hop {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    let doomed: Vec<HeaderName> = headers.keys().filter(|n| is_hop_by_hop(n)).cloned().collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// Appends `value` to a comma-separated header, or sets it.
fn append(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    let joined = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(old) if !old.is_empty() => format!("{old}, {value}"),
        _ => value.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&joined) {
        headers.insert(name, v);
    }
}

/// Per-connection facts used to build the forwarding headers.
pub struct Client {
    pub ip: IpAddr,
    /// The client IP as a header value, computed once per connection.
    pub ip_value: HeaderValue,
    /// The `for=` parameter of `Forwarded` (IPv6 quoted and bracketed).
    pub forwarded_for: String,
    pub proto: &'static str,
}

impl Client {
    pub fn new(ip: IpAddr, proto: &'static str) -> Self {
        let ip = ip.to_canonical();
        let forwarded_for = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("\"[{v6}]\""),
        };
        let ip_value = HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        Client { ip, ip_value, forwarded_for, proto }
    }
}

/// Adds X-Forwarded-For/-Proto/-Host, Forwarded and Via to a request going upstream.
/// `host` is the host the client asked for (Host header or :authority).
pub fn add_forwarding(headers: &mut HeaderMap, client: &Client, host: Option<&str>, version: Version) {
    match headers.get(&X_FORWARDED_FOR) {
        None => {
            headers.insert(X_FORWARDED_FOR, client.ip_value.clone());
        }
        Some(_) => append(headers, X_FORWARDED_FOR, &client.ip.to_string()),
    }
    append(headers, X_FORWARDED_PROTO, client.proto);
    let mut forwarded = format!("for={};proto={}", client.forwarded_for, client.proto);
    if let Some(h) = host {
        append(headers, X_FORWARDED_HOST, h);
        forwarded.push_str(";host=\"");
        forwarded.push_str(h);
        forwarded.push('"');
    }
    append(headers, header::FORWARDED, &forwarded);
    let via = match version {
        Version::HTTP_09 => "0.9 headroom",
        Version::HTTP_10 => "1.0 headroom",
        Version::HTTP_2 => "2 headroom",
        Version::HTTP_3 => "3 headroom",
        _ => "1.1 headroom",
    };
    append(headers, header::VIA, via);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn strips_hop_by_hop_and_connection_tokens() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-t"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "basic x"),
            ("proxy-connection", "keep-alive"),
            ("content-type", "application/json"),
        ]);
        let s = scan(&h);
        strip_hop_by_hop(&mut h, &s);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["content-type"]);
    }

    #[test]
    fn clean_map_is_untouched() {
        let h = map(&[("content-type", "a"), ("authorization", "b")]);
        assert!(!scan(&h).hop_by_hop);
    }

    #[test]
    fn forwarding_headers_append() {
        let mut h = map(&[("x-forwarded-for", "10.1.1.1"), ("via", "1.1 edge")]);
        let c = Client::new("127.0.0.1".parse().unwrap(), "http");
        add_forwarding(&mut h, &c, Some("api.example"), Version::HTTP_11);
        assert_eq!(h["x-forwarded-for"], "10.1.1.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.example");
        assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http;host=\"api.example\"");
        assert_eq!(h["via"], "1.1 edge, 1.1 headroom");
        let c6 = Client::new("::1".parse().unwrap(), "http");
        let mut h6 = HeaderMap::new();
        add_forwarding(&mut h6, &c6, None, Version::HTTP_2);
        assert_eq!(h6["forwarded"], "for=\"[::1]\";proto=http");
        assert_eq!(h6["via"], "2 headroom");
    }
}
