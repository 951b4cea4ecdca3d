//! The two meters behind every limit, in exact integer arithmetic.
//!
//! - [`SmoothBucket`]: a token bucket that may go into debt (per-minute limits,
//!   and the providers' rolling per-day limits of a pool).
//! - [`CalendarCounter`]: a counter over a calendar day or month in the
//!   configured time zone (tenant day/month budgets, money caps).

use std::time::Duration;

use jiff::{Timestamp, tz::TimeZone};

/// A token bucket that holds `max` tokens and refills them in `period`.
///
/// The level is kept in "token × period-nanoseconds" units: one token is
/// `period_ns` units and the bucket drains `max` units per nanosecond, so the
/// refill is exact for any rate (no rounding drift), and a charge larger than
/// what is left simply puts the bucket into debt that drains like the rest.
#[derive(Clone, Debug)]
pub(crate) struct SmoothBucket {
    max: u64,
    period_ns: u128,
    level: u128,
    at: Timestamp,
}

impl SmoothBucket {
    pub(crate) fn new(max: u64, period: Duration, now: Timestamp) -> Self {
        SmoothBucket {
            max,
            period_ns: period.as_nanos().max(1),
            level: 0,
            at: now,
        }
    }

    /// Drains the bucket up to `now`; a clock that steps back drains nothing.
    pub(crate) fn advance(&mut self, now: Timestamp) {
        if now > self.at {
            let elapsed = nanos_between(self.at, now);
            self.level = self
                .level
                .saturating_sub(elapsed.saturating_mul(self.max as u128));
            self.at = now;
        }
    }

    fn units(&self, tokens: u64) -> u128 {
        (tokens as u128).saturating_mul(self.period_ns)
    }

    /// Tokens in the bucket (charged and not yet refilled), rounded up.
    pub(crate) fn used(&self) -> u64 {
        u64::try_from(self.level.div_ceil(self.period_ns)).unwrap_or(u64::MAX)
    }

    pub(crate) fn fits(&self, amount: u64) -> bool {
        self.level.saturating_add(self.units(amount)) <= self.units(self.max)
    }

    pub(crate) fn charge(&mut self, amount: u64) {
        self.level = self.level.saturating_add(self.units(amount));
    }

    /// Charges `amount` as of `at`, for replaying history in time order. An
    /// empty bucket is the same at any earlier instant, so it moves back to
    /// `at` and the replay is exact; a non-empty one takes the charge now
    /// (never less than the truth).
    pub(crate) fn charge_at(&mut self, at: Timestamp, amount: u64) {
        if at < self.at && self.level == 0 {
            self.at = at;
        }
        self.advance(at);
        self.charge(amount);
    }

    /// Forgets any debt: the level of a bucket that is exactly full.
    pub(crate) fn cap_at_full(&mut self) {
        self.level = self.level.min(self.units(self.max));
    }

    pub(crate) fn period(&self) -> Duration {
        duration_ns(self.period_ns)
    }

    pub(crate) fn refund(&mut self, amount: u64) {
        self.level = self.level.saturating_sub(self.units(amount));
    }

    /// How long until `amount` fits; `None` if it never can (`amount > max`).
    pub(crate) fn wait_for(&self, amount: u64) -> Option<Duration> {
        if amount > self.max {
            return None;
        }
        let need = self
            .level
            .saturating_add(self.units(amount))
            .saturating_sub(self.units(self.max));
        Some(duration_ns(need.div_ceil(self.max as u128)))
    }

    /// How long until the bucket is empty again (the full limit available).
    pub(crate) fn time_to_empty(&self) -> Duration {
        if self.max == 0 {
            return Duration::ZERO;
        }
        duration_ns(self.level.div_ceil(self.max as u128))
    }
}

/// Calendar period of a [`CalendarCounter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Period {
    Day,
    Month,
}

/// A half-open calendar window `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: Timestamp,
    pub end: Timestamp,
}

impl Window {
    pub fn contains(&self, t: Timestamp) -> bool {
        self.start <= t && t < self.end
    }
}

/// The calendar day of `now` in `tz`: from its first instant (which is not
/// always 00:00 on a DST day) to the next day's first instant.
pub fn day_window(now: Timestamp, tz: &TimeZone) -> Window {
    let date = now.to_zoned(tz.clone()).date();
    let start = date.to_zoned(tz.clone()).map(|z| z.timestamp());
    let end = date
        .tomorrow()
        .and_then(|d| d.to_zoned(tz.clone()))
        .map(|z| z.timestamp());
    // jiff only fails at the ends of its range (year ±9999): the window then
    // extends to that end, never panics.
    Window {
        start: start.unwrap_or(Timestamp::MIN),
        end: end.unwrap_or(Timestamp::MAX),
    }
}

