//! Token and money budgets: reserve before forwarding, commit the real usage
//! after, never overshoot a hard limit. Pure decision logic: no I/O, no clock
//! (every call takes `now`), thread-safe (`Budget` is `Send + Sync`; share it
//! in an `Arc`).
//!
//! # Interface for the request path
//!
//! ```text
//! let budget = Budget::new(&cfg.budget, Timestamp::now())?;     // at start
//! ledger::rebuild(&cfg.budget.ledger.path, &budget, now)?;      // before serving
//! // per request:
//! let est = Estimate { prompt_tokens, max_output_tokens, cost_micros };
//! match budget.reserve(Subject { tenant, api_key, backend }, est, now) {
//!     Err(refusal) => 429 + refusal.render_headers() + refusal.message(),
//!     Ok(r) => { forward (max_tokens = r.output_allowance() is the safe choice);
//!                budget.commit(r, usage_so_far, now)     // done, failed after
//!                                                         // tokens, or cancelled
//!                or budget.rollback(r, now) }             // nothing was used
//! }
//! budget.take_alerts()      // periodically: log + metric + webhook
//! budget.kernel_mirror(now) // periodically: into the TENANTS map
//! budget.pool_scarcity(backend, now) // routing
//! ```
//!
//! Every `Reservation` must end in exactly one `commit` or `rollback` (the
//! type is `#[must_use]` and not `Clone`); a reservation leaked by a dropped
//! future keeps its hold until its calendar window ends or its bucket drains,
//! so the caller should hold it in a guard that rolls back on drop.
//!
//! # What is counted
//!
//! A request draws, from every limit that applies to it (its tenant's, its API
//! key's if configured, its backend pool's if configured): 1 request, tokens =
//! prompt + completion (`cached` tokens are part of the prompt and reported
//! for the ledger, not counted twice), and its cost in integer micro-dollars.
//! The reservation holds prompt + `max_tokens` (or `default_output_cap` when
//! the request has none) and the estimated cost; commit replaces that with the
//! real usage and returns the unused part.
//!
//! Usage belongs to the calendar window in which it was reserved (a request
//! started at 23:59 and finished at 00:01 counts for the old day); the ledger
//! rebuild uses the same rule (its `started` column).
//!
//! # The overshoot bound
//!
//! Reserve admits only if committed + held + estimate fits every hard limit,
//! all under one lock, so with exact estimates no hard limit is ever exceeded.
//! Commit can add more than was held only where usage exceeds the estimate:
//! - with `max_tokens` given, completion ≤ max_tokens, so never (prompt counts
//!   are exact when the caller tokenizes as the backend does);
//! - without it, a completion may run past `default_output_cap` unless the
//!   proxy forwards `max_tokens = output_allowance()` (then again never). If it
//!   does not, a hard token limit is exceeded by at most
//!   `in_flight × (model_max_output − default_output_cap)`, where `in_flight`
//!   is the number of reservations outstanding when the last one was admitted:
//!   everything admitted earlier is already inside the limit, and only those
//!   outstanding can still grow. Money limits likewise, priced per token.
//!   After an overshoot the limit refuses until the excess has drained
//!   (smooth) or the window ends (calendar). A prompt estimate below the real
//!   prompt adds its shortfall to the bound.
//!
//! # Alerts
//!
//! Each limit alerts when committed usage crosses one of `alert_fractions`
//! and when it reaches the limit (threshold 1000 ‰; for a hard limit also its
//! first refusal), each once per window: per calendar window, or once per
//! period for smooth buckets. [`Budget::take_alerts`] hands them over.
//!
//! # Windows
//!
//! Per-minute limits (and a pool's per-day limits, like the providers') are
//! debt-capable token buckets refilling continuously; tenant and key day and
//! month limits, and money caps, are calendar windows in `timezone` (a DST day
//! has 23 or 25 hours). One `Mutex` guards all state: every call is a few
//! map lookups and integer operations, never I/O.

mod config;
mod headers;
mod meter;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    fmt,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use jiff::{Timestamp, tz::TimeZone};
use kedge_common::TenantState;
use smallvec::SmallVec;

use crate::idhash::IdHasher;

pub use config::{
    BudgetConfig, BudgetConfigError, Dollars, KeyBudget, Limit, Mode, PoolBudget, TenantBudget,
    format_dollars, parse_dollars,
};
pub use headers::{HeaderSet, RateLimitHeaders, format_reset, retry_after_secs};
use meter::{CalendarCounter, Period, SmoothBucket};
pub use meter::{Window, day_window, month_window};

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);
/// The implicit alert threshold: the limit itself.
const FULL: u32 = 1000;

