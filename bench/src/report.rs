//! From a run's record to what people and machines read: throughput, errors by kind,
//! latency percentiles from an HDR histogram (per op and overall), and latency per second.
//!
//! Latency figures cover successful answers only; failures are counted by kind beside
//! them, so a fast 404 never flatters the percentiles.

use std::{collections::BTreeMap, io::Write, time::Duration};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::record::Record;

/// Microseconds, 1 µs to 1 h, three significant digits (0.1% error).
pub fn new_histogram() -> Result<Histogram<u64>, hdrhistogram::CreationError> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
}

/// The percentiles every table and JSON shows, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    /// `None` for an empty histogram.
    pub fn of(histogram: &Histogram<u64>) -> Option<Self> {
        if histogram.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Self {
            count: histogram.len(),
            p50: ms(histogram.value_at_quantile(0.5)),
            p90: ms(histogram.value_at_quantile(0.9)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p99_9: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
            mean: histogram.mean() / 1000.0,
        })
    }
}

/// One op of a mixed scenario.
#[derive(Debug, Clone, Serialize)]
pub struct OpReport {
    pub op: &'static str,
    pub requests: u64,
    pub ok: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    pub latency_ms: Option<Latency>,
}

/// One second of the measured phase, by due time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Second {
    pub second: u32,
    pub requests: u64,
    pub ok: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

/// How the run was driven, as given on the command line.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub target: String,
    pub scenario: &'static str,
    /// `closed` or `open`.
    pub mode: &'static str,
    /// Workers, each with one connection.
    pub concurrency: usize,
    /// Requests per second (open loop).
    pub rate: Option<f64>,
    pub users: u64,
    /// The generator's runtime threads.
    pub threads: usize,
    pub warmup_s: f64,
}

/// The whole result; `--json` prints exactly this.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub run: RunInfo,
    /// From the end of the warm-up to the last answer.
    pub elapsed_s: f64,
    pub requests: u64,
    pub ok: u64,
    pub errors: u64,
    /// All answers (and failures) per second.
    pub throughput_rps: f64,
    pub ok_rps: f64,
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Successful answers, all ops together.
    pub latency_ms: Option<Latency>,
    /// Open loop: requests that fell due while every connection was busy (their wait is in
    /// their latency; many of them mean the server is past its capacity at this rate, or
    /// too few connections were allowed).
    pub late_sends: u64,
    pub max_send_lag_ms: f64,
    pub ops: Vec<OpReport>,
    pub timeline: Vec<Second>,
}

