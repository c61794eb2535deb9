//! Header hygiene for both directions: hop-by-hop headers out, forwarding headers in.
//!
//! One pass over the header names ([`scan`]) measures the head (for the 431 limit) and records
//! which hop-by-hop and forwarding headers are present, so the rewrite afterwards touches only
//! what exists: for most requests that is a few inserts of pre-built values and no removal.

use crate::http1::ExtraFields;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;
use std::net::IpAddr;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// A fresh request id: 32 hex digits.
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = fastrand::u128(..);
    let mut out = [0u8; 32];
    for b in out.iter_mut().rev() {
        *b = HEX[(n & 15) as usize];
        n >>= 4;
    }
    // Hex digits are always a valid header value.
    HeaderValue::from_bytes(&out).unwrap_or(HeaderValue::from_static("0"))
}

// Bits of `Scan::found`.
const CONNECTION: u32 = 1;
const TE: u32 = 1 << 1;
const TRAILER: u32 = 1 << 2;
const TRANSFER_ENCODING: u32 = 1 << 3;
const UPGRADE: u32 = 1 << 4;
const KEEPALIVE: u32 = 1 << 5;
const PROXY_ANY: u32 = 1 << 6;
const HOP_BY_HOP: u32 = CONNECTION | TE | TRAILER | TRANSFER_ENCODING | UPGRADE | KEEPALIVE | PROXY_ANY;
const XFF: u32 = 1 << 8;
const XFP: u32 = 1 << 9;
const XFH: u32 = 1 << 10;
const FORWARDED: u32 = 1 << 11;
const VIA: u32 = 1 << 12;
const REQUEST_ID: u32 = 1 << 13;
const EXPECT: u32 = 1 << 14;

/// What one pass over a header map found.
#[derive(Debug, Clone, Copy)]
pub struct Scan {
    /// Approximate size of the header block in bytes (names, values, separators).
    pub bytes: usize,
    found: u32,
}

impl Scan {
    pub fn has_request_id(&self) -> bool {
        self.found & REQUEST_ID != 0
    }
}

/// Removes `Expect`: the client's `100-continue` is answered by headroom itself when it starts
/// reading the body, so the backend must not send a second interim response.
pub fn strip_expect(headers: &mut HeaderMap, scan: &Scan) {
    if scan.found & EXPECT != 0 {
        headers.remove(header::EXPECT);
    }
}

fn classify(name: &HeaderName) -> u32 {
    // Standard names compare by pointer-sized tag; only custom names reach the string compare.
    if name == header::CONNECTION {
        CONNECTION
    } else if name == header::TE {
        TE
    } else if name == header::TRAILER {
        TRAILER
    } else if name == header::TRANSFER_ENCODING {
        TRANSFER_ENCODING
    } else if name == header::UPGRADE {
        UPGRADE
    } else if name == header::FORWARDED {
        FORWARDED
    } else if name == header::VIA {
        VIA
    } else if name == header::EXPECT {
        EXPECT
    } else if name == header::PROXY_AUTHORIZATION || name == header::PROXY_AUTHENTICATE {
        PROXY_ANY
    } else {
        match name.as_str() {
            "keep-alive" => KEEPALIVE,
            "x-forwarded-for" => XFF,
            "x-forwarded-proto" => XFP,
            "x-forwarded-host" => XFH,
            "x-request-id" => REQUEST_ID,
            s if s.starts_with("proxy-") => PROXY_ANY,
            _ => 0,
        }
    }
}

/// Headers headroom owns on the way upstream: a client's `Connection` listing cannot remove
/// them (headroom sets or extends them after hop-by-hop stripping), nor `Content-Length`, which
/// frames the body.
fn is_owned(token: &str) -> bool {
    [
        "host",
        "content-length",
        "forwarded",
        "via",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
    ]
    .iter()
    .any(|k| token.eq_ignore_ascii_case(k))
}

pub fn scan(headers: &HeaderMap) -> Scan {
    let mut bytes = 0;
    let mut found = 0;
    for (name, value) in headers {
        bytes += name.as_str().len() + value.len() + 4;
        found |= classify(name);
    }
    Scan { bytes, found }
}

