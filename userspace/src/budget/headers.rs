//! OpenAI-style rate-limit headers: `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`
//! and `retry-after`, rendered from the budget's view of a subject.

use std::time::Duration;

/// One limit as the headers describe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderSet {
    pub limit: u64,
    pub remaining: u64,
    /// Time until the limit is fully available again.
    pub reset: Duration,
}

/// The tightest request limit and the tightest token limit that apply to a
/// subject (the ones with the least remaining); `None` where none is configured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimitHeaders {
    pub requests: Option<HeaderSet>,
    pub tokens: Option<HeaderSet>,
}

impl RateLimitHeaders {
    /// `(name, value)` pairs, lower-case names, ready for any HTTP library.
    pub fn render(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(r) = self.requests {
            out.push(("x-ratelimit-limit-requests", r.limit.to_string()));
            out.push(("x-ratelimit-remaining-requests", r.remaining.to_string()));
            out.push(("x-ratelimit-reset-requests", format_reset(r.reset)));
        }
        if let Some(t) = self.tokens {
            out.push(("x-ratelimit-limit-tokens", t.limit.to_string()));
            out.push(("x-ratelimit-remaining-tokens", t.remaining.to_string()));
            out.push(("x-ratelimit-reset-tokens", format_reset(t.reset)));
        }
        out
    }
}

/// `Retry-After` in whole seconds, rounded up and at least 1 (0 would invite
/// an immediate retry that is refused again).
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_nanos().div_ceil(1_000_000_000).max(1) as u64
}

/// A duration the way OpenAI writes resets: `20ms`, `1s`, `6m0s`, `1h2m3s`
/// (whole seconds rounded up once it is a second or more).
pub fn format_reset(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_nanos().div_ceil(1_000_000));
    }
    let secs = d.as_nanos().div_ceil(1_000_000_000);
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_and_retry_after_round_up() {
        assert_eq!(format_reset(Duration::from_micros(19_500)), "20ms");
        assert_eq!(format_reset(Duration::from_secs(1)), "1s");
        assert_eq!(format_reset(Duration::from_millis(359_001)), "6m0s");
        assert_eq!(format_reset(Duration::from_secs(3723)), "1h2m3s");
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
    }

    #[test]
    fn renders_only_the_configured_halves() {
        let h = RateLimitHeaders {
            requests: None,
            tokens: Some(HeaderSet {
                limit: 1000,
                remaining: 10,
                reset: Duration::from_secs(6),
            }),
        };
        assert_eq!(
            h.render(),
            vec![
                ("x-ratelimit-limit-tokens", "1000".to_string()),
                ("x-ratelimit-remaining-tokens", "10".to_string()),
                ("x-ratelimit-reset-tokens", "6s".to_string()),
            ]
        );
    }
}
