//! What a config value of the wrong type is told: the dotted field path, the form the key allows,
//! and what was found (`pools.chat.backends[0].weight: expected an integer 1..=1000, found the
//! string "2"`). Also the two lenient shapes of the file: a size may be a plain number of bytes,
//! and `server.listen` may be one address instead of a list.
//!
//! Also the checks of single values that several sections share: a backend's weight and
//! capacity, and a status range (`500-599`). The other ranges a value must fall in are checked
//! by `validate` and the sections (the table here repeats them for the message, and a test holds
//! the two to the same bounds).

use super::ConfigError;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use std::fmt;
use toml::Spanned;

/// The form a key allows, by the key's own name (the last segment of its path).
pub(crate) fn allowed_form(key: &str) -> Option<&'static str> {
    Some(match key {
        "weight" => "an integer 1..=1000",
        "max_inflight" | "max_inflight_per_backend" | "target_inflight_per_backend" | "scale_up_queue_depth" => {
            "an integer 1..=1000000"
        }
        "max_inflight_per_connection" | "consecutive_failures" => "an integer 1..=1000",
        "workers" | "max_backends" => "an integer 1..=1024",
        "min_backends" => "an integer 0..=1024",
        "count" => "an integer 1..=256 (0..=256 with [autoscale])",
        "healthy_threshold" | "unhealthy_threshold" => "an integer 1..=100",
        "max_ejected_percent" | "budget_percent" => "an integer 0..=100",
        "attempts" => "an integer 0..=10",
        "max_depth" => "an integer 0..=1000000",
        "panic_threshold" => "a number 0.0..=1.0",
        "max_header_bytes" | "max_request_body" | "route_body_limit" => "a size such as \"64KiB\" or a number of bytes",
        "listen" => "an address \"ip:port\" (server.listen: or a list of them)",
        "access_log"
        | "honor_retry_after"
        | "backup"
        | "tls"
        | "gate_new_backends"
        | "idempotent_only"
        | "allow_link_local_backends"
        | "discover_models"
        | "reuse_connection" => "true or false",
        "command" | "server_names" | "on" | "models" => "a list of strings",
        k if is_duration(k) => "a duration string such as \"5s\" or \"150ms\"",
        _ => return None,
    })
}

fn is_duration(key: &str) -> bool {
    key.ends_with("timeout")
        || key.ends_with("_window")
        || key.ends_with("interval")
        || matches!(key, "cooldown" | "slow_start" | "base_ejection" | "max_ejection" | "replace_unhealthy_after")
}

/// Rewrites serde's `invalid type: string "2", expected u32` for the key at `path` into
/// `path: expected <the key's form>, found the string "2"`, with a hint for a bare number where a
/// duration belongs. Other messages get the path in front.
pub(crate) fn type_error(path: &str, message: &str) -> String {
    let key = path.rsplit('.').next().unwrap_or(path);
    let key = key.split('[').next().unwrap_or(key);
    let Some(rest) = message.strip_prefix("invalid type: ") else {
        return if path.is_empty() { message.to_string() } else { format!("{path}: {message}") };
    };
    let (found, expected) = rest.split_once(", expected ").unwrap_or((rest, "another type"));
    let found = found.replace('`', "");
    let form = allowed_form(key).unwrap_or(expected);
    let mut text = format!("{path}: expected {form}, found the {found}");
    if is_duration(key) {
        if let Some(n) = found.strip_prefix("integer ") {
            text.push_str(&format!("; write \"{n}s\""));
        }
    }
    text
}

/// `max_header_bytes`/`max_request_body`: `"64KiB"`, `"32MiB"`, or a plain number of bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeText {
    Text(String),
    Bytes(u64),
}

impl<'de> Deserialize<'de> for SizeText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = SizeText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"64KiB\" or a number of bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SizeText, E> {
                Ok(SizeText::Text(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SizeText, E> {
                Ok(SizeText::Bytes(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SizeText, E> {
                u64::try_from(v)
                    .map(SizeText::Bytes)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &"a size of zero bytes or more"))
            }
        }
        d.deserialize_any(V)
    }
}