/// Removes the hop-by-hop headers: Connection and every header it names (except the ones
/// headroom owns, see [`is_owned`]), Keep-Alive, TE, Trailer, Transfer-Encoding, Upgrade and
/// Proxy-*. What [`Scan`] found of the owned headers therefore still holds afterwards.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, scan: &Scan) {
    if scan.found & HOP_BY_HOP == 0 {
        return;
    }
    if scan.found & CONNECTION != 0 {
        // Tokens naming headers that go anyway (keep-alive, close, upgrade, te) need no lookup.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !["keep-alive", "close", "upgrade", "te", ""].iter().any(|k| t.eq_ignore_ascii_case(k)))
            .filter(|t| !is_owned(t))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    for (bit, name) in [
        (TE, header::TE),
        (TRAILER, header::TRAILER),
        (TRANSFER_ENCODING, header::TRANSFER_ENCODING),
        (UPGRADE, header::UPGRADE),
        (KEEPALIVE, crate::http1::KEEP_ALIVE.clone()),
    ] {
        if scan.found & bit != 0 {
            headers.remove(name);
        }
    }
    if scan.found & PROXY_ANY != 0 {
        let doomed: Vec<HeaderName> = headers.keys().filter(|n| n.as_str().starts_with("proxy-")).cloned().collect();
        for name in doomed {
            headers.remove(name);
        }
    }
}

/// Appends `value` (the concatenation of its parts) to a comma-separated header that is present,
/// as one field: the values of all its lines (a list sent on several lines is one list, RFC 9110
/// §5.3), then `value`.
fn append(headers: &mut HeaderMap, name: HeaderName, value: &[&[u8]]) {
    let lines = headers.get_all(&name);
    if lines.iter().next().is_none() {
        return;
    }
    let old: usize = lines.iter().map(|v| v.len() + 2).sum();
    let mut joined = Vec::with_capacity(old + value.iter().map(|p| p.len()).sum::<usize>());
    // Empty lines are empty list elements, which recipients ignore (RFC 9110 §5.6.1).
    for line in lines.iter().filter(|v| !v.is_empty()) {
        joined.extend_from_slice(line.as_bytes());
        joined.extend_from_slice(b", ");
    }
    for part in value {
        joined.extend_from_slice(part);
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(joined)) {
        headers.insert(name, v);
    }
}

/// Appends `value` to the client's `name` when it sent one (`present`), else adds the field to
/// `extra`.
fn set_or_append(headers: &mut HeaderMap, extra: &mut ExtraFields, present: bool, name: HeaderName, value: &[&[u8]]) {
    if present {
        append(headers, name, value);
    } else {
        extra.push(&name, value);
    }
}

/// A gateway's own `Via` entry, `<version> headroom-<8 hex>`: the token differs per gateway,
/// so a request that arrives carrying it has come back around through a backend.
pub struct Via {
    token: String,
    /// Values for HTTP/1.0, 1.1, 2 and 3.
    values: [HeaderValue; 4],
}

impl Default for Via {
    fn default() -> Self {
        Self::new()
    }
}

impl Via {
    pub fn new() -> Self {
        let token = format!("headroom-{:08x}", fastrand::u32(..));
        let value = |v: &str| {
            HeaderValue::from_str(&format!("{v} {token}")).unwrap_or(HeaderValue::from_static("1.1 headroom"))
        };
        Via { values: [value("1.0"), value("1.1"), value("2"), value("3")], token }
    }

    /// The `Via` entry for a request received over `version`.
    pub fn value(&self, version: Version) -> &HeaderValue {
        match version {
            Version::HTTP_09 | Version::HTTP_10 => &self.values[0],
            Version::HTTP_2 => &self.values[2],
            Version::HTTP_3 => &self.values[3],
            _ => &self.values[1],
        }
    }

    /// The token alone, e.g. `headroom-1a2b3c4d`.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Whether a `Via` field of `headers` already carries this gateway's token.
    pub fn seen_in(&self, headers: &HeaderMap, scan: &Scan) -> bool {
        scan.found & VIA != 0
            && headers
                .get_all(header::VIA)
                .iter()
                .any(|v| memchr::memmem::find(v.as_bytes(), self.token.as_bytes()).is_some())
    }
}

