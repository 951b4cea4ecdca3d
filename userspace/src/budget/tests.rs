//! The engine against a simulated clock: every limit kind, calendar rollover
//! in a non-UTC zone, hard vs soft, alerts, reservations under real threads.

use std::{
    sync::{
        Arc, Barrier,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    thread,
};

use super::*;

fn t(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn budget(toml_text: &str, now: Timestamp) -> Budget {
    let config: BudgetConfig = toml::from_str(toml_text).unwrap();
    Budget::new(&config, now).unwrap()
}

fn tenant(name: &str) -> Subject<'_> {
    Subject {
        tenant: name,
        api_key: None,
        backend: None,
    }
}

fn est(prompt: u64, max_output: u64) -> Estimate {
    Estimate {
        prompt_tokens: prompt,
        max_output_tokens: Some(max_output),
        cost_micros: 0,
    }
}

fn used(tokens: u64) -> Usage {
    Usage {
        prompt_tokens: tokens,
        ..Usage::default()
    }
}

fn status(b: &Budget, now: Timestamp, scope: &Scope, kind: LimitKind) -> LimitStatus {
    b.status(now)
        .into_iter()
        .find(|s| &s.scope == scope && s.kind == kind)
        .unwrap()
}

fn scope(name: &str) -> Scope {
    Scope::Tenant(name.into())
}

#[test]
fn requests_per_minute_refill_smoothly() {
    let t0 = t("2026-05-04T10:00:00Z");
    let b = budget(
        "[[tenant]]\nname = \"a\"\nrequests_per_minute = { max = 60 }",
        t0,
    );
    for _ in 0..60 {
        let r = b.reserve(tenant("a"), est(1, 1), t0).unwrap();
        b.commit(r, used(2), t0);
    }
    let refusal = b.reserve(tenant("a"), est(1, 1), t0).unwrap_err();
    assert_eq!(refusal.kind, LimitKind::RequestsPerMinute);
    assert_eq!(
        refusal.retry_after,
        Some(secs(1)),
        "one request refills per second"
    );
    let headers = refusal.render_headers();
    assert!(
        headers.contains(&("retry-after", "1".into())),
        "{headers:?}"
    );
    assert!(headers.contains(&("x-ratelimit-limit-requests", "60".into())));
    assert!(headers.contains(&("x-ratelimit-remaining-requests", "0".into())));
    assert!(headers.contains(&("x-ratelimit-reset-requests", "1m0s".into())));
    // Not a fixed window: one more after one second, not sixty after a minute.
    let r = b.reserve(tenant("a"), est(1, 1), t0 + secs(1)).unwrap();
    b.rollback(r, t0 + secs(1));
    assert!(
        b.reserve(tenant("a"), est(1, 1), t0 + Duration::from_millis(1999))
            .is_ok()
    );
    assert!(
        b.reserve(tenant("a"), est(1, 1), t0 + Duration::from_millis(1999))
            .is_err()
    );
}

#[test]
fn tokens_per_minute_hold_the_estimate_and_commit_returns_the_rest() {
    let t0 = t("2026-05-04T10:00:00Z");
    let b = budget(
        "[[tenant]]\nname = \"a\"\ntokens_per_minute = { max = 1000 }",
        t0,
    );
    let first = b.reserve(tenant("a"), est(100, 500), t0).unwrap();
    let refusal = b.reserve(tenant("a"), est(100, 400), t0).unwrap_err();
    assert_eq!(refusal.kind, LimitKind::TokensPerMinute);
    assert_eq!(refusal.remaining, 400);
    // 100 tokens short at 1000/min: 6 s.
    assert_eq!(refusal.retry_after, Some(secs(6)));
    let settled = b.commit(
        first,
        Usage {
            prompt_tokens: 100,
            completion_tokens: 200,
            ..Usage::default()
        },
        t0,
    );
    assert_eq!(settled.released_tokens, 300);
    assert_eq!(settled.excess_tokens, 0);
    assert!(b.reserve(tenant("a"), est(100, 400), t0).is_ok());
    let h = b.headers(tenant("a"), t0).tokens.unwrap();
    assert_eq!((h.limit, h.remaining), (1000, 200));
}

const BERLIN_DAY: &str = r#"
timezone = "Europe/Berlin"
[[tenant]]
name = "a"
tokens_per_day = { max = 1000 }
"#;

#[test]
fn tokens_per_day_roll_over_at_local_midnight() {
    // 23:30 in Berlin (CEST, UTC+2) on 2026-07-14.
    let evening = t("2026-07-14T21:30:00Z");
    let b = budget(BERLIN_DAY, evening);
    let r = b.reserve(tenant("a"), est(400, 600), evening).unwrap();
    b.commit(r, used(1000), evening);
    let last_second = t("2026-07-14T21:59:59Z");
    let refusal = b.reserve(tenant("a"), est(1, 0), last_second).unwrap_err();
    assert_eq!(refusal.kind, LimitKind::TokensPerDay);
    assert_eq!(
        refusal.retry_after,
        Some(secs(1)),
        "until local midnight, not UTC's"
    );
    // Local midnight is 22:00 UTC: the new day has the full budget.
    let midnight = t("2026-07-14T22:00:00Z");
    let r = b.reserve(tenant("a"), est(400, 600), midnight).unwrap();
    b.commit(r, used(1000), midnight);
    assert!(b.reserve(tenant("a"), est(1, 0), midnight).is_err());
}

#[test]
fn a_dst_day_is_23_hours_long() {
    // 2026-03-29 01:00 in Berlin (CET, UTC+1); at 02:00 clocks jump to 03:00.
    let early = t("2026-03-29T00:00:00Z");
    let b = budget(BERLIN_DAY, early);
    let r = b.reserve(tenant("a"), est(1000, 0), early).unwrap();
    b.commit(r, used(1000), early);
    let refusal = b.reserve(tenant("a"), est(1, 0), early).unwrap_err();
    // Midnight of the 30th in CEST is 22:00 UTC on the 29th: 22 h away, not 23.
    assert_eq!(refusal.retry_after, Some(secs(22 * 3600)));
    assert!(
        b.reserve(tenant("a"), est(1, 0), t("2026-03-29T21:59:59Z"))
            .is_err()
    );
    assert!(
        b.reserve(tenant("a"), est(1, 0), t("2026-03-29T22:00:00Z"))
            .is_ok()
    );
    // The autumn day has 25 hours (22:00 UTC on the 24th to 23:00 UTC on the
    // 25th): from 02:30 CEST (00:30 UTC) the window has 22.5 h left.
    let autumn = t("2026-10-25T00:30:00Z");
    let reset_in = status(&b, autumn, &scope("a"), LimitKind::TokensPerDay).reset_in;
    assert_eq!(reset_in, secs(22 * 3600 + 1800));
}

#[test]
fn tokens_per_month_roll_over_at_the_local_month_end() {
    let text =
        "timezone = \"Europe/Berlin\"\n[[tenant]]\nname = \"a\"\ntokens_per_month = { max = 5000 }";
    let mid = t("2026-01-15T12:00:00Z");
    let b = budget(text, mid);
    let r = b.reserve(tenant("a"), est(5000, 0), mid).unwrap();
    b.commit(r, used(5000), mid);
    // 23:59:59 on Jan 31 in Berlin (UTC+1) is 22:59:59 UTC.
    let refusal = b
        .reserve(tenant("a"), est(1, 0), t("2026-01-31T22:59:59Z"))
        .unwrap_err();
    assert_eq!(refusal.kind, LimitKind::TokensPerMonth);
    assert_eq!(refusal.retry_after, Some(secs(1)));
    // In UTC it is still January, in Berlin it is February: a fresh month.
    assert!(
        b.reserve(tenant("a"), est(5000, 0), t("2026-01-31T23:00:00Z"))
            .is_ok()
    );
}

#[test]
fn money_limits_count_micro_dollars_per_day_and_month() {
    let text = r#"
timezone = "America/New_York"
[[tenant]]
name = "a"
money_per_day = { max = "1.00" }
money_per_month = { max = "1.50" }
"#;
    let day1 = t("2026-05-04T15:00:00Z");
    let b = budget(text, day1);
    let cost = |micros| Estimate {
        cost_micros: micros,
        ..est(10, 10)
    };
    let r = b.reserve(tenant("a"), cost(900_000), day1).unwrap();
    let refusal = b.reserve(tenant("a"), cost(200_000), day1).unwrap_err();
    assert_eq!(
        (refusal.kind, refusal.remaining),
        (LimitKind::MoneyPerDay, 100_000)
    );
    assert!(
        refusal.message().contains("limit $1.00, remaining $0.10"),
        "{}",
        refusal.message()
    );
    let settled = b.commit(
        r,
        Usage {
            cost_micros: 700_000,
            ..used(20)
        },
        day1,
    );
    assert_eq!(settled.released_micros, 200_000);
    assert!(b.reserve(tenant("a"), cost(300_000), day1).is_ok());
    // Next day: the day cap is fresh, but the month has only $0.50 left.
    let day2 = t("2026-05-05T15:00:00Z");
    let refusal = b.reserve(tenant("a"), cost(600_000), day2).unwrap_err();
    assert_eq!(
        (refusal.kind, refusal.remaining),
        (LimitKind::MoneyPerMonth, 500_000)
    );
    assert_eq!(
        refusal.headers,
        b.headers(tenant("a"), day2),
        "no request or token limits: no headers"
    );
    assert_eq!(refusal.headers, RateLimitHeaders::default());
}

#[test]
fn soft_limits_let_through_and_alert_once_per_window() {
    let text = r#"
alert_fractions = [0.5, 0.8]
[[tenant]]
name = "a"
tokens_per_day = { max = 1000, mode = "soft" }
"#;
    let t0 = t("2026-05-04T08:00:00Z");
    let b = budget(text, t0);
    let mut fired = Vec::new();
    for i in 0..15 {
        let now = t0 + secs(i);
        let r = b
            .reserve(tenant("a"), est(100, 0), now)
            .expect("soft limits never refuse");
        b.commit(r, used(100), now);
        fired.extend(
            b.take_alerts()
                .into_iter()
                .map(|a| (i, a.threshold_permille)),
        );
    }
    // 500 after the 5th, 800 after the 8th, the limit after the 10th: once each.
    assert_eq!(fired, vec![(4, 500), (7, 800), (9, 1000)]);
    assert_eq!(
        status(&b, t0, &scope("a"), LimitKind::TokensPerDay).used,
        1500
    );
    // The next day is a new window: the alerts are armed again.
    let tomorrow = t("2026-05-05T08:00:00Z");
    for _ in 0..5 {
        let r = b.reserve(tenant("a"), est(100, 0), tomorrow).unwrap();
        b.commit(r, used(100), tomorrow);
    }
    let alerts = b.take_alerts();
    assert_eq!(alerts.len(), 1);
    assert_eq!(
        (alerts[0].threshold_permille, alerts[0].used, alerts[0].hard),
        (500, 500, false)
    );
    assert!(
        alerts[0]
            .to_string()
            .contains("tenant a tokens_per_day (soft) at 50.0%"),
        "{}",
        alerts[0]
    );
}

#[test]
fn hard_limits_refuse_and_alert_at_the_limit_once() {
    let text =
        "alert_fractions = [0.9]\n[[tenant]]\nname = \"a\"\ntokens_per_minute = { max = 100 }";
    let t0 = t("2026-05-04T08:00:00Z");
    let b = budget(text, t0);
    let r = b.reserve(tenant("a"), est(100, 0), t0).unwrap();
    b.commit(r, used(100), t0);
    assert!(b.reserve(tenant("a"), est(1, 0), t0).is_err());
    let alerts: Vec<_> = b
        .take_alerts()
        .iter()
        .map(|a| a.threshold_permille)
        .collect();
    assert_eq!(alerts, vec![900, 1000]);
    // Smooth limits stay silent for one period after firing ...
    let later = t0 + secs(30);
    let r = b.reserve(tenant("a"), est(50, 0), later).unwrap();
    b.commit(r, used(50), later);
    assert!(b.take_alerts().is_empty());
    // ... and fire again after it (the bucket is empty again 60 s after 30 s).
    let next = t0 + secs(90);
    let r = b.reserve(tenant("a"), est(100, 0), next).unwrap();
    b.commit(r, used(100), next);
    assert_eq!(b.take_alerts().len(), 2);
}

#[test]
fn a_refused_hard_limit_alerts_once_per_window() {
    let t0 = t("2026-05-04T08:00:00Z");
    let b = budget(
        "alert_fractions = [0.5]\n[[tenant]]\nname = \"a\"\ntokens_per_day = { max = 1000 }",
        t0,
    );
    let r = b.reserve(tenant("a"), est(700, 0), t0).unwrap();
    b.commit(r, used(700), t0);
    assert_eq!(
        b.take_alerts()
            .iter()
            .map(|a| a.threshold_permille)
            .collect::<Vec<_>>(),
        [500]
    );
    // 300 left: a request for 400 is refused; that is the limit reached.
    for _ in 0..3 {
        assert!(b.reserve(tenant("a"), est(400, 0), t0).is_err());
    }
    let alerts = b.take_alerts();
    assert_eq!(alerts.len(), 1, "once, not per refused request: {alerts:?}");
    assert_eq!(
        (alerts[0].threshold_permille, alerts[0].used, alerts[0].hard),
        (1000, 700, true)
    );
    let tomorrow = t("2026-05-05T08:00:00Z");
    let r = b.reserve(tenant("a"), est(1000, 0), tomorrow).unwrap();
    b.commit(r, used(1000), tomorrow);
    assert!(b.reserve(tenant("a"), est(1, 0), tomorrow).is_err());
    let fired: Vec<_> = b
        .take_alerts()
        .iter()
        .map(|a| a.threshold_permille)
        .collect();
    assert_eq!(
        fired,
        [500, 1000],
        "a new window, armed again; reaching it and refusing is one alert"
    );
}

#[test]
fn budget_and_ledger_can_be_shared_across_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<Budget>();
    shared::<crate::ledger::Ledger>();
}