/// What a limit limits and over which window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitKind {
    RequestsPerMinute,
    TokensPerMinute,
    /// Pools only: rolling 24 h, refilling at the provider's rate.
    RequestsPerDay,
    /// Tenants and keys: the calendar day; pools: rolling 24 h.
    TokensPerDay,
    TokensPerMonth,
    MoneyPerDay,
    MoneyPerMonth,
}

/// The unit a limit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measure {
    Requests,
    Tokens,
    /// Micro-dollars.
    Money,
}

impl LimitKind {
    /// The config key, also used as a metric label.
    pub fn label(self) -> &'static str {
        match self {
            LimitKind::RequestsPerMinute => "requests_per_minute",
            LimitKind::TokensPerMinute => "tokens_per_minute",
            LimitKind::RequestsPerDay => "requests_per_day",
            LimitKind::TokensPerDay => "tokens_per_day",
            LimitKind::TokensPerMonth => "tokens_per_month",
            LimitKind::MoneyPerDay => "money_per_day",
            LimitKind::MoneyPerMonth => "money_per_month",
        }
    }

    pub fn measure(self) -> Measure {
        match self {
            LimitKind::RequestsPerMinute | LimitKind::RequestsPerDay => Measure::Requests,
            LimitKind::TokensPerMinute | LimitKind::TokensPerDay | LimitKind::TokensPerMonth => {
                Measure::Tokens
            }
            LimitKind::MoneyPerDay | LimitKind::MoneyPerMonth => Measure::Money,
        }
    }

    /// A day/month budget of a tenant or key (what `shed_at_edge` acts on).
    pub(crate) fn is_calendar_budget(self) -> bool {
        matches!(
            self,
            LimitKind::TokensPerDay
                | LimitKind::TokensPerMonth
                | LimitKind::MoneyPerDay
                | LimitKind::MoneyPerMonth
        )
    }
}

/// Who a limit belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    Tenant(String),
    Key { tenant: String, key: String },
    Pool(String),
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Tenant(t) => write!(f, "tenant {t}"),
            Scope::Key { tenant, key } => write!(f, "key {tenant}/{key}"),
            Scope::Pool(b) => write!(f, "pool {b}"),
        }
    }
}

/// Who a request is charged to. Unconfigured names simply have no limits.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    pub tenant: &'a str,
    /// The API key's id (never the secret).
    pub api_key: Option<&'a str>,
    /// The backend the request will go to (its pool, if one is configured).
    pub backend: Option<&'a str>,
}

/// What a request may use, known before forwarding it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Estimate {
    pub prompt_tokens: u64,
    /// The request's `max_tokens`; `None` reserves `default_output_cap`.
    pub max_output_tokens: Option<u64>,
    /// Price of prompt + allowed output on the chosen backend, micro-dollars.
    pub cost_micros: u64,
}

/// What a request used, as the upstream reported it (or as far as a cancelled
/// stream got).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens served from the provider's cache (a subset of `prompt_tokens`).
    pub cached_tokens: u64,
    pub cost_micros: u64,
}

impl Usage {
    /// Tokens counted against limits.
    pub fn tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// One amount per [`Measure`].
#[derive(Clone, Copy, Debug)]
struct Charge {
    requests: u64,
    tokens: u64,
    micros: u64,
}

impl Charge {
    fn of(&self, m: Measure) -> u64 {
        match m {
            Measure::Requests => self.requests,
            Measure::Tokens => self.tokens,
            Measure::Money => self.micros,
        }
    }
}

#[derive(Debug)]
struct Hold {
    limit: usize,
    amount: u64,
    /// Calendar limits: the end of the window the hold was taken in.
    window_end: Option<Timestamp>,
}

/// Capacity held for one request until it is committed or rolled back.
#[must_use = "a reservation must be committed or rolled back"]
#[derive(Debug)]
pub struct Reservation {
    holds: SmallVec<[Hold; 4]>,
    estimate: Charge,
    output_allowance: u64,
    started: Timestamp,
}

impl Reservation {
    /// Completion tokens reserved: forward this as `max_tokens` to make the
    /// reservation an upper bound (no overshoot at all).
    pub fn output_allowance(&self) -> u64 {
        self.output_allowance
    }
    pub fn tokens(&self) -> u64 {
        self.estimate.tokens
    }
    pub fn cost_micros(&self) -> u64 {
        self.estimate.micros
    }
    /// When it was reserved: the window its usage belongs to.
    pub fn started(&self) -> Timestamp {
        self.started
    }
}

/// The outcome of a commit: what the estimate over- or under-stated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settlement {
    /// Reserved but not used: returned to every limit.
    pub released_tokens: u64,
    pub released_micros: u64,
    /// Used beyond the reservation (see the overshoot bound in the module docs).
    pub excess_tokens: u64,
    pub excess_micros: u64,
}

