//! When each request is due, and when the run ends.
//!
//! Open loop: request *i* is due at `start + i / rate`, whatever happened to the requests
//! before it. Its latency is measured from that due time, so when the server stalls (or
//! every connection is busy) the waiting counts against the server, as it would for the
//! clients it keeps waiting: no coordinated omission.
//!
//! Closed loop: each worker sends its next request as soon as its last answer arrives.
//!
//! Both: requests due during the warm-up are sent but not recorded; the run ends after
//! `duration` (counted from the end of the warm-up) or after `requests` recorded
//! requests, whichever comes first.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// How requests are paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// As fast as `concurrency` workers go.
    Closed,
    /// `rate` requests per second, spread evenly.
    Open { rate: f64 },
}

/// What a run sends and for how long.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    pub pace: Pace,
    pub warmup: Duration,
    /// Measured time, after the warm-up.
    pub duration: Option<Duration>,
    /// Measured requests, after the warm-up.
    pub requests: Option<u64>,
}

/// One request to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// When it should be sent; latency is measured from here.
    pub due: Instant,
    /// False during the warm-up.
    pub measured: bool,
}

/// The shared schedule every worker takes its tickets from.
#[derive(Debug)]
pub struct Schedule {
    plan: Plan,
    start: Instant,
    issued: AtomicU64,
    measured_issued: AtomicU64,
}

impl Schedule {
    pub fn new(plan: Plan, start: Instant) -> Self {
        Self {
            plan,
            start,
            issued: AtomicU64::new(0),
            measured_issued: AtomicU64::new(0),
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// When recording begins.
    pub fn measure_start(&self) -> Instant {
        self.start + self.plan.warmup
    }

    /// When the last request may be due, if the run is bounded in time.
    pub fn measure_end(&self) -> Option<Instant> {
        self.plan.duration.map(|d| self.measure_start() + d)
    }

    /// The next request to send, or `None` when the run is over. `now` matters only for
    /// the closed loop.
    pub fn next(&self, now: Instant) -> Option<Ticket> {
        match self.plan.pace {
            Pace::Open { rate } => {
                let index = self.issued.fetch_add(1, Ordering::Relaxed);
                let (offset, measured) = open_ticket(index, rate, &self.plan)?;
                Some(Ticket {
                    due: self.start + offset,
                    measured,
                })
            }
            Pace::Closed => {
                if now < self.measure_start() {
                    return Some(Ticket {
                        due: now,
                        measured: false,
                    });
                }
                if self.measure_end().is_some_and(|end| now >= end) {
                    return None;
                }
                if let Some(limit) = self.plan.requests {
                    let taken = self.measured_issued.fetch_add(1, Ordering::Relaxed);
                    if taken >= limit {
                        return None;
                    }
                }
                Some(Ticket {
                    due: now,
                    measured: true,
                })
            }
        }
    }
}

/// Open-loop ticket `index`: its offset from the start and whether it is recorded, or
/// `None` past the end of the run.
pub fn open_ticket(index: u64, rate: f64, plan: &Plan) -> Option<(Duration, bool)> {
    let first_measured = first_measured_ticket(rate, plan.warmup);
    let offset = Duration::from_secs_f64(index as f64 / rate);
    if let Some(duration) = plan.duration
        && offset >= plan.warmup + duration
    {
        return None;
    }
    if let Some(limit) = plan.requests
        && index >= first_measured.saturating_add(limit)
    {
        return None;
    }
    Some((offset, index >= first_measured))
}

/// The first ticket due at or after the end of the warm-up.
fn first_measured_ticket(rate: f64, warmup: Duration) -> u64 {
    // Rounded to the microsecond first, so 0.5 s at 1000/s is ticket 500, not 501.
    let exact = (warmup.as_secs_f64() * rate * 1e6).round() / 1e6;
    exact.ceil() as u64
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn open(rate: f64, warmup_ms: u64, duration_ms: Option<u64>, requests: Option<u64>) -> Plan {
        Plan {
            pace: Pace::Open { rate },
            warmup: Duration::from_millis(warmup_ms),
            duration: duration_ms.map(Duration::from_millis),
            requests,
        }
    }

    fn tickets(rate: f64, plan: &Plan) -> Vec<(Duration, bool)> {
        (0..)
            .map_while(|i| open_ticket(i, rate, plan))
            .take(1_000_000)
            .collect()
    }

    #[test]
    fn open_loop_tickets_are_evenly_spaced_from_the_start() {
        let plan = open(200.0, 0, Some(1000), None);
        let all = tickets(200.0, &plan);
        assert_eq!(all.len(), 200);
        for (i, (offset, measured)) in all.iter().enumerate() {
            assert!(measured);
            let expected = i as f64 * 0.005;
            assert!((offset.as_secs_f64() - expected).abs() < 1e-9, "{i}");
        }
    }

    #[test]
    fn open_loop_warmup_is_sent_but_not_recorded() {
        let plan = open(100.0, 1000, Some(2000), None);
        let all = tickets(100.0, &plan);
        assert_eq!(all.len(), 300);
        assert_eq!(all.iter().filter(|(_, m)| !m).count(), 100);
        assert!(all[..100].iter().all(|(o, m)| !m && *o < plan.warmup));
        assert!(all[100..].iter().all(|(o, m)| *m && *o >= plan.warmup));
    }

    #[test]
    fn open_loop_request_bound_counts_measured_requests_only() {
        let plan = open(1000.0, 500, None, Some(10));
        let all = tickets(1000.0, &plan);
        assert_eq!(all.len(), 510);
        assert_eq!(all.iter().filter(|(_, m)| *m).count(), 10);
        // Whichever bound comes first ends the run.
        let plan = open(1000.0, 0, Some(5), Some(100));
        assert_eq!(tickets(1000.0, &plan).len(), 5);
    }

    #[test]
    fn the_schedule_hands_out_due_times_from_its_start() {
        let start = Instant::now();
        let schedule = Schedule::new(open(10.0, 0, Some(1000), None), start);
        let due: Vec<_> = (0..)
            .map_while(|_| schedule.next(start))
            .map(|t| t.due - start)
            .collect();
        assert_eq!(due.len(), 10);
        assert_eq!(due[3], Duration::from_millis(300));
    }

    #[test]
    fn closed_loop_follows_the_clock_and_the_request_bound() {
        let start = Instant::now();
        let plan = Plan {
            pace: Pace::Closed,
            warmup: Duration::from_secs(1),
            duration: Some(Duration::from_secs(2)),
            requests: Some(3),
        };
        let schedule = Schedule::new(plan, start);
        let warm = schedule.next(start).unwrap();
        assert!(!warm.measured);
        let during = start + Duration::from_millis(1500);
        for _ in 0..3 {
            let ticket = schedule.next(during).unwrap();
            assert!(ticket.measured);
            assert_eq!(ticket.due, during);
        }
        assert_eq!(schedule.next(during), None, "the request bound is reached");

        let schedule = Schedule::new(
            Plan {
                requests: None,
                ..plan
            },
            start,
        );
        assert!(schedule.next(start + Duration::from_millis(2999)).is_some());
        assert_eq!(schedule.next(start + Duration::from_secs(3)), None);
    }
}