/// `server.listen`: one address, or a list of them.
#[derive(Debug)]
pub enum Listen {
    One(String),
    Many(Vec<Spanned<String>>),
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Listen;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an address \"ip:port\" or a list of them")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Listen, E> {
                Ok(Listen::One(v.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Listen, A::Error> {
                let mut out = Vec::new();
                while let Some(a) = seq.next_element::<Spanned<String>>()? {
                    out.push(a);
                }
                Ok(Listen::Many(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// The most a backend's weight may be.
pub const MAX_WEIGHT: u32 = 1000;

pub(super) fn check_weight(w: &Spanned<u32>, field: &str, text: &str) -> Result<u32, ConfigError> {
    let v = *w.get_ref();
    if (1..=MAX_WEIGHT).contains(&v) {
        Ok(v)
    } else {
        Err(ConfigError::at(text, w.span(), format!("{field}: {v} is out of range; allowed 1..={MAX_WEIGHT}")))
    }
}

pub(super) fn check_capacity(v: &Spanned<u32>, field: &str, text: &str) -> Result<u32, ConfigError> {
    let n = *v.get_ref();
    if (1..=1_000_000).contains(&n) {
        Ok(n)
    } else {
        Err(ConfigError::at(text, v.span(), format!("{field}: {n} is out of range; allowed 1..=1000000")))
    }
}

/// `"200"` or `"200-299"`, within 100..=599.
pub(super) fn parse_status_range(text: &str) -> Option<(u16, u16)> {
    let (lo, hi) = match text.split_once('-') {
        Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
        None => {
            let v = text.trim().parse().ok()?;
            (v, v)
        }
    };
    ((100..=599).contains(&lo) && (100..=599).contains(&hi) && lo <= hi).then_some((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_type_error_names_the_path_the_form_and_what_was_found() {
        assert_eq!(
            type_error("pools.chat.backends[0].weight", "invalid type: string \"2\", expected u32"),
            "pools.chat.backends[0].weight: expected an integer 1..=1000, found the string \"2\""
        );
    }

    #[test]
    fn a_bare_number_where_a_duration_belongs_is_told_how_to_write_it() {
        let m = type_error("server.idle_timeout", "invalid type: integer `5`, expected a string");
        assert_eq!(m, "server.idle_timeout: expected a duration string such as \"5s\" or \"150ms\", found the integer 5; write \"5s\"");
    }

    fn parse(text: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
        crate::config::Config::parse(text, std::path::Path::new("."))
    }

    const POOL: &str = "[pools.chat]\n[[pools.chat.backends]]\naddr = \"127.0.0.1:9001\"\n";

    #[test]
    fn a_weight_written_as_a_string_is_refused_with_path_form_and_position() {
        let e = parse(&format!("{POOL}weight = \"2\"\n")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "4:10: pools.chat.backends[0].weight: expected an integer 1..=1000, found the string \"2\""
        );
    }

    #[test]
    fn a_single_listen_address_is_a_one_element_list() {
        let c = parse(&format!("[server]\nlisten = \"127.0.0.1:8180\"\n{POOL}")).unwrap();
        assert_eq!(c.server.listen, vec!["127.0.0.1:8180".parse().unwrap()]);
        let e = parse(&format!("[server]\nlisten = 8180\n{POOL}")).unwrap_err();
        assert!(e.message.starts_with("server.listen: expected an address"), "{e}");
        let e = parse(&format!("[server]\nlisten = \"127.0.0.1\"\n{POOL}")).unwrap_err();
        assert!(e.message.contains("needs a port"), "{e}");
        assert_eq!((e.line, e.column), (Some(2), Some(10)));
    }

    #[test]
    fn sizes_may_be_a_plain_number_of_bytes() {
        let c = parse(&format!("[server]\nmax_request_body = 1048576\nmax_header_bytes = \"8KiB\"\n{POOL}")).unwrap();
        assert_eq!(c.server.max_request_body, 1_048_576);
        assert_eq!(c.server.max_header_bytes, 8192);
        let e = parse(&format!("[server]\nmax_request_body = -1\n{POOL}")).unwrap_err();
        assert!(e.message.starts_with("server.max_request_body:"), "{e}");
        let e = parse(&format!("[server]\nmax_request_body = 0\n{POOL}")).unwrap_err();
        assert!(e.message.contains("greater than zero"), "{e}");
    }

    #[test]
    fn a_duration_written_as_a_bare_number_is_refused_with_how_to_write_it() {
        let e = parse(&format!("{POOL}[pools.chat.health]\ninterval = 5\n")).unwrap_err();
        assert_eq!(
            e.message,
            "pools.chat.health.interval: expected a duration string such as \"5s\" or \"150ms\", found the integer 5; write \"5s\""
        );
        assert_eq!(e.line, Some(5));
    }

    #[test]
    fn booleans_and_lists_name_their_form_too() {
        let e = parse(&format!("{POOL}backup = \"yes\"\n")).unwrap_err();
        assert_eq!(e.message, "pools.chat.backends[0].backup: expected true or false, found the string \"yes\"");
        let e = parse("[pools.chat.launch]\ncommand = \"mock\"\n").unwrap_err();
        assert!(e.message.starts_with("pools.chat.launch.command: expected a list of strings"), "{e}");
    }

    /// The ranges in the type-error wording are the ones `validate` enforces: each out-of-range
    /// value below is refused by `validate` with a range the form for its key also states.
    #[test]
    fn the_forms_state_the_same_ranges_validate_enforces() {
        let auto = "[pools.a.launch]\ncommand = [\"x\", \"{addr}\"]\n[pools.a.autoscale]\n";
        let cases: Vec<(String, &str)> = vec![
            (format!("{POOL}weight = 0\n"), "weight"),
            (format!("{POOL}max_inflight = 0\n"), "max_inflight"),
            (format!("[server]\nmax_inflight_per_connection = 0\n{POOL}"), "max_inflight_per_connection"),
            (format!("[server]\nworkers = 0\n{POOL}"), "workers"),
            (format!("{auto}max_backends = 0\n"), "max_backends"),
            (format!("{auto}min_backends = 2000\n"), "min_backends"),
            (format!("{auto}target_inflight_per_backend = 0\n"), "target_inflight_per_backend"),
            (format!("{auto}scale_up_queue_depth = 0\n"), "scale_up_queue_depth"),
            ("[pools.a.launch]\ncommand = [\"x\", \"{addr}\"]\ncount = 300\n".to_string(), "count"),
            (format!("{POOL}[pools.chat.health]\nhealthy_threshold = 0\n"), "healthy_threshold"),
            (format!("{POOL}[pools.chat.health]\nunhealthy_threshold = 101\n"), "unhealthy_threshold"),
            (format!("{POOL}[pools.chat.outlier]\nconsecutive_failures = 0\n"), "consecutive_failures"),
            (format!("{POOL}[pools.chat.outlier]\nmax_ejected_percent = 101\n"), "max_ejected_percent"),
            (format!("{POOL}[pools.chat.retry]\nattempts = 11\n"), "attempts"),
            (format!("{POOL}[pools.chat.retry]\nbudget_percent = 101\n"), "budget_percent"),
            (format!("[pools.chat]\nqueue = {{ max_depth = 2000000 }}\n{}", &POOL[13..]), "max_depth"),
            (format!("[pools.chat]\npanic_threshold = 2.0\n{}", &POOL[13..]), "panic_threshold"),
        ];
        for (text, key) in cases {
            let e = parse(&text).expect_err(&text);
            let range = e
                .message
                .split_whitespace()
                .find(|w| w.contains("..="))
                .unwrap_or_else(|| panic!("{key}: no range in {:?}", e.message))
                .trim_matches(|c: char| !c.is_ascii_digit());
            let form = allowed_form(key).unwrap_or_else(|| panic!("{key}: no form"));
            assert!(form.contains(range), "{key}: validate says {range}, the form says {form}");
        }
    }
}