#[test]
fn keys_and_pools_are_all_or_nothing_with_the_tenant() {
    let text = r#"
[[tenant]]
name = "a"
tokens_per_day = { max = 10000 }
[[tenant.key]]
id = "bot"
tokens_per_day = { max = 300 }
[[tenant]]
name = "b"
tokens_per_day = { max = 10000 }
[[pool]]
backend = "cloud"
requests_per_minute = { max = 2 }
tokens_per_day = { max = 1000 }
"#;
    let t0 = t("2026-05-04T08:00:00Z");
    let b = budget(text, t0);
    let bot = Subject {
        tenant: "a",
        api_key: Some("bot"),
        backend: None,
    };
    let r = b.reserve(bot, est(200, 0), t0).unwrap();
    b.commit(r, used(200), t0);
    let refusal = b.reserve(bot, est(200, 0), t0).unwrap_err();
    assert_eq!(
        refusal.scope,
        Scope::Key {
            tenant: "a".into(),
            key: "bot".into()
        }
    );
    // The refusal charged nothing, not even the tenant's limit.
    assert_eq!(
        status(&b, t0, &scope("a"), LimitKind::TokensPerDay).used,
        200
    );
    // Another key of the tenant has only the tenant's limits.
    let other = Subject {
        api_key: Some("human"),
        ..bot
    };
    let r = b.reserve(other, est(200, 0), t0).unwrap();
    b.rollback(r, t0);
    // The pool is shared by both tenants, and its refusal charges no tenant.
    let cloud = |name| Subject {
        tenant: name,
        api_key: None,
        backend: Some("cloud"),
    };
    let r1 = b.reserve(cloud("a"), est(400, 0), t0).unwrap();
    let r2 = b.reserve(cloud("b"), est(400, 0), t0).unwrap();
    let refusal = b.reserve(cloud("b"), est(10, 0), t0).unwrap_err();
    assert_eq!(
        (refusal.scope.clone(), refusal.kind),
        (Scope::Pool("cloud".into()), LimitKind::RequestsPerMinute)
    );
    assert_eq!(
        status(&b, t0, &scope("b"), LimitKind::TokensPerDay).used,
        400
    );
    b.commit(r1, used(400), t0);
    b.commit(r2, used(400), t0);
    // Unknown tenants and backends have no limits.
    assert!(b.reserve(tenant("nobody"), est(1 << 40, 0), t0).is_ok());
    // Pool scarcity: the rolling day has 200 of 1000 left, the minute 0 of 2.
    let s = b.pool_scarcity("cloud", t0).unwrap();
    assert_eq!(
        (s.kind, s.remaining_fraction),
        (LimitKind::RequestsPerMinute, 0.0)
    );
    assert_eq!(s.reset_in, secs(60));
    let s = b.pool_scarcity("cloud", t0 + secs(60)).unwrap();
    // A minute drains 1000/1440 of a token: still 800 used (rounded up), and
    // the last of it is gone 69 060 s from now.
    assert_eq!(
        (s.kind, s.remaining_fraction),
        (LimitKind::TokensPerDay, 0.2)
    );
    assert_eq!(s.reset_in, secs(69_060));
    assert!(b.pool_scarcity("local", t0).is_none());
}

