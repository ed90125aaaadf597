//! What each worker records, without sharing anything on the hot path: one small sample
//! per measured request and a count per outcome. Workers' records are merged once, at the
//! end; histograms are built from the samples then.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use crate::scenario::{Op, Outcome};

/// When one request was due, taken up, sent and answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// When the schedule wanted it sent.
    pub due: Instant,
    /// When its worker was free to take it up.
    pub ready: Instant,
    pub sent: Instant,
    pub done: Instant,
}

impl Timing {
    /// Whether the request fell due while its worker was still busy with the one before:
    /// every connection was taken, so the wait is the server's doing.
    pub fn behind_schedule(&self) -> bool {
        self.ready > self.due
    }

    /// Latency as a client that meant to send at the due time sees it. A worker that was
    /// free early and only woke up a little late (the timer's granularity, about a
    /// millisecond) is measured from the actual send, so that slack is not blamed on the
    /// server; a worker that was busy past the due time is measured from the due time,
    /// which is what keeps coordinated omission out.
    pub fn latency(&self) -> Duration {
        let from = if self.behind_schedule() {
            self.due
        } else {
            self.sent
        };
        self.done.saturating_duration_since(from)
    }
}

/// One measured request, in 12 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// When it was due, in milliseconds after recording began.
    pub due_ms: u32,
    /// See [`Timing::latency`], in microseconds.
    pub latency_us: u32,
    /// Index into the scenario's ops.
    pub op: u8,
    pub ok: bool,
}

/// One worker's record, and after [`Record::merge`], the whole run's.
#[derive(Debug, Default, Clone)]
pub struct Record {
    pub samples: Vec<Sample>,
    /// (op index, outcome) → count.
    pub outcomes: BTreeMap<(u8, Outcome), u64>,
    /// Requests that fell due while their worker was busy (open loop).
    pub late_sends: u64,
    pub max_send_lag: Duration,
    /// The last answer's arrival, for the measured wall time.
    pub last_done: Option<Instant>,
}

impl Record {
    /// Records one request of the measured phase.
    pub fn add(&mut self, op: u8, outcome: Outcome, measure_start: Instant, timing: Timing) {
        let due_ms = timing
            .due
            .saturating_duration_since(measure_start)
            .as_millis();
        let latency_us = timing.latency().as_micros();
        self.samples.push(Sample {
            due_ms: u32::try_from(due_ms).unwrap_or(u32::MAX),
            latency_us: u32::try_from(latency_us).unwrap_or(u32::MAX),
            op,
            ok: outcome.is_ok(),
        });
        *self.outcomes.entry((op, outcome)).or_default() += 1;
        if timing.behind_schedule() {
            self.late_sends += 1;
        }
        let lag = timing.sent.saturating_duration_since(timing.due);
        self.max_send_lag = self.max_send_lag.max(lag);
        self.last_done = self.last_done.max(Some(timing.done));
    }

    pub fn merge(mut self, other: Self) -> Self {
        self.samples.extend(other.samples);
        for (key, count) in other.outcomes {
            *self.outcomes.entry(key).or_default() += count;
        }
        self.late_sends += other.late_sends;
        self.max_send_lag = self.max_send_lag.max(other.max_send_lag);
        self.last_done = self.last_done.max(other.last_done);
        self
    }

    pub fn requests(&self) -> u64 {
        self.outcomes.values().sum()
    }

    pub fn errors(&self) -> u64 {
        self.outcomes
            .iter()
            .filter(|((_, outcome), _)| !outcome.is_ok())
            .map(|(_, count)| count)
            .sum()
    }

    /// Errors by outcome key, all ops together.
    pub fn errors_by_kind(&self) -> BTreeMap<String, u64> {
        errors_by_kind(self.outcomes.iter().map(|((_, o), n)| (*o, *n)))
    }

    /// Errors by outcome key for one op.
    pub fn op_errors_by_kind(&self, op: u8) -> BTreeMap<String, u64> {
        errors_by_kind(
            self.outcomes
                .iter()
                .filter(|((o, _), _)| *o == op)
                .map(|((_, outcome), n)| (*outcome, *n)),
        )
    }
}

fn errors_by_kind(outcomes: impl Iterator<Item = (Outcome, u64)>) -> BTreeMap<String, u64> {
    let mut errors = BTreeMap::new();
    for (outcome, count) in outcomes.filter(|(o, _)| !o.is_ok()) {
        *errors.entry(outcome.key()).or_default() += count;
    }
    errors
}

/// Live counters for the progress line (all requests, warm-up included).
#[derive(Debug, Default)]
pub struct Live {
    pub sent: AtomicU64,
    pub measured: AtomicU64,
    pub errors: AtomicU64,
}

impl Live {
    pub fn count(&self, measured: bool, ok: bool) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        if measured {
            self.measured.fetch_add(1, Ordering::Relaxed);
            if !ok {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Which op index a scenario's op has in the record.
pub fn op_index(ops: &[Op], op: Op) -> u8 {
    ops.iter()
        .position(|o| *o == op)
        .and_then(|i| u8::try_from(i).ok())
        .unwrap_or(u8::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::http::TransportError;

    #[test]
    fn records_merge_and_count_errors_by_kind() {
        let start = Instant::now();
        let ms = |n| start + Duration::from_millis(n);
        let at = |due, ready, sent, done| Timing {
            due: ms(due),
            ready: ms(ready),
            sent: ms(sent),
            done: ms(done),
        };
        let mut a = Record::default();
        a.add(0, Outcome::Ok, start, at(10, 5, 10, 15));
        // Fell due while the worker was busy: late, measured from the due time.
        a.add(0, Outcome::Status(429), start, at(20, 25, 25, 26));
        let mut b = Record::default();
        // Free early, woken 2 ms late by the timer: measured from the send.
        b.add(1, Outcome::Ok, start, at(30, 1, 32, 33));
        b.add(
            1,
            Outcome::Transport(TransportError::Timeout),
            start,
            at(40, 40, 40, 50),
        );
        let all = a.merge(b);
        assert_eq!(all.requests(), 4);
        assert_eq!(all.errors(), 2);
        assert_eq!(all.late_sends, 1);
        assert_eq!(all.max_send_lag, Duration::from_millis(5));
        assert_eq!(all.last_done, Some(ms(50)));
        assert_eq!(
            all.errors_by_kind().into_iter().collect::<Vec<_>>(),
            vec![
                ("http_429".to_owned(), 1),
                ("transport_timeout".to_owned(), 1)
            ]
        );
        assert_eq!(all.op_errors_by_kind(0).len(), 1);
        assert_eq!(all.samples[1].latency_us, 6_000);
        assert_eq!(all.samples[1].due_ms, 20);
        assert_eq!(all.samples[2].latency_us, 1_000);
    }
}
