//! Adaptive stream count: hill climbing on measured goodput, one decision per epoch.
//!
//! Each epoch (at least [`Config::min_epoch`], and at least 8 RTTs so new connections get
//! past slow start) the controller compares the goodput of the epoch with the previous one:
//!
//! - after adding streams: a gain of at least `gain_threshold` keeps them and probes further
//!   up; less than that reverts the step and holds for a few epochs;
//! - after removing streams: a loss of more than `gain_threshold` reverts the step; otherwise
//!   the smaller count is kept;
//! - after holding, it probes: up when the last probe up paid off (at start: yes), down
//!   when it did not;
//!   down otherwise, to shed connections that bring nothing; on a short, clean path
//!   (RTT < 50 ms, no loss) it does not go above the initial count (manual: 4-8 streams
//!   below 50 ms, 8-16 above 100 ms);
//! - never up while the receiver's window (reorder buffer) is the limit: more streams cannot
//!   help then.
//!
//! The count stays within `[min_streams, max_streams]`.

use crate::{Config, Micros};

/// What the controller did last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Added streams.
    Up,
    /// Removed streams.
    Down,
    /// Kept the count.
    Hold,
}

/// Measurements the controller sees at the end of an epoch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpochSample {
    /// Goodput (acknowledged payload) over the epoch, bytes per second.
    pub goodput: f64,
    /// Smallest chunk round trip seen (ms), if any.
    pub min_rtt_ms: Option<f64>,
    /// Fraction of chunks that had to be resent, or a loss rate from TCP_INFO.
    pub loss: f64,
    /// The send window (receiver buffer) was full for most of the epoch.
    pub window_limited: bool,
    /// The source had nothing to send for part of the epoch.
    pub app_limited: bool,
}

/// The stream-count controller.
#[derive(Clone, Debug)]
pub struct Controller {
    min: usize,
    max: usize,
    initial: usize,
    target: usize,
    gain_threshold: f64,
    last_step: Step,
    last_step_size: usize,
    prev_goodput: Option<f64>,
    hold_left: u32,
    last_up_paid: bool,
    epoch_start: Micros,
}

/// Epochs to wait after a reverted probe before probing again.
const HOLD_EPOCHS: u32 = 3;

impl Controller {
    /// A controller at `cfg.initial_streams`.
    pub fn new(cfg: &Config, now: Micros) -> Self {
        Self {
            min: cfg.min_streams,
            max: cfg.max_streams,
            initial: cfg.initial_streams,
            target: cfg.initial_streams,
            gain_threshold: cfg.gain_threshold,
            last_step: Step::Hold,
            last_step_size: 0,
            prev_goodput: None,
            hold_left: 1,
            last_up_paid: true,
            epoch_start: now,
        }
    }

    /// The stream count wanted now.
    pub fn target(&self) -> usize {
        self.target
    }

    /// Pins the count (operator override); the controller goes on from there.
    pub fn set_target(&mut self, n: usize) {
        self.target = n.clamp(self.min, self.max);
        self.last_step = Step::Hold;
        self.prev_goodput = None;
        self.hold_left = HOLD_EPOCHS;
    }

    /// When the current epoch started.
    pub fn epoch_start(&self) -> Micros {
        self.epoch_start
    }

    /// Starts a new epoch without a decision (adaptation off, or no path to measure).
    pub fn set_epoch_start(&mut self, now: Micros) {
        self.epoch_start = now;
        self.prev_goodput = None;
    }

    /// Epoch length for a path with this minimum RTT.
    pub fn epoch_len(cfg: &Config, min_rtt_ms: Option<f64>) -> Micros {
        let rtt_us = min_rtt_ms.map_or(0, |r| (r * 1000.0) as u64);
        cfg.min_epoch.max(8 * rtt_us)
    }

    /// Ends the epoch at `now` with `s` and returns the step taken.
    pub fn on_epoch(&mut self, now: Micros, s: EpochSample) -> Step {
        self.epoch_start = now;
        if s.app_limited {
            // Goodput says nothing about the path when the source is the limit.
            self.prev_goodput = None;
            self.last_step = Step::Hold;
            return Step::Hold;
        }
        let prev = self.prev_goodput;
        self.prev_goodput = Some(s.goodput);
        let step = self.decide(prev, s);
        let size = (self.target / 4).max(1);
        match step {
            Step::Up => {
                let n = (self.target + size).min(self.max);
                self.last_step_size = n - self.target;
                self.target = n;
            }
            Step::Down => {
                let n = self.target.saturating_sub(size).max(self.min);
                self.last_step_size = self.target - n;
                self.target = n;
            }
            Step::Hold => self.last_step_size = 0,
        }
        if self.last_step_size == 0 {
            self.last_step = Step::Hold;
            return Step::Hold;
        }
        self.last_step = step;
        step
    }

