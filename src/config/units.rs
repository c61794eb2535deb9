//! Parsing of the human units used in the config file: durations ("2s", "150ms") and sizes ("32MiB").

use std::time::Duration;

/// The longest duration any key or flag accepts: 7 days. Bounding every duration keeps
/// `Instant + Duration` and millisecond arithmetic far from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Parses a duration such as `"2s"`, `"150ms"`, `"1m30s"` or `"600s"`, at most [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration; expected e.g. \"2s\" or \"150ms\"".into());
    }
    let d = humantime::parse_duration(text)
        .map_err(|e| format!("invalid duration {text:?} ({e}); expected e.g. \"2s\", \"150ms\", \"1m\""))?;
    if d > MAX_DURATION {
        return Err(format!("duration {text:?} is too long; allowed at most 7d"));
    }
    Ok(d)
}

/// Parses a byte size such as `"64KiB"`, `"32MiB"`, `"1GB"` or a plain number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits.parse().map_err(|_| {
        format!("invalid size {text:?}; expected a whole number with an optional unit, e.g. \"64KiB\" or \"32MiB\"")
    })?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        other => return Err(format!("invalid size unit {other:?} in {text:?}; allowed: B, KB, KiB, MB, MiB, GB, GiB")),
    };
    value.checked_mul(factor).ok_or_else(|| format!("size {text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("150ms").unwrap(), Duration::from_millis(150));
        assert_eq!(parse_duration("1m 30s").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("two seconds").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5").is_err());
        assert_eq!(parse_duration("7d").unwrap(), MAX_DURATION);
        let e = parse_duration("18446744073709551615s").unwrap_err();
        assert!(e.contains("at most 7d"), "{e}");
        assert!(parse_duration("7d 1s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB").unwrap(), 65_536);
        assert_eq!(parse_size("32MiB").unwrap(), 32 << 20);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("2 GB").unwrap(), 2_000_000_000);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }
}
