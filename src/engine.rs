//! Inference engines' own load, as their Prometheus text (`/metrics`) reports it: the metric
//! names each engine kind uses for requests running, requests waiting, KV-cache usage and the
//! prefix cache, and a parser of the text exposition format that keeps only those.
//!
//! Pure: no IO, no clock. Several series of one name (one per model or per engine rank) are
//! summed (the usage ratios are averaged). A line that does not parse is skipped; the parser
//! never fails and never panics, whatever the text.

pub use crate::config::EngineKind;

/// The names each kind reports its load under.
fn names(kind: EngineKind) -> &'static Names {
    match kind {
        EngineKind::Vllm | EngineKind::Auto => &VLLM,
        EngineKind::Sglang => &SGLANG,
        EngineKind::Tgi => &TGI,
        EngineKind::LlamaCpp => &LLAMACPP,
    }
}
/// An engine kind's metric names (each may have several spellings across versions).
struct Names {
    running: &'static [&'static str],
    waiting: &'static [&'static str],
    /// KV-cache usage as a ratio in 0..=1.
    kv_usage: &'static [&'static str],
    /// Prefix-cache hits and queries (counters), or a hit rate (a gauge in 0..=1).
    prefix_hits: &'static [&'static str],
    prefix_queries: &'static [&'static str],
    hit_rate: &'static [&'static str],
}

const VLLM: Names = Names {
    running: &["vllm:num_requests_running"],
    waiting: &["vllm:num_requests_waiting"],
    kv_usage: &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
    prefix_hits: &["vllm:prefix_cache_hits_total", "vllm:prefix_cache_hits"],
    prefix_queries: &["vllm:prefix_cache_queries_total", "vllm:prefix_cache_queries"],
    hit_rate: &[],
};
const SGLANG: Names = Names {
    running: &["sglang:num_running_reqs"],
    waiting: &["sglang:num_queue_reqs"],
    kv_usage: &["sglang:token_usage"],
    prefix_hits: &[],
    prefix_queries: &[],
    hit_rate: &["sglang:cache_hit_rate"],
};
const TGI: Names = Names {
    running: &["tgi_batch_current_size"],
    waiting: &["tgi_queue_size"],
    kv_usage: &[],
    prefix_hits: &[],
    prefix_queries: &[],
    hit_rate: &[],
};
const LLAMACPP: Names = Names {
    running: &["llamacpp:requests_processing"],
    waiting: &["llamacpp:requests_deferred"],
    kv_usage: &["llamacpp:kv_cache_usage_ratio"],
    prefix_hits: &[],
    prefix_queries: &[],
    hit_rate: &[],
};

/// What one scrape read. `None`: the engine does not report it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineLoad {
    pub running: Option<f64>,
    pub waiting: Option<f64>,
    /// KV-cache usage, 0..=1.
    pub kv_usage: Option<f64>,
    /// Prefix-cache hit rate, 0..=1 (since the engine started, for counters).
    pub hit_rate: Option<f64>,
    /// Prefix-cache hits and queries since the engine started (counters; a drop means it restarted).
    pub prefix_hits: Option<f64>,
    pub prefix_queries: Option<f64>,
}

impl EngineLoad {
    /// Whether the scrape found the engine's queue at all.
    pub fn is_empty(&self) -> bool {
        self.running.is_none() && self.waiting.is_none()
    }
}

/// Reads `text` as `kind` reports it (`Auto`: vLLM's names, then SGLang's, llama.cpp's, TGI's).
pub fn read(text: &str, kind: EngineKind) -> EngineLoad {
    if kind != EngineKind::Auto {
        return read_names(text, names(kind));
    }
    for names in [&VLLM, &SGLANG, &LLAMACPP, &TGI] {
        let load = read_names(text, names);
        if !load.is_empty() {
            return load;
        }
    }
    EngineLoad::default()
}

fn read_names(text: &str, names: &Names) -> EngineLoad {
    let mut sums = [Sum::default(); 6];
    let groups =
        [names.running, names.waiting, names.kv_usage, names.prefix_hits, names.prefix_queries, names.hit_rate];
    for (name, value) in samples(text) {
        for (sum, group) in sums.iter_mut().zip(groups) {
            // The first spelling a scrape reports is the one used (versions rename metrics).
            if let Some(rank) = group.iter().position(|n| *n == name) {
                sum.add(rank, value);
            }
        }
    }
    let ratio = |s: Sum| s.mean().map(|v| v.clamp(0.0, 1.0));
    let [running, waiting, kv, hits, queries, rate] = sums;
    let hit_rate = ratio(rate).or_else(|| match (hits.total(), queries.total()) {
        (Some(h), Some(q)) if q > 0.0 => Some((h / q).clamp(0.0, 1.0)),
        _ => None,
    });
    EngineLoad {
        running: running.total(),
        waiting: waiting.total(),
        kv_usage: ratio(kv),
        hit_rate,
        prefix_hits: hits.total(),
        prefix_queries: queries.total(),
    }
}

/// The series of one name: their sum and count, for the best-ranked spelling seen.
#[derive(Debug, Clone, Copy, Default)]
struct Sum {
    rank: Option<usize>,
    total: f64,
    count: u32,
}

