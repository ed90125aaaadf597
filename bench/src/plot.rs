//! The PNG for people: latency by percentile (the HDR curve, one line per op) above
//! latency and throughput over time.
//!
//! Text is drawn with a font compiled into the binary (`assets/GoRegular-subset.ttf`: Go
//! Regular cut down to ASCII, 8 KiB, BSD-licensed; see `assets/README.md`), so plotting
//! needs no system font library.

use std::{fs::File, io::BufWriter, path::Path, sync::Once};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use plotters::{
    prelude::*,
    style::{FontStyle, register_font},
};

use crate::report::Analysis;

const FONT: &[u8] = include_bytes!("../assets/GoRegular-subset.ttf");
const FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (1200, 1000);
/// The curve's right end: the 99.999th percentile (or the last sample, if fewer).
const MAX_INVERSE_TAIL: f64 = 1e5;

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];
const GREY: RGBColor = RGBColor(120, 120, 120);

fn register() -> anyhow::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            if register_font(FAMILY, style, FONT).is_err() {
                result = Err(anyhow::anyhow!("the built-in font is unreadable"));
            }
        }
    });
    result
}

/// Writes the PNG of `analysis` to `path`.
pub fn write_png(analysis: &Analysis, path: &Path) -> anyhow::Result<()> {
    register()?;
    let (width, height) = SIZE;
    let mut pixels = vec![0u8; (width * height * 3) as usize];
    draw(analysis, &mut pixels)?;
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&pixels)?;
    writer.finish()?;
    Ok(())
}

fn draw(analysis: &Analysis, pixels: &mut [u8]) -> anyhow::Result<()> {
    let report = &analysis.report;
    let root = BitMapBackend::with_buffer(pixels, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mode = match report.run.rate {
        Some(rate) => format!("open loop {rate}/s"),
        None => format!("closed loop x{}", report.run.concurrency),
    };
    let title = format!(
        "{} - {} - {mode} - {:.0} req/s, {} errors",
        report.run.scenario, report.run.target, report.throughput_rps, report.errors
    );
    let root = root.titled(&title, (FAMILY, 24))?;
    let (upper, lower) = root.split_vertically(SIZE.1 / 2);
    draw_percentiles(analysis, &upper)?;
    draw_timeline(analysis, &lower)?;
    root.present()?;
    Ok(())
}

/// `10` → `90%`, `1000` → `99.9%`.
fn percentile_label(inverse_tail: f64) -> String {
    let percent = 100.0 * (1.0 - 1.0 / inverse_tail.max(1.0));
    let text = format!("{percent:.4}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}%")
}

/// An axis label in milliseconds with as many decimals as its size needs.
fn milliseconds(ms: f64) -> String {
    match ms {
        ms if ms == 0.0 || ms >= 10.0 => format!("{ms:.0}"),
        ms if ms >= 1.0 => format!("{ms:.1}"),
        ms if ms >= 0.1 => format!("{ms:.2}"),
        ms => format!("{ms:.3}"),
    }
}

/// The HDR curve as (1 / (1 - quantile), ms) points.
fn curve(histogram: &Histogram<u64>, x_max: f64) -> Vec<(f64, f64)> {
    histogram
        .iter_quantiles(4)
        .map(|step| {
            let tail = 1.0 - step.quantile_iterated_to();
            let x = if tail <= 1.0 / x_max {
                x_max
            } else {
                1.0 / tail
            };
            (x, step.value_iterated_to() as f64 / 1000.0)
        })
        .collect()
}

fn draw_percentiles<DB: DrawingBackend>(
    analysis: &Analysis,
    area: &DrawingArea<DB, plotters::coord::Shift>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let count = analysis.overall.len();
    let x_max = (count as f64).clamp(10.0, MAX_INVERSE_TAIL);
    let y_max = (analysis.overall.max() as f64 / 1000.0).max(0.01) * 1.1;
    let key_points: Vec<f64> = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5]
        .into_iter()
        .filter(|x| *x <= x_max)
        .collect();
    let mut chart = ChartBuilder::on(area)
        .caption("latency by percentile (successful answers)", (FAMILY, 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(
            (1.0..x_max).log_scale().with_key_points(key_points),
            0.0..y_max,
        )?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("ms")
        .x_label_formatter(&|x| percentile_label(*x))
        .y_label_formatter(&|y| milliseconds(*y))
        .label_style((FAMILY, 13))
        .draw()?;
    if count == 0 {
        return Ok(());
    }
    let mut series: Vec<(&str, &Histogram<u64>)> = Vec::new();
    if analysis.per_op.len() > 1 {
        series.extend(
            analysis
                .per_op
                .iter()
                .filter(|(_, h)| !h.is_empty())
                .map(|(name, h)| (*name, h)),
        );
    }
    series.push(("all", &analysis.overall));
    for (i, (name, histogram)) in series.into_iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let width = if name == "all" { 3 } else { 2 };
        chart
            .draw_series(LineSeries::new(
                curve(histogram, x_max),
                colour.stroke_width(width),
            ))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(width))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FAMILY, 14))
        .background_style(WHITE.mix(0.8))
        .border_style(GREY)
        .draw()?;
    Ok(())
}