#[test]
fn rollback_releases_everything_and_a_cancelled_stream_commits_what_it_used() {
    let text = "[[tenant]]\nname = \"a\"\nrequests_per_minute = { max = 10 }\ntokens_per_day = { max = 5000 }";
    let t0 = t("2026-05-04T08:00:00Z");
    let b = budget(text, t0);
    let r = b.reserve(tenant("a"), est(100, 1000), t0).unwrap();
    assert_eq!(
        status(&b, t0, &scope("a"), LimitKind::TokensPerDay).in_flight,
        1100
    );
    b.rollback(r, t0);
    for kind in [LimitKind::RequestsPerMinute, LimitKind::TokensPerDay] {
        assert_eq!(status(&b, t0, &scope("a"), kind).used, 0, "{kind:?}");
    }
    // A stream cancelled after 50 completion tokens: the rest goes back.
    let r = b.reserve(tenant("a"), est(100, 1000), t0).unwrap();
    let partial = Usage {
        prompt_tokens: 100,
        completion_tokens: 50,
        cached_tokens: 60,
        cost_micros: 0,
    };
    let settled = b.commit(r, partial, t0);
    assert_eq!(settled.released_tokens, 950);
    let s = status(&b, t0, &scope("a"), LimitKind::TokensPerDay);
    assert_eq!(
        (s.used, s.in_flight),
        (150, 0),
        "cached tokens are part of the prompt"
    );
    assert_eq!(
        status(&b, t0, &scope("a"), LimitKind::RequestsPerMinute).used,
        1
    );
}

