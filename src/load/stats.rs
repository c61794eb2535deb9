//! What a load run measured, and its summary: percentiles over every sample (exact, from the
//! sorted samples; a run holds at most `rate × duration` of them), rates, errors by status.

use serde::Serialize;
use std::collections::BTreeMap;

/// One finished request, times in milliseconds from its scheduled start (open loop) or its send
/// (closed loop).
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// When it was scheduled, seconds since the run began.
    pub at: f64,
    /// How late it actually left after its scheduled time, ms (open loop: the pacing error).
    pub lag_ms: f64,
    /// HTTP status, or 0 when no response came (connect error, timeout).
    pub status: u16,
    pub ttfb_ms: Option<f64>,
    /// First SSE event carrying a token.
    pub ttft_ms: Option<f64>,
    pub total_ms: f64,
    pub tokens: u64,
    /// Gaps between consecutive token events.
    pub itl_ms: Vec<f64>,
    pub error: Option<String>,
    /// The conversation turn it was (`--workload multi-turn`; 1 for the first).
    pub turn: Option<u32>,
    /// The prompt's tokens and those the engine's prefix cache held, as its `usage` says.
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
}

impl Sample {
    pub fn ok(&self) -> bool {
        self.error.is_none() && (200..300).contains(&self.status)
    }
}

/// p50/p90/p99/max of one metric.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Spread {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Spread {
    /// Nearest-rank percentiles of `values`.
    pub fn of(mut values: Vec<f64>) -> Spread {
        if values.is_empty() {
            return Spread::default();
        }
        values.sort_by(|a, b| a.total_cmp(b));
        let n = values.len();
        let rank = |p: f64| values[((p / 100.0 * n as f64).ceil() as usize).clamp(1, n) - 1];
        Spread {
            count: n,
            mean: values.iter().sum::<f64>() / n as f64,
            p50: rank(50.0),
            p90: rank(90.0),
            p99: rank(99.0),
            max: values[n - 1],
        }
    }
}

/// The report of a run (`--json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub url: String,
    pub mode: String,
    /// Requests per second asked for (open loop).
    pub target_rate: Option<f64>,
    pub duration_s: f64,
    pub sent: usize,
    pub ok: usize,
    pub errors: usize,
    /// Requests not sent because `max_inflight` requests were already open (open loop).
    pub dropped: usize,
    /// Requests actually sent per second, first to last (open loop: the pacing achieved).
    pub achieved_rate: f64,
    /// How late requests left after their scheduled times.
    pub send_lag_ms: Spread,
    /// Successful requests per second.
    pub throughput: f64,
    pub tokens_per_s: f64,
    pub ttfb_ms: Spread,
    pub ttft_ms: Spread,
    pub itl_ms: Spread,
    pub total_ms: Spread,
    pub tokens_per_request: Spread,
    /// Count by status (`0`: no response) and by error kind.
    pub statuses: BTreeMap<String, usize>,
    /// The run in (up to) ten equal windows by send time: how latency moved during it.
    pub timeline: Vec<Window>,
    /// Why the run stopped before its duration, if it did.
    pub stopped_early: Option<String>,
    /// How much of the prompts the engines' prefix caches held, when responses said so.
    pub prefix_cache: Option<PrefixCache>,
    /// The same, from the engines' own counters (`--engine-metrics`): their prefix-cache hits
    /// over queries during the run.
    pub engine_prefix_hit_rate: Option<f64>,
}

/// Prompt tokens the engines found cached (`usage.prompt_tokens_details.cached_tokens`).
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct PrefixCache {
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub hit_rate: f64,
    /// Over turns 2 and later only (multi-turn): what the conversation's history earned.
    pub hit_rate_later_turns: Option<f64>,
}

impl PrefixCache {
    fn of(ok: &[&Sample]) -> Option<PrefixCache> {
        let sum = |later: bool| {
            ok.iter()
                .filter(|s| !later || s.turn.is_some_and(|t| t >= 2))
                .fold((0, 0), |(p, c), s| (p + s.prompt_tokens, c + s.cached_tokens))
        };
        let (prompt_tokens, cached_tokens) = sum(false);
        if prompt_tokens == 0 {
            return None;
        }
        let (later_prompt, later_cached) = sum(true);
        Some(PrefixCache {
            prompt_tokens,
            cached_tokens,
            hit_rate: cached_tokens as f64 / prompt_tokens as f64,
            hit_rate_later_turns: (later_prompt > 0).then(|| later_cached as f64 / later_prompt as f64),
        })
    }
}