fn draw_timeline<DB: DrawingBackend>(
    analysis: &Analysis,
    area: &DrawingArea<DB, plotters::coord::Shift>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let seconds = &analysis.report.timeline;
    let x_max = (seconds.len() as f64).max(1.0);
    let values = || {
        seconds
            .iter()
            .flat_map(|s| [s.p50_ms, s.p99_ms, s.max_ms])
            .flatten()
    };
    let y_min = values().fold(f64::INFINITY, f64::min);
    let y_max = values().fold(0.0, f64::max);
    let (y_min, y_max) = if y_min.is_finite() && y_max > 0.0 {
        ((y_min / 2.0).max(0.001), y_max * 2.0)
    } else {
        (0.01, 10.0)
    };
    let rps_max = seconds.iter().map(|s| s.requests).max().unwrap_or(1).max(1) as f64 * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "latency (log scale) and throughput, per second of the run",
            (FAMILY, 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .right_y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, (y_min..y_max).log_scale())?
        .set_secondary_coord(0.0..x_max, 0.0..rps_max);
    chart
        .configure_mesh()
        .x_desc("seconds after warm-up")
        .y_desc("ms")
        .y_label_formatter(&|y| milliseconds(*y))
        .label_style((FAMILY, 13))
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("requests/s")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style((FAMILY, 13))
        .draw()?;
    chart
        .draw_secondary_series(LineSeries::new(
            seconds
                .iter()
                .map(|s| (f64::from(s.second) + 0.5, s.requests as f64)),
            GREY.stroke_width(1),
        ))?
        .label("requests/s (right)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREY.stroke_width(1)));
    type Pick = fn(&crate::report::Second) -> Option<f64>;
    let lines: [(&str, Pick, RGBColor); 3] = [
        ("p50", |s| s.p50_ms, COLOURS[0]),
        ("p99", |s| s.p99_ms, COLOURS[3]),
        ("max", |s| s.max_ms, COLOURS[1]),
    ];
    for (name, pick, colour) in lines {
        chart
            .draw_series(LineSeries::new(
                seconds
                    .iter()
                    .filter_map(|s| pick(s).map(|ms| (f64::from(s.second) + 0.5, ms))),
                colour.stroke_width(2),
            ))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FAMILY, 14))
        .background_style(WHITE.mix(0.8))
        .border_style(GREY)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn percentile_labels_read_as_percentiles() {
        assert_eq!(percentile_label(1.0), "0%");
        assert_eq!(percentile_label(10.0), "90%");
        assert_eq!(percentile_label(100.0), "99%");
        assert_eq!(percentile_label(1000.0), "99.9%");
        assert_eq!(percentile_label(1e5), "99.999%");
    }

    #[test]
    fn a_run_becomes_a_png() {
        use std::time::{Duration, Instant};

        use crate::{
            record::{Record, Timing},
            report::{RunInfo, analyse},
            scenario::Outcome,
        };

        let start = Instant::now();
        let mut record = Record::default();
        for i in 0..5_000u64 {
            let due = start + Duration::from_micros(i * 1_000);
            let done = due + Duration::from_micros(200 + (i * 7919) % 3_000);
            let timing = Timing {
                due,
                ready: due,
                sent: due,
                done,
            };
            let outcome = if i % 100 == 0 {
                Outcome::Status(503)
            } else {
                Outcome::Ok
            };
            record.add(u8::from(i % 3 == 0), outcome, start, timing);
        }
        let run = RunInfo {
            target: "http://127.0.0.1:8080".to_owned(),
            scenario: "mobile-session",
            mode: "open",
            concurrency: 64,
            rate: Some(1000.0),
            users: 10,
            threads: 1,
            warmup_s: 0.0,
        };
        let analysis =
            analyse(run, &["profile", "login"], &record, Duration::from_secs(5)).unwrap();
        let dir = std::env::temp_dir().join(format!("loadgen-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.png");
        write_png(&analysis, &path).unwrap();

        let decoder = png::Decoder::new(std::io::BufReader::new(File::open(&path).unwrap()));
        let reader = decoder.read_info().unwrap();
        assert_eq!((reader.info().width, reader.info().height), SIZE);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
