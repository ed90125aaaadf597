//! The live progress line on stderr, redrawn five times a second while a run lasts, only
//! when stderr is a terminal (so logs and pipes stay clean).

use std::{
    io::{IsTerminal as _, Write as _},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio::{sync::oneshot, task::JoinHandle};

use crate::record::Live;

const WIDTH: usize = 30;

/// What the line measures progress against.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub measure_start: Instant,
    pub warmup: Duration,
    pub duration: Option<Duration>,
    pub requests: Option<u64>,
}

/// A running progress line; [`Progress::finish`] erases it.
#[derive(Debug)]
pub struct Progress {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts drawing, if stderr is a terminal.
    pub fn start(live: Arc<Live>, bounds: Bounds) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self {
                stop: None,
                task: None,
            };
        }
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => draw(&line(&live, &bounds, Instant::now())),
                }
            }
            draw("");
        });
        Self {
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn finish(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

fn draw(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "\r\x1b[2K{text}");
    let _ = err.flush();
}

/// The text of the line at `now`.
pub fn line(live: &Live, bounds: &Bounds, now: Instant) -> String {
    let measured = live.measured.load(Ordering::Relaxed);
    let errors = live.errors.load(Ordering::Relaxed);
    if now < bounds.measure_start {
        let left = bounds.measure_start - now;
        let done = bounds.warmup.saturating_sub(left);
        return format!(
            "warm-up {:.1}/{:.1} s  {} requests sent",
            done.as_secs_f64(),
            bounds.warmup.as_secs_f64(),
            live.sent.load(Ordering::Relaxed)
        );
    }
    let elapsed = now - bounds.measure_start;
    let by_time = bounds
        .duration
        .map(|d| elapsed.as_secs_f64() / d.as_secs_f64().max(1e-9));
    let by_count = bounds.requests.map(|n| measured as f64 / n.max(1) as f64);
    let fraction = match (by_time, by_count) {
        (Some(t), Some(c)) => t.max(c),
        (Some(f), None) | (None, Some(f)) => f,
        (None, None) => 0.0,
    }
    .clamp(0.0, 1.0);
    let filled = (fraction * WIDTH as f64).round() as usize;
    let rate = measured as f64 / elapsed.as_secs_f64().max(1e-3);
    format!(
        "[{}{}] {:>3.0}%  {:.1} s  {} req  {:.0}/s  {} errors",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        fraction * 100.0,
        elapsed.as_secs_f64(),
        measured,
        rate,
        errors
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_line_shows_warmup_then_progress() {
        let start = Instant::now();
        let live = Live::default();
        let bounds = Bounds {
            measure_start: start + Duration::from_secs(2),
            warmup: Duration::from_secs(2),
            duration: Some(Duration::from_secs(10)),
            requests: None,
        };
        live.count(false, true);
        let text = line(&live, &bounds, start + Duration::from_secs(1));
        assert!(
            text.starts_with("warm-up 1.0/2.0 s  1 requests sent"),
            "{text}"
        );
        for _ in 0..100 {
            live.count(true, true);
        }
        live.count(true, false);
        let text = line(&live, &bounds, start + Duration::from_secs(7));
        assert!(text.contains(" 50%"), "{text}");
        assert!(text.contains("101 req  20/s  1 errors"), "{text}");
    }
}