/// Why a request was refused: the binding limit (the one that frees up last)
/// and what to tell the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub scope: Scope,
    pub kind: LimitKind,
    pub limit: u64,
    pub remaining: u64,
    /// `None`: the request alone is larger than the limit and never fits.
    pub retry_after: Option<Duration>,
    pub headers: RateLimitHeaders,
}

impl Refusal {
    /// `retry-after` (when the request can ever fit) and the `x-ratelimit-*` headers.
    pub fn render_headers(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(wait) = self.retry_after {
            out.push(("retry-after", retry_after_secs(wait).to_string()));
        }
        out.extend(self.headers.render());
        out
    }

    /// A sentence for the OpenAI-style error body.
    pub fn message(&self) -> String {
        let amount = |v: u64| match self.kind.measure() {
            Measure::Money => format_dollars(v),
            _ => v.to_string(),
        };
        let mut m = format!(
            "{} limit {} reached for {}: limit {}, remaining {}.",
            if self.retry_after.is_some() {
                "Rate"
            } else {
                "Request exceeds"
            },
            self.kind.label(),
            self.scope,
            amount(self.limit),
            amount(self.remaining),
        );
        match self.retry_after {
            Some(w) => m.push_str(&format!(" Retry after {}.", format_reset(w))),
            None => m.push_str(" Reduce max_tokens or the prompt."),
        }
        m
    }
}

/// A threshold crossed: once per window per limit and threshold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub scope: Scope,
    pub kind: LimitKind,
    pub hard: bool,
    /// The threshold in per mille of the limit; 1000 = the limit itself.
    pub threshold_permille: u32,
    pub used: u64,
    pub limit: u64,
    /// Calendar limits: when the window (and the alert's silence) ends.
    pub window_end: Option<Timestamp>,
    pub at: Timestamp,
}

impl fmt::Display for Alert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let amount = |v: u64| match self.kind.measure() {
            Measure::Money => format_dollars(v),
            _ => v.to_string(),
        };
        write!(
            f,
            "{} {} ({}) at {}.{}% of its limit: {} of {}",
            self.scope,
            self.kind.label(),
            if self.hard { "hard" } else { "soft" },
            self.threshold_permille / 10,
            self.threshold_permille % 10,
            amount(self.used),
            amount(self.limit),
        )
    }
}

/// One limit's state, for `/metrics` and the CLI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitStatus {
    pub scope: Scope,
    pub kind: LimitKind,
    pub hard: bool,
    pub limit: u64,
    /// Charged in the current window, in-flight reservations included.
    pub used: u64,
    /// Calendar limits: the part of `used` that is still only reserved
    /// (smooth buckets do not tell the two apart: 0).
    pub in_flight: u64,
    /// Until the full limit is available again.
    pub reset_in: Duration,
}

/// How close a backend's pool is to exhausted, for routing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scarcity {
    /// The pool's scarcest limit.
    pub kind: LimitKind,
    /// 0.0 = exhausted, 1.0 = untouched.
    pub remaining_fraction: f64,
    /// Until that limit is fully available again.
    pub reset_in: Duration,
}

/// A tenant's row for the kernel's `TENANTS` map (keyed by the tenant's id,
/// which the caller derives from the name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantMirror {
    pub tenant: String,
    pub state: TenantState,
}

/// Which history [`Budget::restore`] needs, and at which grain it may be
/// aggregated without changing the result (beyond the stated conservatism).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestorePlan {
    /// Rows started before this are irrelevant.
    pub since: Timestamp,
    /// Calendar boundaries: no aggregate may span one of these.
    pub month_start: Timestamp,
    pub day_start: Timestamp,
    /// From here on, aggregate per minute at most (rolling-day pool buckets).
    pub minutes_from: Timestamp,
    /// From here on, row by row (per-minute buckets).
    pub rows_from: Timestamp,
}

