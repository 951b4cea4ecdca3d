//! Time windows: which override of a class's limits is in force at a local
//! time of day and weekday.

use jiff::civil::DateTime;

use super::config::{Limits, ScheduleError, Window, parse_clock, parse_day};

const MINUTES_PER_DAY: u16 = 24 * 60;

#[derive(Debug)]
pub struct WindowPlan {
    /// Indexed by `Weekday::to_monday_zero_offset()`: the days a window starts on.
    days: [bool; 7],
    /// Minutes since local midnight; `end <= start` runs past midnight.
    start: u16,
    end: u16,
    pub limits: Limits,
}

impl WindowPlan {
    pub(super) fn parse(w: &Window, limits: Limits) -> Result<WindowPlan, ScheduleError> {
        let mut days = [w.days.is_empty(); 7];
        for day in &w.days {
            days[parse_day(day)?.to_monday_zero_offset() as usize] = true;
        }
        let start = parse_clock(&w.start)?;
        let end = parse_clock(&w.end)?;
        if start == MINUTES_PER_DAY {
            return Err(ScheduleError {
                span: Some(w.start.span()),
                message: "a window cannot start at 24:00".into(),
                hint: Some("start it at \"00:00\"".into()),
            });
        }
        if start == end {
            return Err(ScheduleError {
                span: Some(w.end.span()),
                message: "a window's end equals its start".into(),
                hint: Some("for a whole day write start = \"00:00\", end = \"24:00\"".into()),
            });
        }
        Ok(WindowPlan {
            days,
            start,
            end,
            limits,
        })
    }

    /// Whether local time `at` falls in the window. A window past midnight
    /// belongs to the day it starts on: its early-morning part matches when the
    /// previous day is listed.
    pub fn contains(&self, at: DateTime) -> bool {
        let minute = at.hour() as u16 * 60 + at.minute() as u16;
        let today = self.days[at.weekday().to_monday_zero_offset() as usize];
        if self.start < self.end {
            return today && (self.start..self.end).contains(&minute);
        }
        let yesterday = self.days[at.weekday().previous().to_monday_zero_offset() as usize];
        (today && minute >= self.start) || (yesterday && minute < self.end)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use jiff::{Timestamp, civil::date, tz::TimeZone};

    use crate::schedule::config::{ClassRef, Plan, ScheduleConfig};

    fn plan(text: &str) -> Plan {
        let cfg: ScheduleConfig = toml::from_str(text).unwrap();
        let classes = [
            ClassRef {
                name: "chat",
                priority: 0,
            },
            ClassRef {
                name: "batch",
                priority: 1,
            },
        ];
        cfg.resolve(&classes, &[], &HashMap::new()).unwrap()
    }

    fn at(tz: &str, y: i16, m: i8, d: i8, h: i8, min: i8) -> Timestamp {
        let tz = TimeZone::get(tz).unwrap();
        date(y, m, d)
            .at(h, min, 0, 0)
            .to_zoned(tz)
            .unwrap()
            .timestamp()
    }

    const NIGHTS_AND_WEEKENDS: &str = r#"
        timezone = "Europe/Berlin"
        [[class]]
        name = "batch"
        weight = 1
        [[class.window]]
        days = ["sat", "sun"]
        start = "00:00"
        end = "24:00"
        weight = 8
        [[class.window]]
        days = ["mon", "tue", "wed", "thu", "fri"]
        start = "22:00"
        end = "06:00"
        weight = 4
        max_queue = 1000
    "#;

    #[test]
    fn weight_switches_at_local_time_in_the_configured_zone() {
        let plan = plan(NIGHTS_AND_WEEKENDS);
        // Tuesday 2026-11-24 in Berlin (UTC+1 in winter).
        let weight = |ts| plan.limits_at(ts)[1].weight;
        assert_eq!(weight(at("Europe/Berlin", 2026, 11, 24, 21, 59)), 1);
        assert_eq!(weight(at("Europe/Berlin", 2026, 11, 24, 22, 0)), 4);
        assert_eq!(
            plan.limits_at(at("Europe/Berlin", 2026, 11, 24, 22, 0))[1].max_queue,
            1000
        );
        // 21:30 UTC is 22:30 in Berlin: the zone, not UTC, decides.
        assert_eq!(weight(at("UTC", 2026, 11, 24, 21, 30)), 4);
        // The overnight part belongs to Tuesday's window.
        assert_eq!(weight(at("Europe/Berlin", 2026, 11, 25, 5, 59)), 4);
        assert_eq!(weight(at("Europe/Berlin", 2026, 11, 25, 6, 0)), 1);
        // The unlisted class never changes.
        assert_eq!(
            plan.limits_at(at("Europe/Berlin", 2026, 11, 24, 23, 0))[0].weight,
            1
        );
    }

    #[test]
    fn weekday_rule_covers_weekends_and_friday_night() {
        let plan = plan(NIGHTS_AND_WEEKENDS);
        let weight = |ts| plan.limits_at(ts)[1].weight;
        // Saturday noon: the weekend window.
        assert_eq!(weight(at("Europe/Berlin", 2026, 11, 28, 12, 0)), 8);
        // Saturday 03:00: the weekend window is listed first and wins over
        // Friday night's tail.
        assert_eq!(weight(at("Europe/Berlin", 2026, 11, 28, 3, 0)), 8);
        // Monday 03:00: Sunday is not in the weekday window's days, so
        // Sunday 22:00–Monday 06:00 is not a weekday night.
        assert_eq!(weight(at("Europe/Berlin", 2026, 11, 30, 3, 0)), 1);
        // Monday 23:00: a weekday night.
        assert_eq!(weight(at("Europe/Berlin", 2026, 11, 30, 23, 0)), 4);
    }

    #[test]
    fn windows_without_days_apply_daily_and_reject_empty_spans() {
        let plan = plan(
            "[[class]]\nname = \"chat\"\n[[class.window]]\nstart = \"09:00\"\nend = \"17:00\"\nmax_wait_ms = 500",
        );
        let ts = at("UTC", 2026, 11, 29, 9, 30);
        assert_eq!(plan.limits_at(ts)[0].max_wait.as_millis(), 500);
        let cfg: ScheduleConfig = toml::from_str(
            "[[class]]\nname = \"chat\"\n[[class.window]]\nstart = \"09:00\"\nend = \"09:00\"",
        )
        .unwrap();
        let classes = [ClassRef {
            name: "chat",
            priority: 0,
        }];
        let err = cfg.resolve(&classes, &[], &HashMap::new()).unwrap_err();
        assert!(err.message.contains("end equals its start"), "{err:?}");
    }
}
