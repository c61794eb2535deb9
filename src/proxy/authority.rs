//! The authority a request names (RFC 9112 §3.2, RFC 9113 §8.3.1): which of Host and the
//! target's own authority counts, and what a valid one looks like. Routing and the upstream Host
//! are read from it; the codec's differential tests hold the parser to the same rule.

use http::header::{self, HeaderMap, HeaderValue};

/// Whether `value` is a valid authority for Host or `:authority`: `host[:port]` with a reg-name,
/// IPv4 or bracketed IPv6 host, and no userinfo (RFC 3986 §3.2, RFC 9110 §7.2).
pub fn is_valid_authority(value: &[u8]) -> bool {
    let (host, port) = match value.first() {
        Some(b'[') => match memchr::memchr(b']', value) {
            Some(end) => {
                let inner = &value[1..end];
                let ok = !inner.is_empty() && inner.iter().all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'));
                if !ok {
                    return false;
                }
                (None, &value[end + 1..])
            }
            None => return false,
        },
        _ => match memchr::memrchr(b':', value) {
            Some(i) => (Some(&value[..i]), &value[i..]),
            None => (Some(value), &value[value.len()..]),
        },
    };
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    let host_ok = host.is_none_or(|h| {
        !h.is_empty() && h.iter().all(|b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(b))
    });
    port_ok && host_ok
}

/// The authority a request names: its target's (absolute form, or h2's `:authority`), which wins
/// over `Host` (RFC 9112 §3.2.2, RFC 9113 §8.3.1), else `Host`. Refused when there is none, or
/// when it, or a `Host` it overrides, is not a valid authority (RFC 9112 §3.2: an invalid Host
/// is a 400 whatever else the request says).
pub fn request_authority(uri: &http::Uri, headers: &HeaderMap) -> Result<HeaderValue, &'static str> {
    let host = headers.get(header::HOST);
    if host.is_some_and(|h| !is_valid_authority(h.as_bytes())) {
        return Err("invalid Host");
    }
    match uri.authority() {
        // Host was checked above; only a target's own authority is left to check.
        None => host.cloned().ok_or("missing Host"),
        Some(a) if is_valid_authority(a.as_str().as_bytes()) => {
            HeaderValue::from_str(a.as_str()).map_err(|_| "invalid request target")
        }
        Some(_) => Err("invalid Host or :authority"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_with_userinfo_spaces_or_bad_ports_are_invalid() {
        for ok in ["a.example", "a.example:8080", "127.0.0.1:1", "[::1]:80", "[::1]", "x_y-z.~:", "A.EXAMPLE"] {
            assert!(is_valid_authority(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "u@evil",
            "u:p@evil:80",
            "a.example:8o",
            "[::1",
            "[zz]:1",
            "[::1]x",
            "a/b",
            "a?b",
            ":80",
            "a:123456",
        ] {
            assert!(!is_valid_authority(bad.as_bytes()), "{bad}");
        }
    }
}