#[test]
fn usage_belongs_to_the_window_it_was_reserved_in() {
    let before = t("2026-05-04T21:59:00Z"); // 23:59 in Berlin
    let after = t("2026-05-04T22:01:00Z"); // 00:01
    let b = budget(BERLIN_DAY, before);
    let r = b.reserve(tenant("a"), est(100, 500), before).unwrap();
    b.commit(r, used(600), after);
    let s = status(&b, after, &scope("a"), LimitKind::TokensPerDay);
    assert_eq!((s.used, s.in_flight), (0, 0), "the new day starts clean");
}

#[test]
fn a_request_larger_than_the_limit_never_fits() {
    let t0 = t("2026-05-04T08:00:00Z");
    let b = budget(
        "[[tenant]]\nname = \"a\"\ntokens_per_minute = { max = 100 }",
        t0,
    );
    let refusal = b.reserve(tenant("a"), est(50, 51), t0).unwrap_err();
    assert_eq!(refusal.retry_after, None);
    assert!(
        !refusal
            .render_headers()
            .iter()
            .any(|(k, _)| *k == "retry-after")
    );
    assert!(
        refusal.message().contains("Reduce max_tokens"),
        "{}",
        refusal.message()
    );
    // Without max_tokens the configured cap is what is reserved.
    let capped = budget(
        "default_output_cap = 60\n[[tenant]]\nname = \"a\"\ntokens_per_minute = { max = 100 }",
        t0,
    );
    let no_max = Estimate {
        prompt_tokens: 50,
        max_output_tokens: None,
        cost_micros: 0,
    };
    assert!(capped.reserve(tenant("a"), no_max, t0).is_err());
    let r = capped
        .reserve(
            tenant("a"),
            Estimate {
                prompt_tokens: 40,
                ..no_max
            },
            t0,
        )
        .unwrap();
    assert_eq!((r.output_allowance(), r.tokens()), (60, 100));
    capped.rollback(r, t0);
}