/// Per-connection facts used to build the forwarding headers, computed once per connection.
pub struct Client {
    pub ip: IpAddr,
    /// The client IP as a header value.
    ip_value: HeaderValue,
    /// The `for=` and `proto=` parameters of `Forwarded` (IPv6 quoted and bracketed).
    forwarded: String,
    proto: HeaderValue,
    /// X-Forwarded-For and X-Forwarded-Proto, for a request that has neither.
    fixed: ExtraFields,
}

impl Client {
    pub fn new(ip: IpAddr, proto: &'static str) -> Self {
        let ip = ip.to_canonical();
        let forwarded_for = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("\"[{v6}]\""),
        };
        let ip_value = HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        let mut fixed = ExtraFields::default();
        fixed.push(&X_FORWARDED_FOR, &[ip_value.as_bytes()]);
        fixed.push(&X_FORWARDED_PROTO, &[proto.as_bytes()]);
        Client {
            ip,
            ip_value,
            forwarded: format!("for={forwarded_for};proto={proto}"),
            proto: HeaderValue::from_static(proto),
            fixed,
        }
    }
}

/// Adds X-Forwarded-For/-Proto/-Host, Forwarded and Via to a request going upstream: appended
/// to the client's field when it sent one, else added to `extra` (which the encoder writes after
/// the map's fields). `host` is the Host the client asked for (header or :authority), as sent.
pub fn add_forwarding(
    headers: &mut HeaderMap,
    extra: &mut ExtraFields,
    scan: &Scan,
    client: &Client,
    host: Option<&HeaderValue>,
    via: &HeaderValue,
) {
    if scan.found & (XFF | XFP) == 0 {
        extra.append(&client.fixed);
    } else {
        set_or_append(headers, extra, scan.found & XFF != 0, X_FORWARDED_FOR, &[client.ip_value.as_bytes()]);
        set_or_append(headers, extra, scan.found & XFP != 0, X_FORWARDED_PROTO, &[client.proto.as_bytes()]);
    }
    let forwarded = client.forwarded.as_bytes();
    match host {
        Some(h) => {
            set_or_append(headers, extra, scan.found & XFH != 0, X_FORWARDED_HOST, &[h.as_bytes()]);
            let value: &[&[u8]] = &[forwarded, b";host=\"", h.as_bytes(), b"\""];
            set_or_append(headers, extra, scan.found & FORWARDED != 0, header::FORWARDED, value);
        }
        None => set_or_append(headers, extra, scan.found & FORWARDED != 0, header::FORWARDED, &[forwarded]),
    }
    set_or_append(headers, extra, scan.found & VIA != 0, header::VIA, &[via.as_bytes()]);
}

