//! Clocks. The request path reads the time a dozen times per request (idle
//! stamps, pool ages, budget windows, queue deadlines); in a VM a precise
//! `clock_gettime` is a TSC read of some 25-40 ns each. Where a tick's
//! resolution (1-4 ms) is plenty, the coarse clocks here read the value the
//! kernel keeps per tick instead, a few nanoseconds from the vDSO. Latency
//! metrics and timer deadlines still use precise [`std::time::Instant`]s.

use std::{
    sync::LazyLock,
    time::{Duration, Instant},
};

use jiff::Timestamp;

/// Nanoseconds of `clock` (`CLOCK_MONOTONIC`, `CLOCK_THREAD_CPUTIME_ID`, …).
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer; callers pass clocks Linux always has.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `Instant` is `CLOCK_MONOTONIC` on Linux but cannot be built from a
/// reading: one precise pair taken once anchors the coarse readings.
static ANCHOR: LazyLock<(Instant, u64)> =
    LazyLock::new(|| (Instant::now(), clock_ns(libc::CLOCK_MONOTONIC)));

/// Now, to within one tick (never ahead of the precise clock).
pub fn coarse_instant() -> Instant {
    let (at, ns) = *ANCHOR;
    at + Duration::from_nanos(clock_ns(libc::CLOCK_MONOTONIC_COARSE).saturating_sub(ns))
}

/// Monotonic milliseconds, to within one tick.
pub fn coarse_ms() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_COARSE) / 1_000_000
}

/// The wall clock, to within one tick.
pub fn coarse_timestamp() -> Timestamp {
    let ns = clock_ns(libc::CLOCK_REALTIME_COARSE);
    Timestamp::from_nanosecond(i128::from(ns)).unwrap_or_else(|_| Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_clocks_trail_the_precise_ones_by_at_most_a_tick() {
        // A tick is 1-10 ms (CONFIG_HZ 100 to 1000); allow scheduling noise.
        let slack = Duration::from_millis(50);
        let before = Instant::now();
        let coarse = coarse_instant();
        let after = Instant::now();
        assert!(
            coarse <= after && coarse + slack >= before,
            "{coarse:?} vs {before:?}"
        );
        let wall = Timestamp::now();
        let coarse = coarse_timestamp();
        let lag = wall.duration_since(coarse);
        assert!(
            lag >= -jiff::SignedDuration::from_millis(1)
                && lag < jiff::SignedDuration::from_millis(50),
            "{lag:?}"
        );
        let ms = coarse_ms();
        let precise = clock_ns(libc::CLOCK_MONOTONIC) / 1_000_000;
        assert!(ms <= precise && ms + 50 >= precise);
    }
}