#[test]
fn the_kernel_mirror_shows_the_tightest_window_and_blocks_spent_tenants() {
    let text = r#"
[[tenant]]
name = "shed"
shed_at_edge = true
tokens_per_minute = { max = 10000 }
tokens_per_day = { max = 1000 }
[[tenant]]
name = "keep"
tokens_per_day = { max = 1000 }
[[tenant]]
name = "free"
"#;
    let t0 = t("2026-05-04T08:00:00Z");
    let b = budget(text, t0);
    for name in ["shed", "keep"] {
        let r = b.reserve(tenant(name), est(1000, 0), t0).unwrap();
        b.commit(r, used(1000), t0);
    }
    let mirror = b.kernel_mirror(t0);
    let row = |name: &str| mirror.iter().find(|m| m.tenant == name).unwrap().state;
    assert_eq!(
        mirror.iter().map(|m| m.tenant.as_str()).collect::<Vec<_>>(),
        ["free", "keep", "shed"]
    );
    // 1000/1000 per day is tighter than 1000/10000 per minute.
    assert_eq!(
        (
            row("shed").tokens_used,
            row("shed").tokens_limit,
            row("shed").blocked
        ),
        (1000, 1000, 1)
    );
    assert_eq!(
        row("keep").blocked,
        0,
        "not shed at the edge unless configured"
    );
    assert_eq!((row("free").tokens_used, row("free").tokens_limit), (0, 0));
    // A new day unblocks.
    let tomorrow = t("2026-05-05T08:00:00Z");
    let row = b
        .kernel_mirror(tomorrow)
        .into_iter()
        .find(|m| m.tenant == "shed")
        .unwrap()
        .state;
    assert_eq!((row.tokens_used, row.blocked), (0, 0));
}