/// Requests scheduled in one window of the run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Window {
    /// Seconds since the run began.
    pub from_s: f64,
    pub to_s: f64,
    pub sent: usize,
    pub ok: usize,
    pub errors: usize,
    /// Of the successful requests (0 when none).
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub total_p50_ms: f64,
}

/// Windows this many, or one per second for shorter runs.
const WINDOWS: usize = 10;

fn timeline(samples: &[Sample], elapsed: f64) -> Vec<Window> {
    let count = WINDOWS.min(elapsed.floor().max(1.0) as usize);
    let width = elapsed.max(1e-9) / count as f64;
    (0..count)
        .map(|k| {
            let (from, to) = (k as f64 * width, (k + 1) as f64 * width);
            let last = k + 1 == count;
            let inside: Vec<&Sample> = samples.iter().filter(|s| s.at >= from && (s.at < to || last)).collect();
            let ok: Vec<&&Sample> = inside.iter().filter(|s| s.ok()).collect();
            let ttft = Spread::of(ok.iter().filter_map(|s| s.ttft_ms).collect());
            Window {
                from_s: from,
                to_s: to,
                sent: inside.len(),
                ok: ok.len(),
                errors: inside.len() - ok.len(),
                ttft_p50_ms: ttft.p50,
                ttft_p99_ms: ttft.p99,
                total_p50_ms: Spread::of(ok.iter().map(|s| s.total_ms).collect()).p50,
            }
        })
        .collect()
}

