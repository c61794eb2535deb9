//! The config pipeline, the unit parsers and the other parsers of outside text under generated
//! input: nothing panics, every config error has a position, every accepted duration is bounded
//! (so no deadline built from it can overflow). More cases with `HEADROOM_FUZZ_CASES`.

use super::units::{parse_duration, parse_size, MAX_DURATION};
use super::*;
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("HEADROOM_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

/// Values a careless or hostile operator might write for any key.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "\"18446744073709551615s\"",
            "\"7d\"",
            "\"8d\"",
            "\"0s\"",
            "\"1ms\"",
            "\"5 seconds\"",
            "\"1.5s\"",
            "\"-1s\"",
            "0",
            "-1",
            "4294967296",
            "18446744073709551615",
            "1e308",
            "true",
            "\"\"",
            "\"32MiB\"",
            "\"99999999999GiB\"",
            "[]",
            "[\"0.0.0.0:0\"]",
            "\"127.0.0.1:9901\"",
            "{}",
            "\"http://x\"",
            "nan",
            "inf",
        ])
        .prop_map(String::from),
        "[0-9]{1,25}",
        "\"[0-9]{1,22}(ns|ms|s|m|h|d|w)\"",
        "\"[ -~]{0,10}\"",
    ]
}

/// Keys at any level of the file, as `table.key`.
fn key() -> impl Strategy<Value = (&'static str, &'static str)> {
    prop::sample::select(vec![
        ("server", "request_header_timeout"),
        ("server", "idle_timeout"),
        ("server", "send_timeout"),
        ("server", "shutdown_timeout"),
        ("server", "max_header_bytes"),
        ("server", "max_request_body"),
        ("server", "route_body_limit"),
        ("server", "workers"),
        ("server", "listen"),
        ("server", "max_inflight_per_connection"),
        ("admin", "listen"),
        ("admin", "history_interval"),
        ("pools.p", "connect_timeout"),
        ("pools.p", "response_header_timeout"),
        ("pools.p", "stream_idle_timeout"),
        ("pools.p", "slow_start"),
        ("pools.p", "max_inflight_per_backend"),
        ("pools.p", "panic_threshold"),
        ("pools.p", "balance"),
        ("pools.p", "models"),
        ("pools.p", "discover_models"),
        ("pools.p.queue", "timeout"),
        ("pools.p.queue", "max_depth"),
        ("pools.p.health", "interval"),
        ("pools.p.health", "timeout"),
        ("pools.p.health", "fast_interval"),
        ("pools.p.outlier", "base_ejection"),
        ("pools.p.outlier", "max_ejection"),
        ("pools.p.retry", "attempts"),
        ("pools.p", "nonsense"),
    ])
}

fn config_text(entries: &[((&str, &str), String)]) -> String {
    let mut tables: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for ((table, key), value) in entries {
        tables.entry(table).or_default().push(format!("{key} = {value}"));
    }
    tables.entry("pools.p").or_default();
    let mut text = String::new();
    for (table, lines) in tables {
        text.push_str(&format!("[{table}]\n"));
        for l in lines {
            text.push_str(&l);
            text.push('\n');
        }
        if table == "pools.p" {
            text.push_str("[[pools.p.backends]]\naddr = \"127.0.0.1:9001\"\n");
        }
    }
    text
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn any_config_is_refused_with_a_position_or_accepted_with_bounded_durations(
        entries in prop::collection::vec((key(), value()), 0..6)
    ) {
        let text = config_text(&entries);
        match Config::parse(&text, Path::new(".")) {
            Err(e) => prop_assert!(e.line.is_some() && e.column.is_some(), "no position: {} for\n{}", e, text),
            Ok(c) => {
                let s = &c.server;
                for d in [s.request_header_timeout, s.idle_timeout, s.send_timeout, s.shutdown_timeout] {
                    prop_assert!(d <= MAX_DURATION);
                    let _ = crate::clock::deadline(d);
                    let _ = crate::clock::add_ms(u64::MAX / 2, d);
                }
                for p in &c.pools {
                    for d in [p.connect_timeout, p.response_header_timeout, p.stream_idle_timeout, p.queue.timeout] {
                        prop_assert!(d <= MAX_DURATION);
                    }
                }
            }
        }
    }

    #[test]
    fn any_text_as_a_config_never_panics(text in "[\\[\\]a-z_.=\" 0-9\n{}:,]{0,200}") {
        if let Err(e) = Config::parse(&text, Path::new(".")) {
            prop_assert!(e.line.is_some(), "no position: {} for {:?}", e, text);
        }
    }

    #[test]
    fn unit_parsers_never_panic_and_bound_durations(text in "[ -~]{0,30}") {
        if let Ok(d) = parse_duration(&text) {
            prop_assert!(d <= MAX_DURATION);
        }
        let _ = parse_size(&text);
        if let Ok(v) = http::HeaderValue::from_str(&text) {
            let _ = crate::proxy::headers::retry_after(&v);
        }
    }

    #[test]
    fn hook_replies_never_panic(text in "[ -~]{0,120}", raw in prop::collection::vec(any::<u8>(), 0..120)) {
        for bytes in [text.as_bytes(), &raw[..]] {
            crate::scale::provider::parse_reply_for_test(bytes);
        }
    }
}