/// Usage read back from the ledger on start, possibly aggregated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoredUsage {
    pub tenant: String,
    pub api_key: Option<String>,
    pub backend: String,
    /// When it was reserved; for an aggregate, its latest row (which can only
    /// over-, never under-state what a smooth bucket still holds).
    pub at: Timestamp,
    pub requests: u64,
    pub tokens: u64,
    pub cost_micros: u64,
}

enum Meter {
    Smooth(SmoothBucket),
    Calendar(CalendarCounter),
}

struct LimitState {
    scope: Scope,
    kind: LimitKind,
    max: u64,
    hard: bool,
    meter: Meter,
    /// Per alert threshold: silent until this instant (window end, or one
    /// period after firing for smooth limits).
    silent_until: Vec<Option<Timestamp>>,
}

impl LimitState {
    fn new(
        scope: Scope,
        (kind, max, mode): config::Spec,
        now: Timestamp,
        tz: &TimeZone,
        thresholds: usize,
    ) -> Self {
        let is_pool = matches!(scope, Scope::Pool(_));
        let meter = match kind {
            LimitKind::RequestsPerMinute | LimitKind::TokensPerMinute => {
                Meter::Smooth(SmoothBucket::new(max, MINUTE, now))
            }
            LimitKind::RequestsPerDay | LimitKind::TokensPerDay if is_pool => {
                Meter::Smooth(SmoothBucket::new(max, DAY, now))
            }
            LimitKind::RequestsPerDay | LimitKind::TokensPerDay | LimitKind::MoneyPerDay => {
                Meter::Calendar(CalendarCounter::new(Period::Day, now, tz))
            }
            LimitKind::TokensPerMonth | LimitKind::MoneyPerMonth => {
                Meter::Calendar(CalendarCounter::new(Period::Month, now, tz))
            }
        };
        LimitState {
            scope,
            kind,
            max,
            hard: mode == Mode::Hard,
            meter,
            silent_until: vec![None; thresholds],
        }
    }

    fn advance(&mut self, now: Timestamp, tz: &TimeZone) {
        match &mut self.meter {
            Meter::Smooth(b) => b.advance(now),
            Meter::Calendar(c) => c.roll(now, tz),
        }
    }

    fn used(&self) -> u64 {
        match &self.meter {
            Meter::Smooth(b) => b.used(),
            Meter::Calendar(c) => c.used(),
        }
    }

    /// What alerts and the edge block look at: real usage where it is known
    /// apart from reservations.
    fn committed(&self) -> u64 {
        match &self.meter {
            Meter::Smooth(b) => b.used(),
            Meter::Calendar(c) => c.committed,
        }
    }

    fn remaining(&self) -> u64 {
        self.max.saturating_sub(self.used())
    }

    fn fits(&self, amount: u64) -> bool {
        match &self.meter {
            Meter::Smooth(b) => b.fits(amount),
            Meter::Calendar(c) => c.used().saturating_add(amount) <= self.max,
        }
    }

    fn wait_for(&self, amount: u64, now: Timestamp) -> Option<Duration> {
        match &self.meter {
            Meter::Smooth(b) => b.wait_for(amount),
            Meter::Calendar(c) => (amount <= self.max).then(|| until(now, c.window.end)),
        }
    }

    fn reset_in(&self, now: Timestamp) -> Duration {
        match &self.meter {
            Meter::Smooth(b) => b.time_to_empty(),
            Meter::Calendar(c) => until(now, c.window.end),
        }
    }

    fn window_end(&self) -> Option<Timestamp> {
        match &self.meter {
            Meter::Smooth(_) => None,
            Meter::Calendar(c) => Some(c.window.end),
        }
    }

    fn hold(&mut self, amount: u64) -> Hold {
        match &mut self.meter {
            Meter::Smooth(b) => b.charge(amount),
            Meter::Calendar(c) => c.held = c.held.saturating_add(amount),
        }
        Hold {
            limit: usize::MAX,
            amount,
            window_end: self.window_end(),
        }
    }

