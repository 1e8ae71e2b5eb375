//! A small progress bar for long commands: drawn on stderr only when it is a terminal
//! and `--quiet` is not given, at most 10 times a second, with a smoothed rate
//! (exponential moving average) and an ETA. Written here rather than pulled in as a
//! dependency because this is all the tool needs.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use crate::output::human_size;

const WIDTH: usize = 30;
const TICK: Duration = Duration::from_millis(100);

/// A progress bar over `total` bytes of work.
pub struct Progress {
    label: &'static str,
    total: u64,
    done: u64,
    enabled: bool,
    start: Instant,
    last_draw: Instant,
    last_done: u64,
    rate: f64,
}

impl Progress {
    /// A bar that draws only if `show` and stderr is a terminal.
    pub fn new(label: &'static str, total: u64, show: bool) -> Progress {
        let now = Instant::now();
        Progress {
            label,
            total,
            done: 0,
            enabled: show && std::io::stderr().is_terminal(),
            start: now,
            last_draw: now,
            last_done: 0,
            rate: 0.0,
        }
    }

    /// Advances by `n` bytes.
    pub fn add(&mut self, n: u64) {
        self.set(self.done.saturating_add(n));
    }

    /// Sets the bytes done.
    pub fn set(&mut self, done: u64) {
        self.done = done.min(self.total);
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        let dt = now.duration_since(self.last_draw);
        if dt < TICK {
            return;
        }
        let inst = (self.done - self.last_done.min(self.done)) as f64 / dt.as_secs_f64();
        self.rate = if self.rate == 0.0 {
            inst
        } else {
            0.3 * inst + 0.7 * self.rate
        };
        self.last_draw = now;
        self.last_done = self.done;
        self.draw();
    }

    fn draw(&self) {
        let frac = if self.total == 0 {
            1.0
        } else {
            self.done as f64 / self.total as f64
        };
        let filled = ((frac * WIDTH as f64) as usize).min(WIDTH);
        let eta = if self.rate > 0.0 {
            let secs = (self.total - self.done) as f64 / self.rate;
            format!("ETA {}", fmt_secs(secs as u64))
        } else {
            "ETA --".into()
        };
        let _ = write!(
            std::io::stderr(),
            "\r{} [{}{}] {:3.0}% {}/s {}   ",
            self.label,
            "#".repeat(filled),
            " ".repeat(WIDTH - filled),
            frac * 100.0,
            human_size(self.rate as u64),
            eta
        );
    }

    /// Clears the bar (call when done).
    pub fn finish(&mut self) {
        if self.enabled && self.start.elapsed() >= TICK {
            let _ = write!(std::io::stderr(), "\r{}\r", " ".repeat(WIDTH + 60));
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
        self.enabled = false;
    }
}

fn fmt_secs(s: u64) -> String {
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}
