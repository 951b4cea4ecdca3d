//! Queue → kernel feedback: a per-class admission ratio for the `ADMISSION`
//! map, so a class whose queue stays full sheds new connections at the edge
//! instead of queueing them.
//!
//! Input: each class's queue fullness (`queued / max_queue`, 0..=1), sampled
//! by the caller (every 250 ms is plenty). Output: `admit_permille` 0..=1000.
//!
//! Hysteresis, per class (defaults in brackets):
//! - fullness ≥ `high` [0.9] for `hold_full_ms` [2000] without a break: the
//!   ratio is multiplied by `decrease` [0.5], not below `floor` [100]; the
//!   hold then starts again, so cuts come at most once per hold.
//! - fullness ≤ `low` [0.5] for `hold_drained_ms` [5000]: the ratio rises by
//!   `step_up` [100], up to 1000, again at most once per hold.
//! - between `low` and `high`: the ratio stays and both holds restart.
//!
//! Cuts are fast and multiplicative, recovery slow and additive (AIMD), so a
//! queue hovering at the edge does not flap. The floor keeps a trickle of new
//! connections coming so the queue can show that it drains.

use std::time::{Duration, Instant};

use serde::Deserialize;
use toml::Spanned;

use super::config::ScheduleError;

pub const FULL_ADMISSION: u32 = 1000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackConfig {
    #[serde(default = "default_high")]
    pub high: Spanned<f64>,
    #[serde(default = "default_low")]
    pub low: Spanned<f64>,
    #[serde(default = "default_hold_full")]
    pub hold_full_ms: u64,
    #[serde(default = "default_hold_drained")]
    pub hold_drained_ms: u64,
    #[serde(default = "default_decrease")]
    pub decrease: Spanned<f64>,
    #[serde(default = "default_step_up")]
    pub step_up: Spanned<u32>,
    #[serde(default = "default_floor")]
    pub floor: Spanned<u32>,
}

impl Default for FeedbackConfig {
    fn default() -> Self {
        FeedbackConfig {
            high: default_high(),
            low: default_low(),
            hold_full_ms: default_hold_full(),
            hold_drained_ms: default_hold_drained(),
            decrease: default_decrease(),
            step_up: default_step_up(),
            floor: default_floor(),
        }
    }
}

fn default_high() -> Spanned<f64> {
    Spanned::new(0..0, 0.9)
}
fn default_low() -> Spanned<f64> {
    Spanned::new(0..0, 0.5)
}
fn default_hold_full() -> u64 {
    2000
}
fn default_hold_drained() -> u64 {
    5000
}
fn default_decrease() -> Spanned<f64> {
    Spanned::new(0..0, 0.5)
}
fn default_step_up() -> Spanned<u32> {
    Spanned::new(0..0, 100)
}
fn default_floor() -> Spanned<u32> {
    Spanned::new(0..0, 100)
}