impl Report {
    pub fn build(
        url: &str,
        mode: String,
        target_rate: Option<f64>,
        elapsed: f64,
        samples: &[Sample],
        dropped: usize,
    ) -> Report {
        let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok()).collect();
        let mut statuses = BTreeMap::new();
        for s in samples {
            let key = match &s.error {
                Some(e) => format!("error: {e}"),
                None => s.status.to_string(),
            };
            *statuses.entry(key).or_insert(0) += 1;
        }
        let tokens: u64 = ok.iter().map(|s| s.tokens).sum();
        let sent: Vec<f64> = samples.iter().map(|s| s.at + s.lag_ms / 1000.0).collect();
        let (first, last) = (sent.iter().copied().fold(f64::MAX, f64::min), sent.iter().copied().fold(0.0, f64::max));
        Report {
            url: url.to_string(),
            mode,
            target_rate,
            duration_s: elapsed,
            sent: samples.len(),
            ok: ok.len(),
            errors: samples.len() - ok.len(),
            dropped,
            achieved_rate: if last > first { (samples.len() - 1) as f64 / (last - first) } else { 0.0 },
            send_lag_ms: Spread::of(samples.iter().map(|s| s.lag_ms).collect()),
            throughput: ok.len() as f64 / elapsed.max(1e-9),
            tokens_per_s: tokens as f64 / elapsed.max(1e-9),
            ttfb_ms: Spread::of(ok.iter().filter_map(|s| s.ttfb_ms).collect()),
            ttft_ms: Spread::of(ok.iter().filter_map(|s| s.ttft_ms).collect()),
            itl_ms: Spread::of(ok.iter().flat_map(|s| s.itl_ms.iter().copied()).collect()),
            total_ms: Spread::of(ok.iter().map(|s| s.total_ms).collect()),
            tokens_per_request: Spread::of(ok.iter().map(|s| s.tokens as f64).collect()),
            statuses,
            timeline: timeline(samples, elapsed),
            stopped_early: None,
            prefix_cache: PrefixCache::of(&ok),
            engine_prefix_hit_rate: None,
        }
    }

    /// The final table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{} {} for {:.1}s: {} sent, {} ok, {} errors, {} dropped\n",
            self.mode, self.url, self.duration_s, self.sent, self.ok, self.errors, self.dropped
        );
        if let Some(r) = self.target_rate {
            out += &format!(
                "rate: asked {r:.1}/s, sent {:.1}/s (send lag p99 {:.2} ms)\n",
                self.achieved_rate, self.send_lag_ms.p99
            );
        }
        out += &format!("throughput: {:.1} req/s, {:.1} tokens/s\n\n", self.throughput, self.tokens_per_s);
        out += &format!("{:<16} {:>8} {:>10} {:>10} {:>10} {:>10}\n", "metric", "count", "p50", "p90", "p99", "max");
        for (name, s) in [
            ("ttfb ms", self.ttfb_ms),
            ("ttft ms", self.ttft_ms),
            ("itl ms", self.itl_ms),
            ("total ms", self.total_ms),
            ("tokens/request", self.tokens_per_request),
        ] {
            // A metric with no samples (say, time to first token without `--stream`) shows dashes,
            // not zeros that read as measurements.
            if s.count == 0 {
                out += &format!("{name:<16} {:>8} {:>10} {:>10} {:>10} {:>10}\n", 0, "-", "-", "-", "-");
            } else {
                out += &format!(
                    "{name:<16} {:>8} {:>10.2} {:>10.2} {:>10.2} {:>10.2}\n",
                    s.count, s.p50, s.p90, s.p99, s.max
                );
            }
        }
        if let Some(p) = &self.prefix_cache {
            out += &format!("prefix cache: {:.1}% of {} prompt tokens cached", 100.0 * p.hit_rate, p.prompt_tokens);
            if let Some(later) = p.hit_rate_later_turns {
                out += &format!(" ({:.1}% on turns 2 and later)", 100.0 * later);
            }
            out.push('\n');
        }
        if let Some(rate) = self.engine_prefix_hit_rate {
            out += &format!("engines' prefix-cache hit rate (their /metrics): {:.1}%\n", 100.0 * rate);
        }
        out += "\nstatus:";
        for (k, v) in &self.statuses {
            out += &format!(" {k}={v}");
        }
        out.push('\n');
        if self.timeline.len() > 1 {
            out += &format!(
                "\n{:<14} {:>6} {:>6} {:>6} {:>12} {:>12}\n",
                "window s", "sent", "ok", "errors", "ttft p50 ms", "ttft p99 ms"
            );
            for w in &self.timeline {
                let (p50, p99) = match w.ok {
                    0 => ("-".to_string(), "-".to_string()),
                    _ => (format!("{:.0}", w.ttft_p50_ms), format!("{:.0}", w.ttft_p99_ms)),
                };
                let span = format!("{:.0}-{:.0}", w.from_s, w.to_s);
                out += &format!("{span:<14} {:>6} {:>6} {:>6} {p50:>12} {p99:>12}\n", w.sent, w.ok, w.errors);
            }
        }
        if let Some(why) = &self.stopped_early {
            out += &format!("\nstopped early: {why}\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = Spread::of((1..=100).map(f64::from).rev().collect());
        assert_eq!((s.p50, s.p90, s.p99, s.max, s.count), (50.0, 90.0, 99.0, 100.0, 100));
        assert_eq!(s.mean, 50.5);
        let one = Spread::of(vec![7.0]);
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
        assert_eq!(Spread::of(vec![]), Spread::default());
    }

    #[test]
    fn report_counts_errors_by_status_and_tokens() {
        let ok = Sample { at: 0.0, status: 200, total_ms: 10.0, tokens: 5, ..Default::default() };
        let bad = Sample { at: 1.0, status: 503, total_ms: 1.0, ..Default::default() };
        let lost = Sample { at: 2.0, error: Some("connect".into()), ..Default::default() };
        let r = Report::build("u", "open".into(), Some(1.0), 2.0, &[ok, bad, lost], 0);
        assert_eq!((r.sent, r.ok, r.errors), (3, 1, 2));
        assert_eq!(r.statuses["503"], 1);
        assert_eq!(r.statuses["error: connect"], 1);
        assert_eq!(r.tokens_per_s, 2.5);
        assert_eq!(r.achieved_rate, 1.0);
        let table = r.table();
        assert!(table.contains("503=1"));
        let ttft = table.lines().find(|l| l.starts_with("ttft ms")).unwrap();
        assert_eq!(
            ttft.split_whitespace().skip(2).collect::<Vec<_>>(),
            ["0", "-", "-", "-", "-"],
            "no samples: dashes"
        );
        let total = table.lines().find(|l| l.starts_with("total ms")).unwrap();
        assert!(total.contains("10.00"), "{total}");
    }

    #[test]
    fn the_timeline_shows_latency_moving_during_the_run() {
        let at = |t: f64, ttft: f64| Sample {
            at: t,
            status: 200,
            ttft_ms: Some(ttft),
            total_ms: ttft + 100.0,
            ..Default::default()
        };
        let samples: Vec<Sample> = (0..100).map(|i| at(i as f64 / 10.0, if i < 50 { 900.0 } else { 200.0 })).collect();
        let r = Report::build("u", "open".into(), Some(10.0), 10.0, &samples, 0);
        assert_eq!(r.timeline.len(), 10);
        assert_eq!(r.timeline.iter().map(|w| w.sent).sum::<usize>(), 100);
        assert_eq!(r.timeline[0].ttft_p50_ms, 900.0);
        assert_eq!(r.timeline[9].ttft_p50_ms, 200.0);
        assert!(r.table().contains("window s"));
        // A short run has one window per second, and none is printed for one.
        assert_eq!(Report::build("u", "open".into(), None, 0.5, &samples[..3], 0).timeline.len(), 1);
    }
}
