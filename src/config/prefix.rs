//! `[pools.X.prefix]`: prefix-cache-aware routing (`balance = "prefix"`). The runtime type and
//! its validation; same rules and messages as the other sections.

use super::file::FilePrefix;
use super::sections::Ctx;
use super::{BalanceKind, ConfigError};
use toml::Spanned;

/// How a `balance = "prefix"` pool keys prompts, remembers where they went, and when load wins
/// over affinity.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefixConfig {
    /// Bytes of prompt text per hashed block. Default 256.
    pub block_chars: usize,
    /// Block hashes remembered for the whole pool (least recently sent forgotten first).
    /// Default 200,000 (8 bytes each).
    pub index_blocks: usize,
    /// A backend whose load (requests through headroom plus the engine's queue) is more than
    /// this above the least loaded one's is passed over, however much of the prompt it holds.
    /// Default 8.
    pub balance_threshold: u32,
    /// The share of a prompt's blocks a backend must hold to be chosen for them; below it, the
    /// least loaded backend takes the prompt. Default 0.1.
    pub min_match: f64,
    /// A request header whose value pins a session to a backend (consistent hashing with
    /// bounded loads), before prefixes are looked at. Default none.
    pub affinity_header: Option<http::HeaderName>,
    /// With `affinity_header`: a backend takes a session while its load stays within this factor
    /// of the pool's average. Default 1.25.
    pub hash_balance_factor: f64,
}

impl Default for PrefixConfig {
    fn default() -> Self {
        PrefixConfig {
            block_chars: 256,
            index_blocks: 200_000,
            balance_threshold: 8,
            min_match: 0.1,
            affinity_header: None,
            hash_balance_factor: 1.25,
        }
    }
}

/// `[pools.X.prefix]` of a `balance = "prefix"` pool (the defaults when the section is absent);
/// `None` for other pools, which may not have the section.
pub(super) fn prefix(
    ctx: &Ctx,
    balance: BalanceKind,
    section: Option<&Spanned<FilePrefix>>,
) -> Result<Option<PrefixConfig>, ConfigError> {
    match (balance, section) {
        (BalanceKind::Prefix, section) => validate(ctx, section).map(Some),
        (_, None) => Ok(None),
        (_, Some(s)) => Err(ctx.err(s.span(), format!("{}: only read with balance = \"prefix\"", ctx.field("prefix")))),
    }
}

fn validate(ctx: &Ctx, p: Option<&Spanned<FilePrefix>>) -> Result<PrefixConfig, ConfigError> {
    let d = PrefixConfig::default();
    let Some(p) = p.map(Spanned::get_ref) else { return Ok(d) };
    let range = |v: &Option<Spanned<u64>>, key: &str, default: u64, lo: u64, hi: u64| match v {
        None => Ok(default),
        Some(n) if (lo..=hi).contains(n.get_ref()) => Ok(*n.get_ref()),
        Some(n) => Err(ctx.err(n.span(), format!("{}: allowed range is {lo}..={hi}", ctx.field(key)))),
    };
    let ratio = |v: &Option<Spanned<f64>>, key: &str, default: f64, lo: f64, hi: f64| match v {
        None => Ok(default),
        Some(x) if (lo..=hi).contains(x.get_ref()) => Ok(*x.get_ref()),
        Some(x) => Err(ctx.err(x.span(), format!("{}: allowed range is {lo}..={hi}", ctx.field(key)))),
    };
    let affinity_header = match &p.affinity_header {
        None => None,
        Some(h) => Some(http::HeaderName::from_bytes(h.get_ref().trim().as_bytes()).map_err(|_| {
            ctx.err(h.span(), format!("{}: not a valid header name", ctx.field("prefix.affinity_header")))
        })?),
    };
    Ok(PrefixConfig {
        block_chars: range(&p.block_chars, "prefix.block_chars", 256, 16, 1 << 20)? as usize,
        index_blocks: range(&p.index_blocks, "prefix.index_blocks", 200_000, 1024, 1 << 26)? as usize,
        balance_threshold: range(
            &p.balance_threshold,
            "prefix.balance_threshold",
            u64::from(d.balance_threshold),
            0,
            1_000_000,
        )? as u32,
        min_match: ratio(&p.min_match, "prefix.min_match", d.min_match, 0.0, 1.0)?,
        affinity_header,
        hash_balance_factor: ratio(&p.hash_balance_factor, "prefix.hash_balance_factor", 1.25, 1.0, 100.0)?,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::{BalanceKind, Config};
    use std::path::Path;

    const POOL: &str = "[pools.p]\nbalance = \"prefix\"\n[[pools.p.backends]]\naddr = \"127.0.0.1:9001\"\n";

    fn parse(text: &str) -> Result<Config, crate::config::ConfigError> {
        Config::parse(text, Path::new("."))
    }

    #[test]
    fn a_prefix_pool_takes_the_defaults_or_its_section() {
        let c = parse(POOL).unwrap();
        assert_eq!(c.pools[0].balance, BalanceKind::Prefix);
        assert_eq!(c.pools[0].prefix.as_ref().unwrap().block_chars, 256);
        let c = parse(&format!(
            "{POOL}[pools.p.prefix]\nblock_chars = 64\nindex_blocks = 4096\nbalance_threshold = 2\nmin_match = 0.5\n\
             affinity_header = \"X-Session-Id\"\nhash_balance_factor = 1.5\n"
        ))
        .unwrap();
        let p = c.pools[0].prefix.clone().unwrap();
        assert_eq!((p.block_chars, p.index_blocks, p.balance_threshold, p.min_match), (64, 4096, 2, 0.5));
        assert_eq!(p.affinity_header.unwrap().as_str(), "x-session-id");
        assert_eq!(p.hash_balance_factor, 1.5);
    }

    #[test]
    fn out_of_range_values_and_a_section_without_the_balance_are_refused() {
        let e = parse(&format!("{POOL}[pools.p.prefix]\nblock_chars = 0\n")).unwrap_err();
        assert!(e.message.starts_with("pools.p.prefix.block_chars: allowed range is 16..="), "{e}");
        let e = parse(&format!("{POOL}[pools.p.prefix]\nmin_match = 1.5\n")).unwrap_err();
        assert!(e.message.starts_with("pools.p.prefix.min_match: allowed range"), "{e}");
        let e = parse(&format!("{POOL}[pools.p.prefix]\naffinity_header = \"bad header\"\n")).unwrap_err();
        assert!(e.message.contains("not a valid header name"), "{e}");
        let plain = POOL.replace("balance = \"prefix\"\n", "");
        let e = parse(&format!("{plain}[pools.p.prefix]\nblock_chars = 64\n")).unwrap_err();
        assert!(e.message.contains("pools.p.prefix: only read with balance = \"prefix\""), "{e}");
        assert!(e.line.is_some());
    }
}