/// A `Retry-After` value as a duration from now: delay-seconds or an HTTP-date (RFC 9110
/// §10.2.3). `None` when it cannot be read; a date in the past is a zero pause.
pub fn retry_after(value: &HeaderValue) -> Option<std::time::Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(std::time::Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(std::time::SystemTime::now()).unwrap_or_default())
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

    /// The map as the backend gets it: the client's fields, then the extra ones.
    fn forward(h: &mut HeaderMap, s: &Scan, c: &Client, host: Option<&HeaderValue>, via: &HeaderValue) {
        let mut extra = ExtraFields::default();
        add_forwarding(h, &mut extra, s, c, host, via);
        for (name, _) in extra.fields() {
            assert!(!h.contains_key(&name), "{name} is both in the map and extra");
        }
        extra.add_to(h);
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
    fn a_connection_listing_cannot_remove_the_headers_headroom_owns() {
        let mut h = map(&[
            ("connection", "forwarded, x-forwarded-for, via, x-forwarded-proto, x-forwarded-host, x-request-id, host, content-length, x-secret"),
            ("host", "a.example"),
            ("content-length", "3"),
            ("x-forwarded-for", "10.0.0.1"),
            ("via", "1.1 edge"),
            ("x-request-id", "abc"),
            ("x-secret", "1"),
        ]);
        let s = scan(&h);
        strip_hop_by_hop(&mut h, &s);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["content-length", "host", "via", "x-forwarded-for", "x-request-id"]);
        let via = Via::new();
        let c = Client::new("127.0.0.2".parse().unwrap(), "http");
        let host = h.get("host").cloned();
        forward(&mut h, &s, &c, host.as_ref(), via.value(Version::HTTP_11));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.2");
        assert_eq!(h["forwarded"], "for=127.0.0.2;proto=http;host=\"a.example\"");
        assert_eq!(h["x-request-id"], "abc");
    }

    #[test]
    fn a_request_carrying_our_via_token_is_seen_and_others_are_not() {
        let via = Via::new();
        let mine = map(&[("via", &format!("1.1 edge, {}", via.value(Version::HTTP_11).to_str().unwrap()))]);
        assert!(via.seen_in(&mine, &scan(&mine)));
        let other = Via::new();
        let theirs = map(&[("via", other.value(Version::HTTP_2).to_str().unwrap())]);
        assert!(!via.seen_in(&theirs, &scan(&theirs)) || via.token() == other.token());
        assert!(!via.seen_in(&HeaderMap::new(), &scan(&HeaderMap::new())));
    }

    #[test]
    fn clean_map_is_untouched() {
        let h = map(&[("content-type", "a"), ("authorization", "b")]);
        assert_eq!(scan(&h).found & HOP_BY_HOP, 0);
    }

    #[test]
    fn request_ids_are_32_hex_digits_and_differ() {
        let a = new_request_id();
        let b = new_request_id();
        assert_eq!(a.len(), 32);
        assert!(a.as_bytes().iter().all(u8::is_ascii_hexdigit));
        assert_ne!(a, b);
    }

    #[test]
    fn forwarding_headers_append() {
        let mut h = map(&[("x-forwarded-for", "10.1.1.1"), ("via", "1.1 edge")]);
        let c = Client::new("127.0.0.1".parse().unwrap(), "http");
        let s = scan(&h);
        let via = Via::new();
        forward(&mut h, &s, &c, Some(&HeaderValue::from_static("api.example")), via.value(Version::HTTP_11));
        assert_eq!(h["x-forwarded-for"], "10.1.1.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.example");
        assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http;host=\"api.example\"");
        assert_eq!(h["via"], format!("1.1 edge, 1.1 {}", via.token()));
        let c6 = Client::new("::1".parse().unwrap(), "http");
        let mut h6 = HeaderMap::new();
        let s6 = scan(&h6);
        forward(&mut h6, &s6, &c6, None, via.value(Version::HTTP_2));
        assert_eq!(h6["forwarded"], "for=\"[::1]\";proto=http");
        assert_eq!(h6["via"], format!("2 {}", via.token()));
    }

    #[test]
    fn a_forwarding_header_sent_on_several_lines_keeps_every_value_before_ours() {
        let mut h = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
            ("via", "1.0 a"),
            ("via", "1.1 b"),
        ]);
        let c = Client::new("127.0.0.1".parse().unwrap(), "http");
        let s = scan(&h);
        let via = Via::new();
        forward(&mut h, &s, &c, None, via.value(Version::HTTP_11));
        assert_eq!(h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(), ["10.0.0.1, 10.0.0.2, 127.0.0.1"]);
        assert_eq!(h["via"], format!("1.0 a, 1.1 b, 1.1 {}", via.token()));
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        use std::time::{Duration, SystemTime};
        assert_eq!(retry_after(&HeaderValue::from_static("7")), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(&HeaderValue::from_static(" 0 ")), Some(Duration::ZERO));
        assert_eq!(retry_after(&HeaderValue::from_static("soon")), None);
        assert_eq!(retry_after(&HeaderValue::from_static("-3")), None);
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        let d = retry_after(&HeaderValue::from_str(&later).unwrap()).unwrap();
        assert!(d > Duration::from_secs(110) && d <= Duration::from_secs(120), "{d:?}");
        let past = retry_after(&HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"));
        assert_eq!(past, Some(Duration::ZERO));
    }
}