impl FeedbackConfig {
    pub(super) fn validate(&self) -> Result<(), ScheduleError> {
        let fail = |span: std::ops::Range<usize>, message: &str, hint: &str| {
            Err(ScheduleError {
                span: (span.start < span.end).then_some(span),
                message: message.into(),
                hint: Some(hint.into()),
            })
        };
        let (high, low) = (*self.high.get_ref(), *self.low.get_ref());
        if !(0.0 < low && low < high && high <= 1.0) {
            return fail(
                self.low.span(),
                "feedback needs 0 < low < high <= 1",
                "the gap between low and high is the hysteresis band, e.g. low = 0.5, high = 0.9",
            );
        }
        let decrease = *self.decrease.get_ref();
        if !(0.0 < decrease && decrease < 1.0) {
            return fail(
                self.decrease.span(),
                "feedback.decrease must be between 0 and 1 (exclusive)",
                "0.5 halves the admission ratio on every cut",
            );
        }
        if *self.step_up.get_ref() == 0 {
            return fail(
                self.step_up.span(),
                "feedback.step_up must be at least 1",
                "per-mille points regained per drained hold, e.g. 100",
            );
        }
        if *self.floor.get_ref() > FULL_ADMISSION {
            return fail(
                self.floor.span(),
                "feedback.floor is per mille: at most 1000",
                "100 keeps 10% of new connections flowing",
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Steady,
    Full { since: Instant },
    Drained { since: Instant },
}

/// The controller for all classes; pure and driven by the caller's clock.
#[derive(Debug)]
pub struct AdmissionController {
    rule: FeedbackConfig,
    ratios: Vec<u32>,
    phases: Vec<Phase>,
}

impl AdmissionController {
    pub fn new(rule: FeedbackConfig, classes: usize) -> AdmissionController {
        AdmissionController {
            rule,
            ratios: vec![FULL_ADMISSION; classes],
            phases: vec![Phase::Steady; classes],
        }
    }

    /// Starts from ratios already in force (a restarted or reloaded daemon
    /// finds them in the pinned map): they then recover by the usual steps
    /// once the queues stay drained, instead of jumping or being forgotten.
    pub fn resume(mut self, ratios: &[u32]) -> AdmissionController {
        for (mine, &r) in self.ratios.iter_mut().zip(ratios) {
            *mine = r.min(FULL_ADMISSION);
        }
        self
    }

    /// Current ratio per class, per mille.
    pub fn ratios(&self) -> &[u32] {
        &self.ratios
    }

    /// Feeds one sample of fullness per class (indexed by class id); returns
    /// the `(class, admit_permille)` pairs that changed, for the ADMISSION map.
    pub fn update(&mut self, now: Instant, fullness: &[f64]) -> Vec<(u32, u32)> {
        let hold_full = Duration::from_millis(self.rule.hold_full_ms);
        let hold_drained = Duration::from_millis(self.rule.hold_drained_ms);
        let mut changed = Vec::new();
        for (class, &fill) in fullness.iter().enumerate().take(self.ratios.len()) {
            let ratio = &mut self.ratios[class];
            let phase = &mut self.phases[class];
            let before = *ratio;
            if fill >= *self.rule.high.get_ref() {
                match *phase {
                    Phase::Full { since } if now.duration_since(since) >= hold_full => {
                        let cut = (*ratio as f64 * self.rule.decrease.get_ref()) as u32;
                        *ratio = cut.max(*self.rule.floor.get_ref()).min(*ratio);
                        *phase = Phase::Full { since: now };
                    }
                    Phase::Full { .. } => {}
                    _ => *phase = Phase::Full { since: now },
                }
            } else if fill <= *self.rule.low.get_ref() {
                match *phase {
                    Phase::Drained { since } if now.duration_since(since) >= hold_drained => {
                        *ratio = (*ratio + self.rule.step_up.get_ref()).min(FULL_ADMISSION);
                        *phase = Phase::Drained { since: now };
                    }
                    Phase::Drained { .. } => {}
                    _ => *phase = Phase::Drained { since: now },
                }
            } else {
                *phase = Phase::Steady;
            }
            if *ratio != before {
                changed.push((class as u32, *ratio));
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Samples every 250 ms from `from` for `span`, returning the last time.
    fn feed(
        c: &mut AdmissionController,
        from: Instant,
        span: Duration,
        fill: f64,
    ) -> (Instant, Vec<(u32, u32)>) {
        let mut changes = Vec::new();
        let mut t = from;
        while t < from + span {
            t += ms(250);
            changes.extend(c.update(t, &[fill, 0.0]));
        }
        (t, changes)
    }

    #[test]
    fn persistently_full_queue_cuts_admission_once_per_hold() {
        let mut c = AdmissionController::new(FeedbackConfig::default(), 2);
        let t0 = Instant::now();
        // Full, but not yet for the hold time: nothing changes.
        let (t, changes) = feed(&mut c, t0, ms(1750), 1.0);
        assert!(changes.is_empty(), "{changes:?}");
        assert_eq!(c.ratios(), &[1000, 1000]);
        // Past 2 s of fullness: halved once, then again only after another 2 s.
        let (t, changes) = feed(&mut c, t, ms(500), 1.0);
        assert_eq!(changes, vec![(0, 500)]);
        let (t, changes) = feed(&mut c, t, ms(2000), 1.0);
        assert_eq!(changes, vec![(0, 250)]);
        // Never below the floor.
        let (_, _) = feed(&mut c, t, ms(20_000), 1.0);
        assert_eq!(c.ratios()[0], 100);
        // The idle class was never touched.
        assert_eq!(c.ratios()[1], 1000);
    }

    #[test]
    fn short_bursts_and_the_band_between_thresholds_change_nothing() {
        let mut c = AdmissionController::new(FeedbackConfig::default(), 2);
        let mut t = Instant::now();
        for _ in 0..10 {
            // 1.5 s full, then one sample in the band: the hold restarts.
            let (next, changes) = feed(&mut c, t, ms(1500), 0.95);
            assert!(changes.is_empty());
            t = next + ms(250);
            assert!(c.update(t, &[0.7, 0.0]).is_empty());
        }
        assert_eq!(c.ratios()[0], 1000);
    }

    #[test]
    fn drained_queue_recovers_slowly_and_the_band_holds_the_ratio() {
        let mut c = AdmissionController::new(FeedbackConfig::default(), 2);
        let t0 = Instant::now();
        let (t, _) = feed(&mut c, t0, ms(4250), 1.0);
        assert_eq!(c.ratios()[0], 250);
        // In the band: no recovery however long it lasts.
        let (t, changes) = feed(&mut c, t, ms(30_000), 0.7);
        assert!(changes.is_empty());
        // Drained: +100 per 5 s hold.
        let (t, changes) = feed(&mut c, t, ms(5250), 0.1);
        assert_eq!(changes, vec![(0, 350)]);
        let (_, changes) = feed(&mut c, t, ms(60_000), 0.0);
        assert_eq!(changes.last(), Some(&(0, 1000)));
        assert_eq!(c.ratios()[0], 1000);
    }

    #[test]
    fn rejects_a_band_that_is_not_one() {
        let cfg: FeedbackConfig = toml::from_str("low = 0.9\nhigh = 0.5").unwrap();
        let err = cfg.validate().unwrap_err();
        assert!(err.message.contains("0 < low < high"), "{err:?}");
    }

    #[test]
    fn resumed_ratios_hold_then_recover_in_steps() {
        let rule: FeedbackConfig = toml::from_str("hold_drained_ms = 1000").unwrap();
        let step = *rule.step_up.get_ref();
        let mut c = AdmissionController::new(rule, 2).resume(&[250, 1000]);
        let t0 = Instant::now();
        assert!(c.update(t0, &[0.0, 0.0]).is_empty(), "kept at first");
        assert_eq!(c.ratios(), &[250, 1000]);
        let changed = c.update(t0 + Duration::from_millis(1000), &[0.0, 0.0]);
        assert_eq!(changed, vec![(0, 250 + step)]);
    }
}