impl Sum {
    fn add(&mut self, rank: usize, value: f64) {
        if !value.is_finite() || value < 0.0 {
            return;
        }
        match self.rank {
            Some(r) if r < rank => return,
            Some(r) if r == rank => {}
            _ => *self = Sum { rank: Some(rank), total: 0.0, count: 0 },
        }
        self.total += value;
        self.count = self.count.saturating_add(1);
    }

    fn total(self) -> Option<f64> {
        (self.count > 0).then_some(self.total)
    }

    fn mean(self) -> Option<f64> {
        (self.count > 0).then(|| self.total / f64::from(self.count))
    }
}

/// The samples of a text exposition: `(name, value)` per line, labels and timestamps dropped,
/// comments and lines that do not parse skipped.
fn samples(text: &str) -> impl Iterator<Item = (&str, f64)> {
    text.lines().filter_map(|line| {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let name_end = line.find(|c: char| c == '{' || c.is_ascii_whitespace())?;
        let name = &line[..name_end];
        let rest = &line[name_end..];
        let rest = if rest.starts_with('{') { &rest[labels_end(rest)?..] } else { rest };
        let value = rest.split_ascii_whitespace().next()?;
        Some((name, value.parse::<f64>().ok()?))
    })
}

/// Where the label set at the front of `rest` (starting with `{`) ends, past its `}`; quoted
/// values may hold `}` and escaped quotes.
fn labels_end(rest: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in rest.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i + 1),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VLLM_TEXT: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 3.0
vllm:num_requests_running{engine="1",model_name="llama"} 2.0
vllm:num_requests_waiting{engine="0",model_name="llama"} 7.0
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="llama"} 0.7
vllm:prefix_cache_queries_total{engine="0",model_name="llama"} 400.0
vllm:prefix_cache_hits_total{engine="0",model_name="llama"} 100.0
"#;

    #[test]
    fn vllm_series_are_summed_and_ratios_averaged() {
        let load = read(VLLM_TEXT, EngineKind::Vllm);
        assert_eq!(load.running, Some(5.0));
        assert_eq!(load.waiting, Some(7.0));
        assert!((load.kv_usage.unwrap() - 0.6).abs() < 1e-9);
        assert_eq!(load.hit_rate, Some(0.25));
        assert_eq!(read(VLLM_TEXT, EngineKind::Auto), load, "auto finds vLLM's names");
    }

    #[test]
    fn each_kind_reads_its_own_names() {
        let sglang = "sglang:num_running_reqs{tp_rank=\"0\"} 4\nsglang:num_queue_reqs 9\nsglang:token_usage 0.8\nsglang:cache_hit_rate 0.4\n";
        let l = read(sglang, EngineKind::Sglang);
        assert_eq!((l.running, l.waiting, l.kv_usage, l.hit_rate), (Some(4.0), Some(9.0), Some(0.8), Some(0.4)));
        assert_eq!(read(sglang, EngineKind::Auto), l);
        let tgi = "tgi_batch_current_size 6\ntgi_queue_size 2\n";
        let l = read(tgi, EngineKind::Tgi);
        assert_eq!((l.running, l.waiting, l.kv_usage), (Some(6.0), Some(2.0), None));
        let llama =
            "llamacpp:requests_processing 1\nllamacpp:requests_deferred 3\nllamacpp:kv_cache_usage_ratio 0.25\n";
        let l = read(llama, EngineKind::LlamaCpp);
        assert_eq!((l.running, l.waiting, l.kv_usage), (Some(1.0), Some(3.0), Some(0.25)));
        assert!(read(tgi, EngineKind::Vllm).is_empty(), "another kind's names are not read");
    }

    #[test]
    fn the_older_vllm_kv_name_counts_only_when_the_newer_is_absent() {
        let old = "vllm:gpu_cache_usage_perc 0.3\nvllm:num_requests_running 1\n";
        assert_eq!(read(old, EngineKind::Vllm).kv_usage, Some(0.3));
        let both = "vllm:gpu_cache_usage_perc 0.3\nvllm:kv_cache_usage_perc 0.9\n";
        assert_eq!(read(both, EngineKind::Vllm).kv_usage, Some(0.9));
    }

    #[test]
    fn odd_lines_are_skipped_not_fatal() {
        let text = "vllm:num_requests_waiting{a=\"x}y\",b=\"q\\\"}\"} 2 1700000000000\n\
                    vllm:num_requests_waiting NaN\nvllm:num_requests_waiting -1\n\
                    vllm:num_requests_waiting{broken 5\nvllm:num_requests_waiting 3e0\ngarbage\n";
        assert_eq!(read(text, EngineKind::Vllm).waiting, Some(5.0));
        assert_eq!(EngineKind::parse("vllm"), Some(EngineKind::Vllm));
        assert_eq!(EngineKind::parse("VLLM"), None);
    }

    proptest! {
        #[test]
        fn any_text_reads_without_panicking(text in "\\PC{0,400}") {
            for kind in [EngineKind::Vllm, EngineKind::Sglang, EngineKind::Tgi, EngineKind::LlamaCpp, EngineKind::Auto] {
                let l = read(&text, kind);
                for v in [l.running, l.waiting, l.kv_usage, l.hit_rate].into_iter().flatten() {
                    prop_assert!(v.is_finite() && v >= 0.0);
                }
                prop_assert!(l.kv_usage.is_none_or(|v| v <= 1.0) && l.hit_rate.is_none_or(|v| v <= 1.0));
            }
        }
    }
}