    /// Replaces a hold by `actual` (0 = release it). A calendar hold from a
    /// window that has ended is gone with that window: nothing to adjust.
    fn settle(&mut self, hold: &Hold, actual: u64) {
        match &mut self.meter {
            Meter::Smooth(b) => {
                if actual < hold.amount {
                    b.refund(hold.amount - actual);
                } else {
                    b.charge(actual - hold.amount);
                }
            }
            Meter::Calendar(c) => {
                if hold.window_end == Some(c.window.end) {
                    c.held = c.held.saturating_sub(hold.amount);
                    c.committed = c.committed.saturating_add(actual);
                }
            }
        }
    }

    fn restore(&mut self, at: Timestamp, amount: u64, now: Timestamp) {
        match &mut self.meter {
            Meter::Smooth(b) => {
                let horizon = now.checked_sub(b.period()).unwrap_or(Timestamp::MIN);
                if at < horizon {
                    b.charge_at(horizon, amount);
                    b.cap_at_full();
                } else {
                    b.charge_at(at, amount);
                }
            }
            Meter::Calendar(c) => {
                if c.window.contains(at) {
                    c.committed = c.committed.saturating_add(amount);
                }
            }
        }
    }

    /// Crossed thresholds that are not silent: fire (when `emit`) and silence
    /// them for the rest of the window.
    fn check_alerts(
        &mut self,
        thresholds: &[u32],
        now: Timestamp,
        emit: bool,
        out: &mut Vec<Alert>,
    ) {
        let used = self.committed();
        // Ascending: past the first threshold not crossed, none is (and
        // nearly every request settles below the first).
        let crossed = |permille: u32| used as u128 * 1000 >= self.max as u128 * permille as u128;
        let crossed = thresholds.iter().take_while(|&&p| crossed(p)).count();
        for (i, &permille) in thresholds[..crossed].iter().enumerate() {
            let armed = self.silent_until[i].is_none_or(|until| now >= until);
            if armed {
                // Only now: the window's end is calendar arithmetic.
                self.silent_until[i] = Some(self.silence_until(now));
                if emit {
                    out.push(Alert {
                        scope: self.scope.clone(),
                        kind: self.kind,
                        hard: self.hard,
                        threshold_permille: permille,
                        used,
                        limit: self.max,
                        window_end: self.window_end(),
                        at: now,
                    });
                }
            }
        }
    }
}

impl LimitState {
    /// A hard limit refused a request: that is the limit reached (threshold
    /// [`FULL`]) even if committed usage has not quite touched it, since what
    /// is left cannot serve the request. Once per window, like the others.
    fn alert_refused(&mut self, thresholds: &[u32], now: Timestamp, out: &mut Vec<Alert>) {
        let full = thresholds.len() - 1;
        if self.silent_until[full].is_none_or(|until| now >= until) {
            self.silent_until[full] = Some(self.silence_until(now));
            out.push(Alert {
                scope: self.scope.clone(),
                kind: self.kind,
                hard: self.hard,
                threshold_permille: FULL,
                used: self.used(),
                limit: self.max,
                window_end: self.window_end(),
                at: now,
            });
        }
    }

    /// Reached in the current window: fully used, or a request was refused
    /// (what is left cannot serve one), which silences the full-limit alert
    /// until the window ends.
    fn reached(&self, now: Timestamp) -> bool {
        self.committed() >= self.max
            || self
                .silent_until
                .last()
                .copied()
                .flatten()
                .is_some_and(|until| now < until)
    }

    /// When an alert fired now may fire again: the end of the calendar
    /// window, or one period later for a smooth bucket.
    fn silence_until(&self, now: Timestamp) -> Timestamp {
        match &self.meter {
            Meter::Smooth(b) => now.checked_add(b.period()).unwrap_or(Timestamp::MAX),
            Meter::Calendar(c) => c.window.end,
        }
    }
}

fn until(now: Timestamp, end: Timestamp) -> Duration {
    Duration::from_nanos(meter::nanos_between(now, end).min(u64::MAX as u128) as u64)
}

struct TenantLimits {
    limits: Vec<usize>,
    keys: HashMap<String, Vec<usize>, IdHasher>,
    shed_at_edge: bool,
}

struct Engine {
    limits: Vec<LimitState>,
    /// Config names, looked up on every request: a cheap hash.
    tenants: HashMap<String, TenantLimits, IdHasher>,
    pools: HashMap<String, Vec<usize>, IdHasher>,
    alerts: Vec<Alert>,
}