/// The report plus the histograms the plot draws.
#[derive(Debug)]
pub struct Analysis {
    pub report: Report,
    pub overall: Histogram<u64>,
    /// Per op, in the scenario's order.
    pub per_op: Vec<(&'static str, Histogram<u64>)>,
}

/// Builds the report of a merged record. `ops` are the scenario's ops in record-index
/// order; `measured` is the time from the end of the warm-up to the last answer.
pub fn analyse(
    run: RunInfo,
    ops: &[&'static str],
    record: &Record,
    measured: Duration,
) -> Result<Analysis, hdrhistogram::CreationError> {
    let mut overall = new_histogram()?;
    let mut per_op = ops
        .iter()
        .map(|name| Ok((*name, new_histogram()?)))
        .collect::<Result<Vec<_>, hdrhistogram::CreationError>>()?;
    for sample in record.samples.iter().filter(|s| s.ok) {
        let us = u64::from(sample.latency_us.max(1));
        overall.saturating_record(us);
        if let Some((_, histogram)) = per_op.get_mut(usize::from(sample.op)) {
            histogram.saturating_record(us);
        }
    }
    let elapsed_s = measured.as_secs_f64().max(1e-3);
    let requests = record.requests();
    let errors = record.errors();
    let ok = requests - errors;
    let op_reports = per_op
        .iter()
        .enumerate()
        .map(|(index, (name, histogram))| {
            let index = u8::try_from(index).unwrap_or(u8::MAX);
            let requests: u64 = record
                .outcomes
                .iter()
                .filter(|((op, _), _)| *op == index)
                .map(|(_, n)| n)
                .sum();
            let errors_by_kind = record.op_errors_by_kind(index);
            OpReport {
                op: name,
                requests,
                ok: requests - errors_by_kind.values().sum::<u64>(),
                errors_by_kind,
                latency_ms: Latency::of(histogram),
            }
        })
        .collect();
    let report = Report {
        run,
        elapsed_s,
        requests,
        ok,
        errors,
        throughput_rps: requests as f64 / elapsed_s,
        ok_rps: ok as f64 / elapsed_s,
        errors_by_kind: record.errors_by_kind(),
        latency_ms: Latency::of(&overall),
        late_sends: record.late_sends,
        max_send_lag_ms: record.max_send_lag.as_secs_f64() * 1000.0,
        ops: op_reports,
        timeline: timeline(record),
    };
    Ok(Analysis {
        report,
        overall,
        per_op,
    })
}

/// Requests and successful-answer latency per second of due time (exact nearest-rank
/// percentiles: a second holds few enough samples to sort).
pub fn timeline(record: &Record) -> Vec<Second> {
    let Some(last) = record.samples.iter().map(|s| s.due_ms / 1000).max() else {
        return Vec::new();
    };
    let mut seconds: Vec<(u64, Vec<u32>)> = vec![(0, Vec::new()); last as usize + 1];
    for sample in &record.samples {
        let (requests, latencies) = &mut seconds[(sample.due_ms / 1000) as usize];
        *requests += 1;
        if sample.ok {
            latencies.push(sample.latency_us);
        }
    }
    seconds
        .into_iter()
        .enumerate()
        .map(|(second, (requests, mut latencies))| {
            latencies.sort_unstable();
            let at = |q: f64| nearest_rank(&latencies, q).map(|us| f64::from(us) / 1000.0);
            Second {
                second: u32::try_from(second).unwrap_or(u32::MAX),
                requests,
                ok: latencies.len() as u64,
                p50_ms: at(0.5),
                p99_ms: at(0.99),
                max_ms: latencies.last().map(|us| f64::from(*us) / 1000.0),
            }
        })
        .collect()
}

/// The nearest-rank `q` quantile of sorted values.
fn nearest_rank(sorted: &[u32], q: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// `12345` → `12,345`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The table for people.
pub fn write_table(report: &Report, out: &mut impl Write) -> std::io::Result<()> {
    let run = &report.run;
    let mode = match run.rate {
        Some(rate) => format!(
            "open loop at {rate}/s over at most {} connections",
            run.concurrency
        ),
        None => format!("closed loop, {} connections", run.concurrency),
    };
    writeln!(out)?;
    writeln!(out, "scenario   {} against {}", run.scenario, run.target)?;
    writeln!(
        out,
        "mode       {mode}; {:.1} s measured after {:.1} s warm-up; {} user(s)",
        report.elapsed_s, run.warmup_s, run.users
    )?;
    writeln!(
        out,
        "requests   {} (ok {}, errors {})",
        grouped(report.requests),
        grouped(report.ok),
        grouped(report.errors)
    )?;
    writeln!(
        out,
        "throughput {:.1} req/s (ok {:.1}/s)",
        report.throughput_rps, report.ok_rps
    )?;
    if run.rate.is_some() {
        writeln!(
            out,
            "late sends {} fell due with every connection busy (max lag {:.1} ms)",
            grouped(report.late_sends),
            report.max_send_lag_ms
        )?;
    }
    if !report.errors_by_kind.is_empty() {
        writeln!(out, "\nerrors")?;
        for (kind, count) in &report.errors_by_kind {
            writeln!(out, "  {kind:<22}{:>12}", grouped(*count))?;
        }
    }
    writeln!(out, "\nlatency of successful answers, ms")?;
    writeln!(
        out,
        "  {:<12}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}",
        "op", "count", "p50", "p90", "p99", "p99.9", "max", "mean"
    )?;
    let row = |out: &mut dyn Write, name: &str, latency: Option<&Latency>| match latency {
        Some(l) => writeln!(
            out,
            "  {name:<12}{:>10}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10.2}",
            grouped(l.count),
            l.p50,
            l.p90,
            l.p99,
            l.p99_9,
            l.max,
            l.mean
        ),
        None => writeln!(out, "  {name:<12}{:>10}  (no successful answer)", 0),
    };
    if report.ops.len() > 1 {
        for op in &report.ops {
            row(out, op.op, op.latency_ms.as_ref())?;
        }
    }
    row(out, "all", report.latency_ms.as_ref())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::time::Instant;

    use super::*;
    use crate::{http::TransportError, record::Timing, scenario::Outcome};

    fn run_info() -> RunInfo {
        RunInfo {
            target: "http://127.0.0.1:8080".to_owned(),
            scenario: "login",
            mode: "closed",
            concurrency: 4,
            rate: None,
            users: 10,
            threads: 1,
            warmup_s: 0.0,
        }
    }

    fn timing(due: Instant, done: Instant) -> Timing {
        Timing {
            due,
            ready: due,
            sent: due,
            done,
        }
    }

    /// 1,000 successful requests taking 1..=1000 ms, one due every 10 ms, and ten 503s.
    fn uniform_record() -> Record {
        let start = Instant::now();
        let mut record = Record::default();
        for i in 1..=1000u64 {
            let due = start + Duration::from_millis(10 * (i - 1));
            let done = due + Duration::from_millis(i);
            record.add(0, Outcome::Ok, start, timing(due, done));
        }
        for _ in 0..10 {
            record.add(0, Outcome::Status(503), start, timing(start, start));
        }
        record.add(
            0,
            Outcome::Transport(TransportError::Connect),
            start,
            timing(start, start),
        );
        record
    }

    #[test]
    fn percentiles_come_from_successful_answers() {
        let record = uniform_record();
        let analysis = analyse(run_info(), &["login"], &record, Duration::from_secs(10)).unwrap();
        let report = &analysis.report;
        assert_eq!(
            (report.requests, report.ok, report.errors),
            (1011, 1000, 11)
        );
        assert!((report.throughput_rps - 101.1).abs() < 1e-9);
        assert!((report.ok_rps - 100.0).abs() < 1e-9);
        let l = report.latency_ms.unwrap();
        assert_eq!(l.count, 1000);
        // Three significant digits: within 0.1% of the exact values.
        for (got, want) in [
            (l.p50, 500.0),
            (l.p90, 900.0),
            (l.p99, 990.0),
            (l.p99_9, 999.0),
            (l.max, 1000.0),
        ] {
            assert!((got - want).abs() <= want * 0.001, "{got} vs {want}");
        }
        assert!((l.mean - 500.5).abs() < 1.0);
        assert_eq!(report.errors_by_kind.get("http_503"), Some(&10));
        assert_eq!(report.errors_by_kind.get("transport_connect"), Some(&1));
        assert_eq!(report.ops[0].ok, 1000);
    }

    #[test]
    fn the_timeline_has_one_row_per_second() {
        let record = uniform_record();
        let seconds = timeline(&record);
        assert_eq!(seconds.len(), 10);
        // Second 0 holds the 100 requests due in its first second (1..=100 ms) and 11 errors.
        assert_eq!((seconds[0].requests, seconds[0].ok), (111, 100));
        assert_eq!(seconds[0].p50_ms, Some(50.0));
        assert_eq!(seconds[0].p99_ms, Some(99.0));
        assert_eq!(seconds[9].max_ms, Some(1000.0));
        assert_eq!(nearest_rank(&[], 0.5), None);
        assert_eq!(nearest_rank(&[7], 0.0), Some(7));
    }

    #[test]
    fn the_table_and_json_carry_the_figures() {
        let analysis = analyse(
            run_info(),
            &["login"],
            &uniform_record(),
            Duration::from_secs(10),
        )
        .unwrap();
        let mut table = Vec::new();
        write_table(&analysis.report, &mut table).unwrap();
        let table = String::from_utf8(table).unwrap();
        assert!(
            table.contains("requests   1,011 (ok 1,000, errors 11)"),
            "{table}"
        );
        assert!(table.contains("http_503"), "{table}");
        let json: serde_json::Value = serde_json::to_value(&analysis.report).unwrap();
        assert_eq!(json["scenario"], "login");
        assert_eq!(json["requests"], 1011);
        assert_eq!(json["latency_ms"]["count"], 1000);
        assert_eq!(json["timeline"].as_array().unwrap().len(), 10);
        assert_eq!(grouped(1_234_567), "1,234,567");
        assert_eq!(grouped(999), "999");
    }
}
