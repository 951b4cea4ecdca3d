//! Per-arm circuit breaker, retry budget and backoff: pure, driven by `now`.

use std::time::{Duration, Instant};

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    #[serde(default = "default_failures")]
    pub failure_threshold: u32,
    /// How long an open breaker refuses before letting probes through.
    #[serde(default = "default_open_ms")]
    pub open_ms: u64,
    /// Requests let through at once while half-open.
    #[serde(default = "default_probes")]
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: default_failures(),
            open_ms: default_open_ms(),
            half_open_probes: default_probes(),
        }
    }
}

fn default_failures() -> u32 {
    5
}
fn default_open_ms() -> u64 {
    10_000
}
fn default_probes() -> u32 {
    1
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed { consecutive_failures: u32 },
    Open { until: Instant },
    HalfOpen { probes_in_flight: u32 },
}

#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    state: BreakerState,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Breaker {
        Breaker {
            cfg,
            state: BreakerState::Closed {
                consecutive_failures: 0,
            },
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether routing should skip this arm right now (open and not yet due a probe).
    pub fn is_open(&self, now: Instant) -> bool {
        matches!(self.state, BreakerState::Open { until } if now < until)
    }

    /// Asks to send one request; `true` means go (and counts a probe when half-open).
    pub fn try_acquire(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until } if now < until => false,
            BreakerState::Open { .. } => {
                self.state = BreakerState::HalfOpen {
                    probes_in_flight: 1,
                };
                true
            }
            BreakerState::HalfOpen { probes_in_flight } => {
                if probes_in_flight < self.cfg.half_open_probes {
                    self.state = BreakerState::HalfOpen {
                        probes_in_flight: probes_in_flight + 1,
                    };
                    true
                } else {
                    false
                }
            }
        }
    }

    pub fn on_success(&mut self) {
        self.state = BreakerState::Closed {
            consecutive_failures: 0,
        };
    }

    pub fn on_failure(&mut self, now: Instant) {
        let open = BreakerState::Open {
            until: now + Duration::from_millis(self.cfg.open_ms),
        };
        self.state = match self.state {
            BreakerState::Closed {
                consecutive_failures,
            } if consecutive_failures + 1 < self.cfg.failure_threshold => BreakerState::Closed {
                consecutive_failures: consecutive_failures + 1,
            },
            BreakerState::Open { until } => BreakerState::Open { until },
            _ => open,
        };
    }
}

/// Retries are a budget, not a right: each request deposits `ratio` of a retry,
/// and `min_per_sec` more trickle in with time, so a failing backend cannot turn
/// every request into several (retry storms).
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_sec: f64,
    cap: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl RetryBudget {
    pub fn new(ratio: f64, min_per_sec: f64) -> RetryBudget {
        let cap = (min_per_sec * 10.0).max(10.0);
        RetryBudget {
            ratio,
            min_per_sec,
            cap,
            tokens: cap,
            last: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let secs = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + secs * self.min_per_sec).min(self.cap);
        }
        self.last = Some(now);
    }

    pub fn on_request(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens + self.ratio).min(self.cap);
    }

    pub fn try_retry(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Exponential backoff with full jitter: attempt 1 waits up to `base`, each next
/// one up to twice as long, never more than `max`. `random` is any u32.
pub fn backoff(attempt: u32, base: Duration, max: Duration, random: u32) -> Duration {
    let ceiling = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(max);
    ceiling.mul_f64(random as f64 / u32::MAX as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn opens_after_threshold_then_half_opens_then_closes() {
        let t0 = Instant::now();
        let mut b = Breaker::new(BreakerConfig {
            failure_threshold: 3,
            open_ms: 1000,
            half_open_probes: 1,
        });
        b.on_failure(t0);
        b.on_failure(t0);
        assert!(b.try_acquire(t0), "two failures: still closed");
        b.on_failure(t0);
        assert!(b.is_open(t0 + ms(999)));
        assert!(!b.try_acquire(t0 + ms(999)));
        // Due: one probe goes, the next waits for its result.
        assert!(b.try_acquire(t0 + ms(1000)));
        assert!(!b.try_acquire(t0 + ms(1001)));
        b.on_success();
        assert_eq!(
            b.state(),
            BreakerState::Closed {
                consecutive_failures: 0
            }
        );
    }

    #[test]
    fn failed_probe_reopens_and_success_resets_the_count() {
        let t0 = Instant::now();
        let mut b = Breaker::new(BreakerConfig {
            failure_threshold: 2,
            open_ms: 100,
            half_open_probes: 1,
        });
        b.on_failure(t0);
        b.on_success();
        b.on_failure(t0);
        assert!(!b.is_open(t0), "success reset the streak");
        b.on_failure(t0);
        assert!(b.is_open(t0));
        assert!(b.try_acquire(t0 + ms(100)));
        b.on_failure(t0 + ms(150));
        assert!(b.is_open(t0 + ms(249)));
        assert!(!b.is_open(t0 + ms(250)));
    }

    #[test]
    fn retry_budget_limits_retries_to_a_ratio() {
        let t0 = Instant::now();
        let mut r = RetryBudget::new(0.2, 0.0);
        // Drain the initial allowance.
        while r.try_retry(t0) {}
        let mut allowed = 0;
        for _ in 0..100 {
            r.on_request(t0);
            if r.try_retry(t0) {
                allowed += 1;
            }
        }
        assert!((19..=20).contains(&allowed), "{allowed}");
        // With time, the floor refills.
        let mut r = RetryBudget::new(0.0, 2.0);
        while r.try_retry(t0) {}
        assert!(!r.try_retry(t0 + ms(400)));
        assert!(r.try_retry(t0 + ms(600)));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = ms(25);
        let max = ms(1000);
        assert_eq!(backoff(1, base, max, u32::MAX), ms(25));
        assert_eq!(backoff(3, base, max, u32::MAX), ms(100));
        assert_eq!(backoff(10, base, max, u32::MAX), ms(1000));
        assert_eq!(backoff(3, base, max, 0), ms(0));
    }
}