    fn decide(&mut self, prev: Option<f64>, s: EpochSample) -> Step {
        let Some(prev) = prev else {
            return Step::Hold;
        };
        let gained = s.goodput >= prev * (1.0 + self.gain_threshold);
        let lost = s.goodput < prev * (1.0 - self.gain_threshold);
        match self.last_step {
            Step::Up if gained && !s.window_limited => {
                self.last_up_paid = true;
                Step::Up
            }
            Step::Up if gained => {
                self.last_up_paid = true;
                Step::Hold
            }
            Step::Up => {
                // The probe brought nothing: undo it and wait.
                self.last_up_paid = false;
                self.hold_left = HOLD_EPOCHS;
                self.revert_up();
                Step::Hold
            }
            Step::Down if lost => {
                // Fewer was worse: undo, and probe upwards next time.
                self.hold_left = HOLD_EPOCHS;
                self.last_up_paid = true;
                self.revert_down();
                Step::Hold
            }
            Step::Down => Step::Hold,
            Step::Hold => {
                if self.hold_left > 0 {
                    self.hold_left -= 1;
                    return Step::Hold;
                }
                self.hold_left = HOLD_EPOCHS;
                // Manual: 4-8 streams below 50 ms RTT, up to 16 on long or lossy paths.
                let hard_path = s.loss > 0.001 || s.min_rtt_ms.is_some_and(|r| r >= 50.0);
                let ceiling = if hard_path {
                    self.max
                } else {
                    self.max.min(self.initial.max(self.min))
                };
                if !s.window_limited && self.last_up_paid && self.target < ceiling {
                    Step::Up
                } else if self.target > self.min {
                    Step::Down
                } else {
                    Step::Hold
                }
            }
        }
    }

    fn revert_up(&mut self) {
        self.target = self
            .target
            .saturating_sub(self.last_step_size)
            .max(self.min);
    }

    fn revert_down(&mut self) {
        self.target = (self.target + self.last_step_size).min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(goodput: f64) -> EpochSample {
        EpochSample {
            goodput,
            min_rtt_ms: Some(100.0),
            loss: 0.01,
            window_limited: false,
            app_limited: false,
        }
    }

    fn run(c: &mut Controller, f: impl Fn(usize) -> f64, epochs: u64) -> Vec<usize> {
        (1..=epochs)
            .map(|e| {
                let g = f(c.target());
                c.on_epoch(e * 1_000_000, sample(g));
                c.target()
            })
            .collect()
    }

    #[test]
    fn grows_to_max_when_each_stream_adds_goodput() {
        let cfg = Config::default();
        let mut c = Controller::new(&cfg, 0);
        // Loss-limited per-connection rate: goodput proportional to the stream count.
        let t = run(&mut c, |n| n as f64 * 1e6, 20);
        assert_eq!(*t.last().unwrap(), cfg.max_streams, "{t:?}");
    }

    #[test]
    fn shrinks_when_streams_bring_nothing_and_stays_in_bounds() {
        let cfg = Config::default();
        let mut c = Controller::new(&cfg, 0);
        // One shared bottleneck: any count gives the same goodput.
        let t = run(&mut c, |_| 10e6, 40);
        assert!(
            t.iter()
                .all(|&n| (cfg.min_streams..=cfg.max_streams).contains(&n))
        );
        assert_eq!(*t.last().unwrap(), cfg.min_streams, "{t:?}");
    }

    #[test]
    fn finds_the_knee_of_a_saturating_curve() {
        let cfg = Config::default();
        let mut c = Controller::new(&cfg, 0);
        // Each stream adds 1 MB/s up to 10 streams, then the link is full.
        let t = run(&mut c, |n| (n.min(10)) as f64 * 1e6, 40);
        let last = *t.last().unwrap();
        assert!((10..=12).contains(&last), "{t:?}");
    }

    #[test]
    fn never_grows_when_window_limited_or_app_limited() {
        let cfg = Config::default();
        let mut c = Controller::new(&cfg, 0);
        for e in 1..20 {
            c.on_epoch(
                e * 1_000_000,
                EpochSample {
                    window_limited: true,
                    ..sample(e as f64 * 1e6)
                },
            );
            assert!(c.target() <= cfg.initial_streams);
        }
        let mut d = Controller::new(&cfg, 0);
        for e in 1..20 {
            d.on_epoch(
                e * 1_000_000,
                EpochSample {
                    app_limited: true,
                    ..sample(e as f64 * 1e6)
                },
            );
            assert_eq!(d.target(), cfg.initial_streams);
        }
    }
}