/// The calendar month of `now` in `tz`.
pub fn month_window(now: Timestamp, tz: &TimeZone) -> Window {
    let date = now.to_zoned(tz.clone()).date();
    let start = date
        .first_of_month()
        .to_zoned(tz.clone())
        .map(|z| z.timestamp());
    let end = date
        .last_of_month()
        .tomorrow()
        .and_then(|d| d.to_zoned(tz.clone()))
        .map(|z| z.timestamp());
    Window {
        start: start.unwrap_or(Timestamp::MIN),
        end: end.unwrap_or(Timestamp::MAX),
    }
}

/// Committed and in-flight amounts within the current calendar window.
#[derive(Clone, Debug)]
pub(crate) struct CalendarCounter {
    pub(crate) period: Period,
    pub(crate) window: Window,
    pub(crate) committed: u64,
    pub(crate) held: u64,
}

impl CalendarCounter {
    pub(crate) fn new(period: Period, now: Timestamp, tz: &TimeZone) -> Self {
        CalendarCounter {
            period,
            window: window_of(period, now, tz),
            committed: 0,
            held: 0,
        }
    }

    /// Starts a new window once `now` has passed the current one. Only ever
    /// forward: a clock stepping back keeps the current window and its counts.
    pub(crate) fn roll(&mut self, now: Timestamp, tz: &TimeZone) {
        if now >= self.window.end {
            self.window = window_of(self.period, now, tz);
            self.committed = 0;
            self.held = 0;
        }
    }

    pub(crate) fn used(&self) -> u64 {
        self.committed.saturating_add(self.held)
    }
}

fn window_of(period: Period, now: Timestamp, tz: &TimeZone) -> Window {
    match period {
        Period::Day => day_window(now, tz),
        Period::Month => month_window(now, tz),
    }
}

pub(crate) fn nanos_between(from: Timestamp, to: Timestamp) -> u128 {
    (to.as_nanosecond() - from.as_nanosecond()).max(0) as u128
}

fn duration_ns(ns: u128) -> Duration {
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn bucket_refills_exactly_at_its_rate() {
        let t0 = t("2026-01-01T00:00:00Z");
        // 7 tokens per minute: not a divisor of 60 s, so rounding would show.
        let mut b = SmoothBucket::new(7, Duration::from_secs(60), t0);
        b.charge(7);
        assert!(!b.fits(1));
        assert_eq!(
            b.wait_for(1),
            Some(Duration::from_nanos(60_000_000_000 / 7 + 1))
        );
        b.advance(t0 + Duration::from_secs(60));
        assert_eq!(b.used(), 0);
        assert!(b.fits(7) && !b.fits(8));
        assert_eq!(b.wait_for(8), None, "more than the limit never fits");
    }

    #[test]
    fn bucket_debt_drains_and_clock_steps_back_are_ignored() {
        let t0 = t("2026-01-01T00:00:00Z");
        let mut b = SmoothBucket::new(60, Duration::from_secs(60), t0);
        b.charge(120); // one minute of debt beyond the full bucket
        assert_eq!(b.time_to_empty(), Duration::from_secs(120));
        b.advance(t0 - Duration::from_secs(30));
        assert_eq!(b.used(), 120);
        b.advance(t0 + Duration::from_secs(90));
        assert_eq!(b.used(), 30);
        assert!(b.fits(30) && !b.fits(31));
        b.refund(1000);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn day_and_month_windows_follow_the_zone_and_dst() {
        let tz = TimeZone::get("Europe/Berlin").unwrap();
        // 2026-03-29: clocks jump 02:00 → 03:00 in Berlin, the day has 23 hours.
        let w = day_window(t("2026-03-29T12:00:00Z"), &tz);
        assert_eq!(w.start, t("2026-03-28T23:00:00Z"));
        assert_eq!(w.end, t("2026-03-29T22:00:00Z"));
        // 2026-10-25: back 03:00 → 02:00, 25 hours.
        let w = day_window(t("2026-10-25T12:00:00Z"), &tz);
        assert_eq!(w.end.as_second() - w.start.as_second(), 25 * 3600);
        // 23:30 UTC on Jan 31 is already February in Berlin.
        let m = month_window(t("2026-01-31T23:30:00Z"), &tz);
        assert_eq!(m.start, t("2026-01-31T23:00:00Z"));
        assert_eq!(m.end, t("2026-02-28T23:00:00Z"));
    }
}
