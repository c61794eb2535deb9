//! `--plot FILE.svg`: latency (p50, p99 of total latency, and p50 time to first token when
//! streaming) and throughput per second of the run, drawn with plotters' SVG backend.

use super::stats::{Sample, Spread};
use plotters::prelude::*;
use std::path::Path;

/// Per-second points: (second, completed in that second, p50 ms, p99 ms, p50 ttft ms) — the
/// latencies of the requests scheduled in that second (`None` when none were).
type Point = (f64, f64, Option<f64>, Option<f64>, Option<f64>);

fn series(samples: &[Sample], elapsed: f64) -> Vec<Point> {
    let seconds = elapsed.ceil().max(1.0) as usize;
    let mut completed = vec![0.0; seconds + 1];
    for s in samples.iter().filter(|s| s.ok()) {
        let done = (s.at + s.total_ms / 1000.0).floor().max(0.0) as usize;
        completed[done.min(seconds)] += 1.0;
    }
    (0..seconds)
        .map(|sec| {
            let in_sec: Vec<&Sample> =
                samples.iter().filter(|s| s.ok() && s.at >= sec as f64 && s.at < (sec + 1) as f64).collect();
            let total = Spread::of(in_sec.iter().map(|s| s.total_ms).collect());
            let ttft = Spread::of(in_sec.iter().filter_map(|s| s.ttft_ms).collect());
            let some = |v: f64, n: usize| (n > 0).then_some(v);
            (
                sec as f64,
                completed[sec],
                some(total.p50, total.count),
                some(total.p99, total.count),
                some(ttft.p50, ttft.count),
            )
        })
        .collect()
}

/// Writes the chart.
pub fn write_svg(path: &Path, title: &str, samples: &[Sample], elapsed: f64) -> Result<(), String> {
    let points = series(samples, elapsed);
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
        root.fill(&WHITE)?;
        let (top, bottom) = root.split_vertically(320);
        let x_max = points.len().max(1) as f64;
        let lat_max = points.iter().filter_map(|p| p.3).fold(1.0, f64::max) * 1.1;
        let mut lat = ChartBuilder::on(&top)
            .caption(format!("{title}: latency"), ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, 0.0..lat_max)?;
        lat.configure_mesh().x_desc("seconds (when the request was scheduled)").y_desc("ms").draw()?;
        lat.draw_series(LineSeries::new(points.iter().filter_map(|p| p.2.map(|v| (p.0, v))), &BLUE))?
            .label("p50 total")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
        lat.draw_series(LineSeries::new(points.iter().filter_map(|p| p.3.map(|v| (p.0, v))), &RED))?
            .label("p99 total")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
        if points.iter().any(|p| p.4.is_some()) {
            lat.draw_series(LineSeries::new(points.iter().filter_map(|p| p.4.map(|v| (p.0, v))), &GREEN))?
                .label("p50 time to first token")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], GREEN));
        }
        lat.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
        let rps_max = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
        let mut rps = ChartBuilder::on(&bottom)
            .caption("throughput", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, 0.0..rps_max)?;
        rps.configure_mesh().x_desc("seconds (when the response ended)").y_desc("ok responses/s").draw()?;
        rps.draw_series(LineSeries::new(points.iter().map(|p| (p.0, p.1)), &BLUE))?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_svg_with_both_charts() {
        let samples: Vec<Sample> = (0..50)
            .map(|i| Sample {
                at: i as f64 / 10.0,
                status: 200,
                total_ms: 10.0 + i as f64,
                ttft_ms: Some(5.0),
                ..Default::default()
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.svg");
        write_svg(&path, "test", &samples, 5.0).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("throughput") && svg.contains("p99 total"));
        let s = series(&samples, 5.0);
        assert_eq!(s.len(), 5);
        assert_eq!(s[0].1, 10.0, "ten responses ended in the first second");
        assert_eq!(s[0].2, Some(14.0), "p50 of 10..=19 ms: the 5th of 10 (nearest rank)");
    }
}