impl Engine {
    /// The limits that apply to `s` (its tenant's, its key's, the backend
    /// pool's): a few, kept inline.
    fn applicable(&self, s: Subject) -> SmallVec<[usize; 8]> {
        let mut ix = SmallVec::new();
        if let Some(t) = self.tenants.get(s.tenant) {
            ix.extend_from_slice(&t.limits);
            if let Some(k) = s.api_key.and_then(|k| t.keys.get(k)) {
                ix.extend_from_slice(k);
            }
        }
        if let Some(p) = s.backend.and_then(|b| self.pools.get(b)) {
            ix.extend_from_slice(p);
        }
        ix
    }

    /// The tightest limit of each measure among `ix` (least remaining, then
    /// latest reset).
    fn headers(&self, ix: &[usize], now: Timestamp) -> RateLimitHeaders {
        let tightest = |m: Measure| {
            ix.iter()
                .map(|&i| &self.limits[i])
                .filter(|l| l.kind.measure() == m)
                .map(|l| HeaderSet {
                    limit: l.max,
                    remaining: l.remaining(),
                    reset: l.reset_in(now),
                })
                .min_by(|a, b| a.remaining.cmp(&b.remaining).then(b.reset.cmp(&a.reset)))
        };
        RateLimitHeaders {
            requests: tightest(Measure::Requests),
            tokens: tightest(Measure::Tokens),
        }
    }
}

/// The budget of every tenant, key and pool. See the module docs.
pub struct Budget {
    tz: TimeZone,
    output_cap: u64,
    /// Alert thresholds in per mille, ascending, ending with [`FULL`].
    thresholds: Vec<u32>,
    engine: Mutex<Engine>,
}

impl Budget {
    /// All limits of `config`, empty as of `now`. Fails with every config
    /// problem found (the caller maps spans to lines).
    pub fn new(config: &BudgetConfig, now: Timestamp) -> Result<Budget, Vec<BudgetConfigError>> {
        let errors = config.validate();
        if !errors.is_empty() {
            return Err(errors);
        }
        let tz = TimeZone::get(config.timezone.get_ref()).map_err(|e| {
            vec![BudgetConfigError {
                span: None,
                message: e.to_string(),
                hint: None,
            }]
        })?;
        let mut thresholds = config.alert_permille();
        thresholds.push(FULL);
        let mut limits = Vec::new();
        let mut add = |scope: &Scope, specs: Vec<config::Spec>| -> Vec<usize> {
            specs
                .into_iter()
                .map(|spec| {
                    limits.push(LimitState::new(
                        scope.clone(),
                        spec,
                        now,
                        &tz,
                        thresholds.len(),
                    ));
                    limits.len() - 1
                })
                .collect()
        };
        let mut tenants = HashMap::default();
        for t in &config.tenants {
            let name = t.name.get_ref().clone();
            let own = add(&Scope::Tenant(name.clone()), t.specs());
            let keys = t
                .keys
                .iter()
                .map(|k| {
                    let key = k.id.get_ref().clone();
                    let scope = Scope::Key {
                        tenant: name.clone(),
                        key: key.clone(),
                    };
                    (key, add(&scope, k.specs()))
                })
                .collect();
            tenants.insert(
                name,
                TenantLimits {
                    limits: own,
                    keys,
                    shed_at_edge: t.shed_at_edge,
                },
            );
        }
        let pools = config
            .pools
            .iter()
            .map(|p| {
                let backend = p.backend.get_ref().clone();
                let ix = add(&Scope::Pool(backend.clone()), p.specs());
                (backend, ix)
            })
            .collect();
        Ok(Budget {
            tz,
            output_cap: *config.default_output_cap.get_ref(),
            thresholds,
            engine: Mutex::new(Engine {
                limits,
                tenants,
                pools,
                alerts: Vec::new(),
            }),
        })
    }

    /// The zone of the day/month windows.
    pub fn timezone(&self) -> &TimeZone {
        &self.tz
    }

    fn lock(&self) -> MutexGuard<'_, Engine> {
        // No code path panics while holding the lock; if one ever did, the
        // counters are still consistent enough to keep serving.
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Completion tokens reserved for a request with this `max_tokens`.
    pub fn output_allowance(&self, max_output_tokens: Option<u64>) -> u64 {
        max_output_tokens.unwrap_or(self.output_cap)
    }

