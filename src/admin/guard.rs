//! Who may drive the admin API. Checked before any handler runs; owns every refusal of an admin
//! request for who or where it came from, never what it asks.
//!
//! - A browser page must not drive it: a mutating request (anything but GET/HEAD) that carries
//!   an `Origin` other than the listener's own, or `Sec-Fetch-Site` other than `same-origin` or
//!   `none`, gets 403; a body other than JSON gets 415.
//! - Without a token (allowed on loopback only), the `Host` must be an IP address or
//!   `localhost`: a page whose name was rebound to 127.0.0.1 cannot read or drive it either.
//! - With `[admin] token_env`/`token_file`, mutating requests need `Authorization: Bearer
//!   <token>` (compared in constant time), else 401.

use crate::config::AdminConfig;
use http::{header, request::Parts, Method, StatusCode};

/// Why an admin request was refused: the status, the reason label (a metric) and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: &'static str,
    pub message: &'static str,
}

fn refuse(status: StatusCode, reason: &'static str, message: &'static str) -> Result<(), Refusal> {
    Err(Refusal { status, reason, message })
}

/// Whether `req` may be served.
pub fn check(req: &Parts, cfg: &AdminConfig) -> Result<(), Refusal> {
    let host = req.headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    if cfg.token.is_none() && !is_local_name(host) {
        return refuse(
            StatusCode::FORBIDDEN,
            "host",
            "without an admin token, the admin API answers only to an IP address or localhost as Host",
        );
    }
    if matches!(req.method, Method::GET | Method::HEAD) {
        return Ok(());
    }
    if let Some(site) = req.headers.get("sec-fetch-site") {
        if !(site == "same-origin" || site == "none") {
            return refuse(StatusCode::FORBIDDEN, "origin", "requests from other sites are refused");
        }
    }
    if let Some(origin) = req.headers.get(header::ORIGIN) {
        let own =
            origin.to_str().ok().and_then(|o| o.strip_prefix("http://")).is_some_and(|o| o.eq_ignore_ascii_case(host));
        if !own {
            return refuse(StatusCode::FORBIDDEN, "origin", "requests from other origins are refused");
        }
    }
    if let Some(ct) = req.headers.get(header::CONTENT_TYPE) {
        if !is_json(ct) {
            return refuse(StatusCode::UNSUPPORTED_MEDIA_TYPE, "content_type", "the admin API takes application/json");
        }
    }
    if let Some(token) = &cfg.token {
        let given = req.headers.get(header::AUTHORIZATION).and_then(|v| bearer(v.as_bytes()));
        if !given.is_some_and(|g| token.matches(g)) {
            return refuse(StatusCode::UNAUTHORIZED, "token", "this admin API needs Authorization: Bearer <token>");
        }
    }
    Ok(())
}

/// Whether a `Content-Type` value is JSON (`application/json`, parameters allowed).
pub fn is_json(value: &http::HeaderValue) -> bool {
    let essence = value.as_bytes().split(|b| *b == b';').next().unwrap_or_default();
    essence.trim_ascii().eq_ignore_ascii_case(b"application/json")
}

/// The token of an `Authorization: Bearer <token>` value.
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then(|| rest.trim_ascii())
}

/// A Host that names this machine by address or as `localhost`, with or without a port.
fn is_local_name(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !name.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(']') => {
            name
        }
        _ => host,
    };
    let bare = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(name);
    name.eq_ignore_ascii_case("localhost") || bare.parse::<std::net::IpAddr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AdminToken;

    fn parts(method: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri("/api/reload");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn admin(token: Option<&str>) -> AdminConfig {
        AdminConfig {
            listen: "127.0.0.1:9901".parse().unwrap(),
            history_interval: std::time::Duration::from_secs(5),
            token: token.map(AdminToken::new),
            allow_link_local_backends: false,
        }
    }

    fn reason(method: &str, headers: &[(&str, &str)], token: Option<&str>) -> Option<&'static str> {
        check(&parts(method, headers), &admin(token)).err().map(|r| r.reason)
    }

    #[test]
    fn a_cross_origin_simple_request_is_refused_and_same_origin_passes() {
        let host = ("host", "127.0.0.1:9901");
        assert_eq!(
            reason("POST", &[host, ("origin", "http://evil.example"), ("content-type", "text/plain")], None),
            Some("origin")
        );
        assert_eq!(reason("POST", &[host, ("origin", "null")], None), Some("origin"));
        assert_eq!(reason("POST", &[host, ("sec-fetch-site", "cross-site")], None), Some("origin"));
        assert_eq!(reason("POST", &[host, ("sec-fetch-site", "same-site")], None), Some("origin"));
        assert_eq!(reason("POST", &[host, ("content-type", "text/plain")], None), Some("content_type"));
        assert_eq!(
            reason("POST", &[host, ("origin", "http://127.0.0.1:9901"), ("sec-fetch-site", "same-origin")], None),
            None
        );
        assert_eq!(reason("POST", &[host, ("content-type", "application/json; charset=utf-8")], None), None);
        assert_eq!(reason("GET", &[host, ("origin", "http://evil.example")], None), None, "reads are not driven");
    }

    #[test]
    fn without_a_token_only_local_names_are_served() {
        assert_eq!(reason("GET", &[("host", "evil.example:9901")], None), Some("host"));
        assert_eq!(reason("GET", &[], None), Some("host"));
        for ok in ["localhost:9901", "127.0.0.1", "[::1]:9901", "LOCALHOST"] {
            assert_eq!(reason("GET", &[("host", ok)], None), None, "{ok}");
        }
        assert_eq!(reason("GET", &[("host", "headroom.internal:9901")], Some("0123456789abcdef")), None);
    }

    #[test]
    fn with_a_token_mutations_need_the_bearer() {
        let t = Some("0123456789abcdef");
        let host = ("host", "10.0.0.5:9901");
        assert_eq!(reason("POST", &[host], t), Some("token"));
        assert_eq!(reason("POST", &[host, ("authorization", "Bearer 0123456789abcdeX")], t), Some("token"));
        assert_eq!(reason("POST", &[host, ("authorization", "Basic 0123456789abcdef")], t), Some("token"));
        assert_eq!(reason("DELETE", &[host, ("authorization", "Bearer 0123456789abcdef")], t), None);
        assert_eq!(reason("POST", &[host, ("authorization", "bearer 0123456789abcdef")], t), None);
        assert_eq!(reason("GET", &[host], t), None);
    }
}