#[test]
fn restore_brings_back_calendar_windows_exactly_and_buckets_conservatively() {
    let text = r#"
timezone = "Europe/Berlin"
alert_fractions = [0.5]
[[tenant]]
name = "a"
tokens_per_minute = { max = 600 }
tokens_per_day = { max = 10000 }
money_per_month = { max = "10" }
"#;
    let now = t("2026-05-04T10:00:00Z");
    let b = budget(text, now);
    let plan = b.restore_plan(now);
    assert_eq!(plan.month_start, t("2026-04-30T22:00:00Z"));
    assert_eq!(plan.day_start, t("2026-05-03T22:00:00Z"));
    assert_eq!(
        (plan.rows_from, plan.minutes_from, plan.since),
        (now - secs(60), now - secs(60), plan.month_start)
    );
    let row = |at: Timestamp, tokens, micros| RestoredUsage {
        tenant: "a".into(),
        api_key: None,
        backend: "local".into(),
        at,
        requests: 1,
        tokens,
        cost_micros: micros,
    };
    b.restore(
        vec![
            row(t("2026-04-30T21:59:59Z"), 999, 9_000_000), // last month: ignored
            row(t("2026-05-02T10:00:00Z"), 3000, 1_000_000), // this month, not today
            row(now - secs(30), 600, 0),                    // today, in the last minute
            row(now - secs(3600), 2000, 2_000_000),         // today, an hour ago
        ],
        now,
    );
    let s = |k| status(&b, now, &scope("a"), k).used;
    assert_eq!(s(LimitKind::TokensPerDay), 2600);
    assert_eq!(s(LimitKind::MoneyPerMonth), 3_000_000);
    // The hour-old row counts as a bucket that was full a minute ago, which
    // holds back the drain of the 30 s old row: all 600 still count (the
    // truth lies between 300 and 600: never less).
    assert_eq!(s(LimitKind::TokensPerMinute), 600);
    assert!(
        b.take_alerts().is_empty(),
        "restored thresholds do not alert again"
    );
    // Without older history the replay is exact: 600 − 30 s × 10/s.
    let fresh = budget(text, now);
    fresh.restore(vec![row(now - secs(30), 600, 0)], now);
    assert_eq!(
        status(&fresh, now, &scope("a"), LimitKind::TokensPerMinute).used,
        300
    );
}