    /// Holds the estimate against every limit that applies, or nothing at all
    /// if any hard limit would be exceeded.
    pub fn reserve(
        &self,
        subject: Subject,
        estimate: Estimate,
        now: Timestamp,
    ) -> Result<Reservation, Box<Refusal>> {
        let output_allowance = self.output_allowance(estimate.max_output_tokens);
        let charge = Charge {
            requests: 1,
            tokens: estimate.prompt_tokens.saturating_add(output_allowance),
            micros: estimate.cost_micros,
        };
        let mut e = self.lock();
        let ix = e.applicable(subject);
        for &i in &ix {
            e.limits[i].advance(now, &self.tz);
        }
        // The binding limit is the one that frees up last ("never" last of all).
        let binding = ix
            .iter()
            .map(|&i| (i, &e.limits[i]))
            .filter(|(_, l)| l.hard && !l.fits(charge.of(l.kind.measure())))
            .map(|(i, l)| (i, l.wait_for(charge.of(l.kind.measure()), now)))
            .max_by_key(|(_, wait)| wait.unwrap_or(Duration::MAX));
        if let Some((i, retry_after)) = binding {
            let mut alerts = Vec::new();
            e.limits[i].alert_refused(&self.thresholds, now, &mut alerts);
            e.alerts.extend(alerts);
            let l = &e.limits[i];
            return Err(Box::new(Refusal {
                scope: l.scope.clone(),
                kind: l.kind,
                limit: l.max,
                remaining: l.remaining(),
                retry_after,
                headers: e.headers(&ix, now),
            }));
        }
        let holds = ix
            .iter()
            .map(|&i| {
                let l = &mut e.limits[i];
                let mut hold = l.hold(charge.of(l.kind.measure()));
                hold.limit = i;
                hold
            })
            .collect();
        Ok(Reservation {
            holds,
            estimate: charge,
            output_allowance,
            started: now,
        })
    }

    /// Replaces the reservation by what was really used (all of a finished
    /// request, or what a failed or cancelled stream got through), releasing
    /// the rest. May fire alerts.
    pub fn commit(&self, r: Reservation, usage: Usage, now: Timestamp) -> Settlement {
        let actual = Charge {
            requests: 1,
            tokens: usage.tokens(),
            micros: usage.cost_micros,
        };
        let mut e = self.lock();
        let mut alerts = Vec::new();
        for h in &r.holds {
            let l = &mut e.limits[h.limit];
            l.advance(now, &self.tz);
            l.settle(h, actual.of(l.kind.measure()));
            l.check_alerts(&self.thresholds, now, true, &mut alerts);
        }
        e.alerts.extend(alerts);
        Settlement {
            released_tokens: r.estimate.tokens.saturating_sub(actual.tokens),
            released_micros: r.estimate.micros.saturating_sub(actual.micros),
            excess_tokens: actual.tokens.saturating_sub(r.estimate.tokens),
            excess_micros: actual.micros.saturating_sub(r.estimate.micros),
        }
    }

    /// Releases the whole reservation: the request never reached a backend
    /// (or used nothing there), so not even the request is counted.
    pub fn rollback(&self, r: Reservation, now: Timestamp) {
        let mut e = self.lock();
        for h in &r.holds {
            let l = &mut e.limits[h.limit];
            l.advance(now, &self.tz);
            match &mut l.meter {
                Meter::Smooth(b) => b.refund(h.amount),
                Meter::Calendar(_) => l.settle(h, 0),
            }
        }
    }

    /// Alerts fired since the last call, oldest first.
    pub fn take_alerts(&self) -> Vec<Alert> {
        std::mem::take(&mut self.lock().alerts)
    }

    /// The `x-ratelimit-*` view of a subject, for successful responses too.
    pub fn headers(&self, subject: Subject, now: Timestamp) -> RateLimitHeaders {
        let mut e = self.lock();
        let ix = e.applicable(subject);
        for &i in &ix {
            e.limits[i].advance(now, &self.tz);
        }
        e.headers(&ix, now)
    }

    /// Every limit's state (config order), for `/metrics`.
    pub fn status(&self, now: Timestamp) -> Vec<LimitStatus> {
        let mut e = self.lock();
        e.limits
            .iter_mut()
            .map(|l| {
                l.advance(now, &self.tz);
                LimitStatus {
                    scope: l.scope.clone(),
                    kind: l.kind,
                    hard: l.hard,
                    limit: l.max,
                    used: l.used(),
                    in_flight: match &l.meter {
                        Meter::Smooth(_) => 0,
                        Meter::Calendar(c) => c.held,
                    },
                    reset_in: l.reset_in(now),
                }
            })
            .collect()
    }

