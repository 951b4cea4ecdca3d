//! What the scheduler reports: plain data for `/metrics`, and the drain-rate
//! meter behind `Retry-After`.

use std::time::{Duration, Instant};

/// Why a request was not admitted. See [`super::Rejection::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Its class's queue is at `max_queue` (429).
    QueueFull,
    /// The backend's queue, all classes together, is at its `max_queue` (503).
    BackendSaturated,
    /// It waited `max_wait` without a slot (503).
    WaitTimeout,
}

impl RejectReason {
    pub const ALL: [RejectReason; 3] = [
        RejectReason::QueueFull,
        RejectReason::BackendSaturated,
        RejectReason::WaitTimeout,
    ];

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            RejectReason::QueueFull => "queue_full",
            RejectReason::BackendSaturated => "backend_saturated",
            RejectReason::WaitTimeout => "wait_timeout",
        }
    }

    pub(super) fn index(self) -> usize {
        self as usize
    }
}

/// Upper bounds (seconds) of the wait-time histogram buckets.
pub const WAIT_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Time from arrival to start, Prometheus-style: `counts[i]` counts waits
/// ≤ `WAIT_BUCKETS[i]` (cumulative); `count` includes the +Inf bucket.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WaitHistogram {
    pub counts: [u64; WAIT_BUCKETS.len()],
    pub count: u64,
    pub sum_seconds: f64,
}

impl WaitHistogram {
    pub(super) fn observe(&mut self, wait: Duration) {
        let secs = wait.as_secs_f64();
        for (bound, count) in WAIT_BUCKETS.iter().zip(self.counts.iter_mut()) {
            if secs <= *bound {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum_seconds += secs;
    }
}

/// One class on one backend. Counters are totals since start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClassStats {
    pub queued: usize,
    pub in_flight: u32,
    /// Requests that got a slot.
    pub admitted: u64,
    /// Indexed by [`RejectReason::ALL`] order.
    pub rejected: [u64; 3],
    /// Requests whose client left while they waited.
    pub cancelled: u64,
    pub wait: WaitHistogram,
}

impl ClassStats {
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected[reason.index()]
    }
}

/// A snapshot of one backend's scheduler.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub capacity: u32,
    pub in_flight: u32,
    /// Indexed by class id.
    pub classes: Vec<ClassStats>,
}

/// Observed drain rate: an exponentially weighted mean of the time between
/// departures from a queue.
#[derive(Debug, Clone, Default)]
pub(super) struct DrainMeter {
    /// Nanoseconds (a float: the mean is updated on every departure, and
    /// `Duration`'s float helpers check and convert each time).
    mean_gap_ns: Option<f64>,
    last: Option<Instant>,
}

/// Weight of the newest gap in the mean: reacts within a handful of departures.
const DRAIN_ALPHA: f64 = 0.3;

impl DrainMeter {
    pub fn departed(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let gap = now.saturating_duration_since(last).as_nanos() as f64;
            self.mean_gap_ns = Some(match self.mean_gap_ns {
                Some(mean) => mean * (1.0 - DRAIN_ALPHA) + gap * DRAIN_ALPHA,
                None => gap,
            });
        }
        self.last = Some(now);
    }

    /// Expected time for `ahead` requests to leave, if anything has been seen
    /// leaving yet. A queue that has stopped moving counts the silence since
    /// its last departure as the current gap.
    pub fn time_to_drain(&self, ahead: usize, now: Instant) -> Option<Duration> {
        let mean = Duration::from_nanos(self.mean_gap_ns? as u64);
        let silence = self
            .last
            .map_or(Duration::ZERO, |l| now.saturating_duration_since(l));
        Some(mean.max(silence).mul_f64(ahead as f64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let mut h = WaitHistogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(2));
        h.observe(Duration::from_secs(100));
        assert_eq!(h.count, 3);
        assert_eq!(h.counts[0], 0); // ≤ 1 ms
        assert_eq!(h.counts[1], 1); // ≤ 5 ms
        assert_eq!(h.counts[9], 2); // ≤ 2.5 s
        assert_eq!(h.counts[13], 2); // ≤ 60 s; the 100 s wait is only in +Inf
        assert!((h.sum_seconds - 102.003).abs() < 1e-9);
    }

    #[test]
    fn drain_meter_tracks_gaps_and_silence() {
        let t0 = Instant::now();
        let mut m = DrainMeter::default();
        assert_eq!(m.time_to_drain(5, t0), None);
        for i in 0..5 {
            m.departed(t0 + Duration::from_millis(500 * i));
        }
        let last = t0 + Duration::from_millis(2000);
        let secs = |d: Option<Duration>| d.unwrap().as_secs_f64();
        assert!((secs(m.time_to_drain(4, last)) - 2.0).abs() < 1e-6);
        // Ten seconds without a departure: the queue is slower than it was.
        let later = last + Duration::from_secs(10);
        assert!((secs(m.time_to_drain(2, later)) - 20.0).abs() < 1e-6);
    }
}