/// A deterministic generator for the concurrency tests (no RNG crate needed).
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

struct Outcome {
    committed_tokens: u64,
    committed_micros: u64,
    admitted: u64,
    max_in_flight: usize,
}

/// 256 threads reserve against one tenant at once and hold their reservations
/// until all 256 have tried (256 truly concurrent reservations), then keep
/// going until each is refused. The clock stays inside one day, so the day
/// budgets are what bind. `actual` draws a completion length for a request
/// that reserved `allowance`.
fn hammer(b: Arc<Budget>, max_tokens: Option<u64>, actual: fn(&mut u64, u64) -> u64) -> Outcome {
    const THREADS: usize = 256;
    const PRICE_MICROS: u64 = 2; // per token
    let start = Arc::new(Barrier::new(THREADS));
    let all_reserved = Arc::new(Barrier::new(THREADS));
    let tokens = Arc::new(AtomicU64::new(0));
    let micros = Arc::new(AtomicU64::new(0));
    let admitted = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    let t0 = t("2026-05-04T08:00:00Z");
    let handles: Vec<_> = (0..THREADS)
        .map(|i| {
            let (b, start, tokens, micros) =
                (b.clone(), start.clone(), tokens.clone(), micros.clone());
            let admitted = admitted.clone();
            let (in_flight, max_in_flight) = (in_flight.clone(), max_in_flight.clone());
            let all_reserved = all_reserved.clone();
            thread::spawn(move || {
                let mut rng = 0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1);
                start.wait();
                for step in 0u64.. {
                    let now = t0 + Duration::from_millis(step);
                    let prompt = 50 + xorshift(&mut rng) % 200;
                    let allowance = b.output_allowance(max_tokens);
                    let estimate = Estimate {
                        prompt_tokens: prompt,
                        max_output_tokens: max_tokens,
                        cost_micros: (prompt + allowance) * PRICE_MICROS,
                    };
                    let reserved = b.reserve(tenant("a"), estimate, now);
                    if reserved.is_ok() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                        let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        max_in_flight.fetch_max(n, Ordering::SeqCst);
                    }
                    if step == 0 {
                        all_reserved.wait();
                    } else {
                        thread::yield_now(); // let others reserve while this one "streams"
                    }
                    let Ok(r) = reserved else {
                        return;
                    };
                    let completion = actual(&mut rng, allowance);
                    let usage = Usage {
                        prompt_tokens: prompt,
                        completion_tokens: completion,
                        cached_tokens: 0,
                        cost_micros: (prompt + completion) * PRICE_MICROS,
                    };
                    tokens.fetch_add(usage.tokens(), Ordering::SeqCst);
                    micros.fetch_add(usage.cost_micros, Ordering::SeqCst);
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    b.commit(r, usage, now);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    Outcome {
        committed_tokens: tokens.load(Ordering::SeqCst),
        committed_micros: micros.load(Ordering::SeqCst),
        admitted: admitted.load(Ordering::SeqCst),
        max_in_flight: max_in_flight.load(Ordering::SeqCst),
    }
}

fn hard_day(money: &str) -> String {
    format!(
        "default_output_cap = 256\n[[tenant]]\nname = \"a\"\n\
         tokens_per_day = {{ max = 60000 }}\nmoney_per_day = {{ max = \"{money}\" }}"
    )
}

#[test]
fn concurrent_reservations_never_exceed_a_hard_budget_with_max_tokens() {
    let t0 = t("2026-05-04T08:00:00Z");
    // Money (2 µ$ a token) and tokens bind at about the same point.
    let b = Arc::new(budget(&hard_day("0.12"), t0));
    // Completions anywhere in [0, max_tokens].
    let out = hammer(b.clone(), Some(800), |rng, allowance| {
        xorshift(rng) % (allowance + 1)
    });
    // All 256 reserve at once before anyone commits: at least the 57 that fit
    // 60 000 tokens at up to 1 049 each get in (how many more depends on how
    // the threads interleave later).
    assert!(
        out.admitted >= 57,
        "the budget was shared by many requests: {}",
        out.admitted
    );
    assert!(
        out.committed_tokens <= 60_000,
        "tokens {} over the hard limit",
        out.committed_tokens
    );
    assert!(
        out.committed_micros <= 120_000,
        "micros {} over the hard limit",
        out.committed_micros
    );
    // The budget's own books agree with what the threads committed.
    let s = |k| status(&b, t0, &scope("a"), k);
    let day = s(LimitKind::TokensPerDay);
    assert_eq!((day.used, day.in_flight), (out.committed_tokens, 0));
    assert_eq!(s(LimitKind::MoneyPerDay).used, out.committed_micros);
    println!(
        "max_tokens given: {} admitted, max {} in flight, committed {} of 60000 tokens, {} of 120000 µ$",
        out.admitted, out.max_in_flight, out.committed_tokens, out.committed_micros
    );
}

#[test]
fn without_max_tokens_the_overshoot_stays_within_the_stated_bound() {
    // The model may write up to 1024 tokens although 256 were reserved.
    const MODEL_MAX_OUTPUT: u64 = 1024;
    let t0 = t("2026-05-04T08:00:00Z");
    // Money is generous here, so the token limit is what binds.
    let b = Arc::new(budget(&hard_day("1.00"), t0));
    let out = hammer(b.clone(), None, |rng, _| {
        xorshift(rng) % (MODEL_MAX_OUTPUT + 1)
    });
    // Module docs: overshoot ≤ in_flight × (model_max_output − default_output_cap).
    let bound = out.max_in_flight as u64 * (MODEL_MAX_OUTPUT - 256);
    let overshoot = out.committed_tokens.saturating_sub(60_000);
    assert!(
        overshoot <= bound,
        "overshoot {overshoot} tokens > bound {bound} (max in flight {})",
        out.max_in_flight
    );
    // Reservations held: each holds at least 50 + 256 tokens, so no more than
    // the limit's worth can be outstanding at once (a leak would grow this, and
    // with it the bound above).
    assert!(
        out.max_in_flight as u64 * (50 + 256) <= 60_000,
        "{} in flight at once",
        out.max_in_flight
    );
    assert_eq!(
        status(&b, t0, &scope("a"), LimitKind::TokensPerDay).used,
        out.committed_tokens
    );
    println!(
        "no max_tokens: {} admitted, max {} in flight, overshoot {overshoot} tokens (bound {bound})",
        out.admitted, out.max_in_flight
    );
}

#[test]
fn without_max_tokens_the_money_overshoot_stays_within_the_stated_bound() {
    const MODEL_MAX_OUTPUT: u64 = 1024;
    let t0 = t("2026-05-04T08:00:00Z");
    // $0.10 at 2 µ$ a token binds before the 60 000-token limit.
    let b = Arc::new(budget(&hard_day("0.10"), t0));
    let out = hammer(b.clone(), None, |rng, _| {
        xorshift(rng) % (MODEL_MAX_OUTPUT + 1)
    });
    let bound = out.max_in_flight as u64 * (MODEL_MAX_OUTPUT - 256) * 2;
    let overshoot = out.committed_micros.saturating_sub(100_000);
    assert!(
        overshoot <= bound,
        "money overshoot {overshoot} µ$ > bound {bound} µ$"
    );
    assert_eq!(
        status(&b, t0, &scope("a"), LimitKind::MoneyPerDay).used,
        out.committed_micros
    );
}