    /// The scarcest limit of `backend`'s pool; `None` when it has no pool.
    pub fn pool_scarcity(&self, backend: &str, now: Timestamp) -> Option<Scarcity> {
        let mut e = self.lock();
        let ix = e.pools.get(backend)?.clone();
        ix.iter()
            .map(|&i| {
                let l = &mut e.limits[i];
                l.advance(now, &self.tz);
                Scarcity {
                    kind: l.kind,
                    remaining_fraction: l.remaining() as f64 / l.max as f64,
                    reset_in: l.reset_in(now),
                }
            })
            .min_by(|a, b| a.remaining_fraction.total_cmp(&b.remaining_fraction))
    }

    /// Per configured tenant (sorted by name): tokens used in its tightest
    /// token window and that window's limit (0/0 without token limits), and
    /// `blocked` when it sheds at the edge and a hard day/month budget is spent.
    pub fn kernel_mirror(&self, now: Timestamp) -> Vec<TenantMirror> {
        let mut e = self.lock();
        let Engine {
            limits, tenants, ..
        } = &mut *e;
        let mut out: Vec<TenantMirror> = tenants
            .iter()
            .map(|(name, t)| {
                for &i in &t.limits {
                    limits[i].advance(now, &self.tz);
                }
                let own = || t.limits.iter().map(|&i| &limits[i]);
                let tightest = own()
                    .filter(|l| l.kind.measure() == Measure::Tokens)
                    .max_by(|a, b| {
                        (a.used() as u128 * b.max as u128).cmp(&(b.used() as u128 * a.max as u128))
                    });
                let blocked = t.shed_at_edge
                    && own().any(|l| l.hard && l.kind.is_calendar_budget() && l.reached(now));
                TenantMirror {
                    tenant: name.clone(),
                    state: TenantState {
                        tokens_used: tightest.map_or(0, |l| l.used()),
                        tokens_limit: tightest.map_or(0, |l| l.max),
                        blocked: blocked as u32,
                        id: crate::config::tenant_id(name),
                    },
                }
            })
            .collect();
        out.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        out
    }

    /// How far back, and at which grain, the ledger must read history for
    /// [`Budget::restore`].
    pub fn restore_plan(&self, now: Timestamp) -> RestorePlan {
        let e = self.lock();
        let longest = e
            .limits
            .iter()
            .filter_map(|l| match &l.meter {
                Meter::Smooth(b) => Some(b.period()),
                Meter::Calendar(_) => None,
            })
            .max()
            .unwrap_or(MINUTE);
        let ago = |d: Duration| now.checked_sub(d).unwrap_or(Timestamp::MIN);
        let month_start = month_window(now, &self.tz).start;
        let day_start = day_window(now, &self.tz).start;
        RestorePlan {
            since: month_start.min(ago(longest)),
            month_start,
            day_start,
            minutes_from: ago(longest),
            rows_from: ago(MINUTE),
        }
    }

    /// Re-applies committed usage from the ledger (a restart never resets a
    /// budget). Call once on a fresh budget, before serving, with the history
    /// [`Budget::restore_plan`] asks for. Calendar windows come back exactly.
    /// Smooth buckets come back never below the truth as long as they were
    /// not in debt: history older than a bucket's period counts as a bucket
    /// that was full one period ago, the rest is replayed in time order.
    /// Thresholds already crossed are marked as fired, so a restart does not
    /// repeat alerts.
    pub fn restore(&self, mut history: Vec<RestoredUsage>, now: Timestamp) {
        history.sort_by_key(|u| u.at);
        let mut e = self.lock();
        for l in &mut e.limits {
            if let Meter::Calendar(c) = &mut l.meter {
                c.roll(now, &self.tz);
            }
        }
        for u in &history {
            let subject = Subject {
                tenant: &u.tenant,
                api_key: u.api_key.as_deref(),
                backend: Some(&u.backend),
            };
            let charge = Charge {
                requests: u.requests,
                tokens: u.tokens,
                micros: u.cost_micros,
            };
            for i in e.applicable(subject) {
                let l = &mut e.limits[i];
                l.restore(u.at, charge.of(l.kind.measure()), now);
            }
        }
        let mut silent = Vec::new();
        for l in &mut e.limits {
            l.advance(now, &self.tz);
            l.check_alerts(&self.thresholds, now, false, &mut silent);
        }
    }
}
