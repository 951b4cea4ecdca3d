//! `[schedule]`: the scheduler's TOML schema, its validation and the resolved
//! [`Plan`] the scheduler runs on.
//!
//! Every key is optional; a class that `[[schedule.class]]` does not list gets
//! the defaults (weight 1, queue 256, wait 30 s). Errors carry the byte span of
//! the offending value so the embedding config loader can name file and line.

use std::{collections::HashMap, ops::Range, time::Duration};

use jiff::{Timestamp, civil::Weekday, tz::TimeZone};
use serde::Deserialize;
use toml::Spanned;

use super::{feedback::FeedbackConfig, window::WindowPlan};

pub const DEFAULT_MAX_QUEUE: u32 = 256;
pub const DEFAULT_MAX_WAIT_MS: u64 = 30_000;
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 16;
pub const MAX_WAIT_MS: u64 = 3_600_000;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// The highest-priority waiting class always goes first (aging aside).
    Strict,
    /// Weighted fair queuing over classes, cost = tokens.
    Wfq,
    /// Deficit round robin over classes, quantum = weight × `quantum` tokens.
    #[default]
    Drr,
    /// Each class is guaranteed a share of capacity; idle capacity is lent.
    AtLeast,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Strict => "strict",
            Policy::Wfq => "wfq",
            Policy::Drr => "drr",
            Policy::AtLeast => "at_least",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    #[serde(default)]
    pub policy: Policy,
    /// IANA zone in which `[[schedule.class.window]]` times are read.
    #[serde(default = "utc")]
    pub timezone: Spanned<String>,
    /// at_least: class k (in priority order) gets `decay^k` of the capacity not
    /// claimed by an explicit `min_share`, normalised to sum to one.
    #[serde(default = "default_decay")]
    pub decay: Spanned<f64>,
    /// drr: tokens a class of weight 1 may send per round.
    #[serde(default = "default_quantum")]
    pub quantum: Spanned<u64>,
    /// Backend capacity when its `[[schedule.backend]]` entry is absent.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: Spanned<u32>,
    /// Requests waiting for one backend, all classes together.
    #[serde(default = "default_backend_queue")]
    pub max_queue: Spanned<u32>,
    /// In-flight cap for every tenant without its own `[[schedule.tenant]]`.
    pub tenant_max_in_flight: Option<Spanned<u32>>,
    #[serde(default)]
    pub aging: Aging,
    #[serde(default)]
    pub feedback: FeedbackConfig,
    #[serde(rename = "class", default)]
    pub classes: Vec<ClassSchedule>,
    #[serde(rename = "backend", default)]
    pub backends: Vec<BackendSchedule>,
    #[serde(rename = "tenant", default)]
    pub tenants: Vec<TenantSchedule>,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            policy: Policy::default(),
            timezone: utc(),
            decay: default_decay(),
            quantum: default_quantum(),
            max_in_flight: default_max_in_flight(),
            max_queue: default_backend_queue(),
            tenant_max_in_flight: None,
            aging: Aging::default(),
            feedback: FeedbackConfig::default(),
            classes: Vec::new(),
            backends: Vec::new(),
            tenants: Vec::new(),
        }
    }
}

/// Aging: a waiting request climbs one priority level per `step_ms`, at most
/// `max_boost` levels. Applies where priority decides (strict, and the order
/// in which at_least serves and lends); wfq and drr cannot starve a class.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Aging {
    #[serde(default = "default_aging_step")]
    pub step_ms: Spanned<u64>,
    #[serde(default = "default_max_boost")]
    pub max_boost: u32,
}

impl Default for Aging {
    fn default() -> Self {
        Aging {
            step_ms: default_aging_step(),
            max_boost: default_max_boost(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassSchedule {
    /// A `[[class]]` name.
    pub name: Spanned<String>,
    pub weight: Option<Spanned<u32>>,
    /// at_least: fraction (0..=1) of a backend's capacity reserved for the class.
    pub min_share: Option<Spanned<f64>>,
    pub max_queue: Option<u32>,
    pub max_wait_ms: Option<Spanned<u64>>,
    /// In-flight cap for the class on one backend.
    pub max_in_flight: Option<Spanned<u32>>,
    /// Local-time overrides; the first window that matches wins.
    #[serde(rename = "window", default)]
    pub windows: Vec<Window>,
}

/// `days` (default: every day) and `start`..`end` as "HH:MM" local time; a
/// window whose end is not after its start runs past midnight and belongs to
/// the day it starts on (`days = ["fri"]`, 22:00–06:00 covers Saturday 03:00).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    #[serde(default)]
    pub days: Vec<Spanned<String>>,
    pub start: Spanned<String>,
    pub end: Spanned<String>,
    pub weight: Option<Spanned<u32>>,
    pub min_share: Option<Spanned<f64>>,
    pub max_queue: Option<u32>,
    pub max_wait_ms: Option<Spanned<u64>>,
    pub max_in_flight: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSchedule {
    /// A `[[backend]]` name.
    pub name: Spanned<String>,
    pub max_in_flight: Spanned<u32>,
    pub max_queue: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSchedule {
    /// A tenant name from `[[network]]`.
    pub name: Spanned<String>,
    pub max_in_flight: Spanned<u32>,
}

fn utc() -> Spanned<String> {
    Spanned::new(0..0, "UTC".into())
}
fn default_decay() -> Spanned<f64> {
    Spanned::new(0..0, 0.5)
}
fn default_quantum() -> Spanned<u64> {
    Spanned::new(0..0, 4096)
}
fn default_max_in_flight() -> Spanned<u32> {
    Spanned::new(0..0, DEFAULT_MAX_IN_FLIGHT)
}
fn default_backend_queue() -> Spanned<u32> {
    Spanned::new(0..0, 1024)
}
fn default_aging_step() -> Spanned<u64> {
    Spanned::new(0..0, 2000)
}
fn default_max_boost() -> u32 {
    2
}

/// A validation error: the byte span of the value at fault (when it has one in
/// the file), what is wrong, and how to fix it.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleError {
    pub span: Option<Range<usize>>,
    pub message: String,
    pub hint: Option<String>,
}

fn error<T>(span: Range<usize>, message: String, hint: Option<&str>) -> Result<T, ScheduleError> {
    Err(ScheduleError {
        span: (span.start < span.end).then_some(span),
        message,
        hint: hint.map(str::to_owned),
    })
}

/// A `[[class]]` as the rest of the config knows it: ids are positions.
#[derive(Debug, Clone, Copy)]
pub struct ClassRef<'a> {
    pub name: &'a str,
    /// 0 is the highest priority.
    pub priority: u8,
}

/// What one class may do at one moment (base values with a window applied).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub weight: u32,
    pub min_share: Option<f64>,
    pub max_queue: u32,
    pub max_wait: Duration,
    pub max_in_flight: Option<u32>,
}

#[derive(Debug)]
pub struct ClassPlan {
    pub name: String,
    pub priority: u8,
    pub base: Limits,
    pub windows: Vec<WindowPlan>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendPlan {
    pub max_in_flight: u32,
    pub max_queue: u32,
}

/// The validated schedule, names resolved to ids; shared by every backend's
/// scheduler.
#[derive(Debug)]
pub struct Plan {
    pub policy: Policy,
    pub timezone: TimeZone,
    pub decay: f64,
    pub quantum: u64,
    pub aging_step: Duration,
    pub max_boost: u32,
    pub feedback: FeedbackConfig,
    /// Indexed by class id.
    pub classes: Vec<ClassPlan>,
    default_backend: BackendPlan,
    backends: HashMap<String, BackendPlan>,
    default_tenant_cap: Option<u32>,
    tenant_caps: HashMap<u32, u32>,
}

impl ScheduleConfig {
    /// Checks the section against the config's classes, backends and tenants.
    pub fn resolve(
        &self,
        classes: &[ClassRef<'_>],
        backend_names: &[&str],
        tenant_ids: &HashMap<String, u32>,
    ) -> Result<Plan, ScheduleError> {
        if classes.is_empty() {
            return error(0..0, "scheduling needs at least one [[class]]".into(), None);
        }
        let timezone = match TimeZone::get(self.timezone.get_ref()) {
            Ok(tz) => tz,
            Err(e) => {
                return error(
                    self.timezone.span(),
                    format!("unknown time zone `{}`: {e}", self.timezone.get_ref()),
                    Some("use an IANA name such as \"Europe/Berlin\" or \"UTC\""),
                );
            }
        };
        let decay = *self.decay.get_ref();
        if !(decay > 0.0 && decay <= 1.0) {
            return error(
                self.decay.span(),
                format!("decay must be in (0, 1], not {decay}"),
                Some("0.5 halves each lower class's guaranteed share"),
            );
        }
        if *self.quantum.get_ref() == 0 {
            return error(
                self.quantum.span(),
                "quantum must be at least 1 token".into(),
                None,
            );
        }
        if *self.aging.step_ms.get_ref() == 0 {
            return error(
                self.aging.step_ms.span(),
                "aging.step_ms must be at least 1".into(),
                Some("set aging.max_boost = 0 to turn aging off"),
            );
        }
        self.feedback.validate()?;
        let default_backend = BackendPlan {
            max_in_flight: positive(&self.max_in_flight, "max_in_flight")?,
            max_queue: *self.max_queue.get_ref(),
        };

        let base = Limits {
            weight: 1,
            min_share: None,
            max_queue: DEFAULT_MAX_QUEUE,
            max_wait: Duration::from_millis(DEFAULT_MAX_WAIT_MS),
            max_in_flight: None,
        };
        let mut plans: Vec<ClassPlan> = classes
            .iter()
            .map(|c| ClassPlan {
                name: c.name.to_owned(),
                priority: c.priority,
                base: base.clone(),
                windows: Vec::new(),
            })
            .collect();
        let mut listed = vec![false; classes.len()];
        for c in &self.classes {
            let Some(id) = classes.iter().position(|k| k.name == c.name.get_ref()) else {
                let known: Vec<_> = classes.iter().map(|k| k.name).collect();
                return error(
                    c.name.span(),
                    format!("unknown class `{}`", c.name.get_ref()),
                    Some(&format!("defined classes: {}", known.join(", "))),
                );
            };
            if std::mem::replace(&mut listed[id], true) {
                return error(
                    c.name.span(),
                    format!("class `{}` is scheduled twice", c.name.get_ref()),
                    None,
                );
            }
            let plan = &mut plans[id];
            apply(
                &mut plan.base,
                &Overrides {
                    weight: c.weight.as_ref(),
                    min_share: c.min_share.as_ref(),
                    max_queue: c.max_queue,
                    max_wait_ms: c.max_wait_ms.as_ref(),
                    max_in_flight: c.max_in_flight.as_ref(),
                },
            )?;
            for w in &c.windows {
                let mut limits = plan.base.clone();
                apply(
                    &mut limits,
                    &Overrides {
                        weight: w.weight.as_ref(),
                        min_share: w.min_share.as_ref(),
                        max_queue: w.max_queue,
                        max_wait_ms: w.max_wait_ms.as_ref(),
                        max_in_flight: w.max_in_flight.as_ref(),
                    },
                )?;
                plan.windows.push(WindowPlan::parse(w, limits)?);
            }
        }
        let explicit: f64 = plans.iter().filter_map(|p| p.base.min_share).sum();
        if explicit > 1.0 + 1e-9 {
            let span = self
                .classes
                .iter()
                .find_map(|c| c.min_share.as_ref().map(|s| s.span()))
                .unwrap_or(0..0);
            return error(
                span,
                format!("min_share values add up to {explicit:.3}, more than the whole backend"),
                Some("shares are fractions of a backend's max_in_flight; keep their sum ≤ 1"),
            );
        }

        let mut backends = HashMap::new();
        for b in &self.backends {
            if !backend_names.contains(&b.name.get_ref().as_str()) {
                return error(
                    b.name.span(),
                    format!("unknown backend `{}`", b.name.get_ref()),
                    Some(&format!("defined backends: {}", backend_names.join(", "))),
                );
            }
            let plan = BackendPlan {
                max_in_flight: positive(&b.max_in_flight, "max_in_flight")?,
                max_queue: b
                    .max_queue
                    .as_ref()
                    .map_or(default_backend.max_queue, |q| *q.get_ref()),
            };
            if backends.insert(b.name.get_ref().clone(), plan).is_some() {
                return error(
                    b.name.span(),
                    format!("backend `{}` is scheduled twice", b.name.get_ref()),
                    None,
                );
            }
        }

        let default_tenant_cap = match &self.tenant_max_in_flight {
            Some(cap) => Some(positive(cap, "tenant_max_in_flight")?),
            None => None,
        };
        let mut tenant_caps = HashMap::new();
        for t in &self.tenants {
            let Some(&id) = tenant_ids.get(t.name.get_ref()) else {
                return error(
                    t.name.span(),
                    format!("unknown tenant `{}`", t.name.get_ref()),
                    Some("tenants are named by `tenant = ...` in [[network]]"),
                );
            };
            if tenant_caps
                .insert(id, positive(&t.max_in_flight, "max_in_flight")?)
                .is_some()
            {
                return error(
                    t.name.span(),
                    format!("tenant `{}` is listed twice", t.name.get_ref()),
                    None,
                );
            }
        }

        Ok(Plan {
            policy: self.policy,
            timezone,
            decay,
            quantum: *self.quantum.get_ref(),
            aging_step: Duration::from_millis(*self.aging.step_ms.get_ref()),
            max_boost: self.aging.max_boost,
            feedback: self.feedback.clone(),
            classes: plans,
            default_backend,
            backends,
            default_tenant_cap,
            tenant_caps,
        })
    }
}

struct Overrides<'a> {
    weight: Option<&'a Spanned<u32>>,
    min_share: Option<&'a Spanned<f64>>,
    max_queue: Option<u32>,
    max_wait_ms: Option<&'a Spanned<u64>>,
    max_in_flight: Option<&'a Spanned<u32>>,
}

fn apply(limits: &mut Limits, o: &Overrides<'_>) -> Result<(), ScheduleError> {
    if let Some(w) = o.weight {
        limits.weight = positive(w, "weight")?;
    }
    if let Some(s) = o.min_share {
        let share = *s.get_ref();
        if !(0.0..=1.0).contains(&share) {
            return error(
                s.span(),
                format!("min_share must be between 0 and 1, not {share}"),
                Some("0.25 reserves a quarter of each backend's max_in_flight"),
            );
        }
        limits.min_share = Some(share);
    }
    if let Some(q) = o.max_queue {
        limits.max_queue = q;
    }
    if let Some(w) = o.max_wait_ms {
        if *w.get_ref() > MAX_WAIT_MS {
            return error(
                w.span(),
                format!("max_wait_ms is at most {MAX_WAIT_MS} (one hour)"),
                Some("a client waiting longer has long given up; lower it"),
            );
        }
        limits.max_wait = Duration::from_millis(*w.get_ref());
    }
    if let Some(c) = o.max_in_flight {
        limits.max_in_flight = Some(positive(c, "max_in_flight")?);
    }
    Ok(())
}

fn positive(value: &Spanned<u32>, key: &str) -> Result<u32, ScheduleError> {
    match *value.get_ref() {
        0 => error(value.span(), format!("{key} must be at least 1"), None),
        v => Ok(v),
    }
}

pub(super) fn parse_day(day: &Spanned<String>) -> Result<Weekday, ScheduleError> {
    Ok(match day.get_ref().to_ascii_lowercase().as_str() {
        "mon" | "monday" => Weekday::Monday,
        "tue" | "tuesday" => Weekday::Tuesday,
        "wed" | "wednesday" => Weekday::Wednesday,
        "thu" | "thursday" => Weekday::Thursday,
        "fri" | "friday" => Weekday::Friday,
        "sat" | "saturday" => Weekday::Saturday,
        "sun" | "sunday" => Weekday::Sunday,
        other => {
            return error(
                day.span(),
                format!("unknown weekday `{other}`"),
                Some("use mon, tue, wed, thu, fri, sat or sun"),
            );
        }
    })
}

/// Minutes since local midnight from "HH:MM"; "24:00" is allowed as an end.
pub(super) fn parse_clock(value: &Spanned<String>) -> Result<u16, ScheduleError> {
    let text = value.get_ref();
    let number = |range: Range<usize>| {
        text.get(range)
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u16>().ok())
    };
    let parsed = match (text.len(), text.get(2..3), number(0..2), number(3..5)) {
        (5, Some(":"), Some(h), Some(m)) if m < 60 && (h < 24 || (h == 24 && m == 0)) => {
            Some(h * 60 + m)
        }
        _ => None,
    };
    match parsed {
        Some(minutes) => Ok(minutes),
        _ => error(
            value.span(),
            format!("`{text}` is not a local time"),
            Some("write times as \"HH:MM\", e.g. \"22:00\"; \"24:00\" ends a window at midnight"),
        ),
    }
}

impl Plan {
    /// The limits of every class at `wall`, windows applied.
    pub fn limits_at(&self, wall: Timestamp) -> Vec<Limits> {
        let local = self.timezone.to_datetime(wall);
        self.classes
            .iter()
            .map(|c| {
                c.windows
                    .iter()
                    .find(|w| w.contains(local))
                    .map_or(&c.base, |w| &w.limits)
                    .clone()
            })
            .collect()
    }

    /// Capacity of the backend called `name`.
    pub fn backend(&self, name: &str) -> BackendPlan {
        self.backends
            .get(name)
            .copied()
            .unwrap_or(self.default_backend)
    }

    /// In-flight cap of a tenant on one backend, if any.
    pub fn tenant_cap(&self, tenant: u32) -> Option<u32> {
        self.tenant_caps
            .get(&tenant)
            .copied()
            .or(self.default_tenant_cap)
    }

    /// at_least guaranteed shares (fractions of capacity) for `limits`:
    /// explicit `min_share`s as given, the rest of the capacity split among
    /// the other classes geometrically by priority (`decay^rank`). Windows
    /// can make explicit shares overlap past 1; they are then scaled down
    /// proportionally rather than promising more than the backend has.
    pub fn shares(&self, limits: &[Limits]) -> Vec<f64> {
        let explicit: f64 = limits.iter().filter_map(|l| l.min_share).sum();
        let scale = if explicit > 1.0 { 1.0 / explicit } else { 1.0 };
        let rest = (1.0 - explicit).max(0.0);
        let mut implicit: Vec<usize> = (0..limits.len())
            .filter(|&i| limits[i].min_share.is_none())
            .collect();
        implicit.sort_by_key(|&i| (self.classes[i].priority, i));
        let parts: Vec<f64> = (0..implicit.len())
            .map(|rank| self.decay.powi(rank as i32))
            .collect();
        let total: f64 = parts.iter().sum();
        let mut shares: Vec<f64> = limits
            .iter()
            .map(|l| l.min_share.unwrap_or(0.0) * scale)
            .collect();
        for (i, part) in implicit.into_iter().zip(parts) {
            shares[i] = rest * part / total;
        }
        shares
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn parse(text: &str) -> ScheduleConfig {
        toml::from_str(text).expect("valid schedule toml")
    }

    fn classes() -> Vec<ClassRef<'static>> {
        vec![
            ClassRef {
                name: "interactive",
                priority: 0,
            },
            ClassRef {
                name: "batch",
                priority: 3,
            },
        ]
    }

    fn resolve(text: &str) -> Result<Plan, ScheduleError> {
        let tenants = HashMap::from([("acme".to_string(), 7)]);
        parse(text).resolve(&classes(), &["gpu"], &tenants)
    }

    #[test]
    fn defaults_fill_unlisted_classes_and_backends() {
        let plan = resolve("").unwrap();
        assert_eq!(plan.policy, Policy::Drr);
        assert_eq!(plan.classes.len(), 2);
        assert_eq!(plan.classes[1].base.max_queue, DEFAULT_MAX_QUEUE);
        assert_eq!(plan.backend("gpu").max_in_flight, DEFAULT_MAX_IN_FLIGHT);
        assert_eq!(plan.tenant_cap(7), None);
    }

    #[test]
    fn resolves_names_to_ids() {
        let plan = resolve(
            r#"
            policy = "at_least"
            timezone = "Europe/Berlin"
            tenant_max_in_flight = 4
            [[class]]
            name = "batch"
            weight = 3
            min_share = 0.2
            [[backend]]
            name = "gpu"
            max_in_flight = 8
            [[tenant]]
            name = "acme"
            max_in_flight = 2
            "#,
        )
        .unwrap();
        assert_eq!(plan.policy, Policy::AtLeast);
        assert_eq!(plan.classes[1].base.weight, 3);
        assert_eq!(plan.backend("gpu").max_in_flight, 8);
        assert_eq!(plan.tenant_cap(7), Some(2));
        assert_eq!(plan.tenant_cap(8), Some(4));
    }

    /// The example in the module docs is what an operator copies: it must
    /// parse (under `[schedule]`, as the integrator embeds it) and resolve.
    #[test]
    fn documented_example_is_valid() {
        #[derive(Deserialize)]
        struct Embedded {
            schedule: ScheduleConfig,
        }
        let docs = include_str!("mod.rs");
        let block = docs
            .split("```toml\n")
            .nth(1)
            .unwrap()
            .split("//! ```")
            .next()
            .unwrap();
        let text: String = block
            .lines()
            .map(|l| {
                l.strip_prefix("//! ")
                    .or(l.strip_prefix("//!"))
                    .unwrap_or(l)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let cfg: Embedded = toml::from_str(&text).unwrap();
        let tenants = HashMap::from([("acme".to_string(), 7)]);
        let classes = [ClassRef {
            name: "batch",
            priority: 3,
        }];
        let plan = cfg
            .schedule
            .resolve(&classes, &["local"], &tenants)
            .unwrap();
        assert_eq!(plan.backend("local").max_in_flight, 8);
        assert_eq!(plan.classes[0].windows.len(), 1);
    }

    #[test]
    fn rejects_unknown_keys() {
        let err = toml::from_str::<ScheduleConfig>("polcy = \"wfq\"").unwrap_err();
        assert!(err.message().contains("unknown field"), "{err}");
        let err = toml::from_str::<ScheduleConfig>("policy = \"lottery\"").unwrap_err();
        assert!(err.message().contains("unknown variant"), "{err}");
    }

    #[test]
    fn errors_point_at_the_value_and_hint() {
        let text = "timezone = \"Mars/Olympus\"";
        let err = resolve(text).unwrap_err();
        assert!(err.message.contains("Mars/Olympus"), "{err:?}");
        assert_eq!(&text[err.span.unwrap()], "\"Mars/Olympus\"");

        let err = resolve("[[class]]\nname = \"gold\"").unwrap_err();
        assert!(err.message.contains("unknown class `gold`"));
        assert!(err.hint.unwrap().contains("interactive, batch"));

        let err = resolve(
            "[[class]]\nname = \"batch\"\n[[class.window]]\nstart = \"25:00\"\nend = \"06:00\"",
        )
        .unwrap_err();
        assert!(err.message.contains("not a local time"), "{err:?}");

        let err = resolve(
            "[[class]]\nname = \"batch\"\nmin_share = 0.7\n[[class]]\nname = \"interactive\"\nmin_share = 0.6",
        )
        .unwrap_err();
        assert!(err.message.contains("add up to 1.300"), "{err:?}");

        for (text, what) in [
            (
                "[[class]]\nname = \"batch\"\nweight = 0",
                "weight must be at least 1",
            ),
            ("decay = 0.0", "decay must be in (0, 1]"),
            (
                "[[backend]]\nname = \"cpu\"\nmax_in_flight = 2",
                "unknown backend `cpu`",
            ),
            (
                "[[tenant]]\nname = \"nobody\"\nmax_in_flight = 2",
                "unknown tenant",
            ),
            ("[aging]\nstep_ms = 0", "step_ms must be at least 1"),
            (
                "[[class]]\nname = \"batch\"\nmax_wait_ms = 3600001",
                "at most 3600000",
            ),
        ] {
            let err = resolve(text).unwrap_err();
            assert!(err.message.contains(what), "{text}: {err:?}");
        }
    }

    #[test]
    fn geometric_shares_follow_priority_and_decay() {
        let plan =
            resolve("policy = \"at_least\"\ndecay = 0.5\n[[class]]\nname = \"batch\"\n").unwrap();
        let now = Timestamp::UNIX_EPOCH;
        let shares = plan.shares(&plan.limits_at(now));
        // interactive (priority 0) gets 1/(1+0.5), batch 0.5/(1+0.5).
        assert!((shares[0] - 2.0 / 3.0).abs() < 1e-9, "{shares:?}");
        assert!((shares[1] - 1.0 / 3.0).abs() < 1e-9, "{shares:?}");

        let plan = resolve("[[class]]\nname = \"batch\"\nmin_share = 0.4").unwrap();
        let mut limits = plan.limits_at(now);
        let shares = plan.shares(&limits);
        assert!((shares[1] - 0.4).abs() < 1e-9 && (shares[0] - 0.6).abs() < 1e-9);
        // Overlapping window shares are scaled to fit the backend.
        limits[0].min_share = Some(0.8);
        let shares = plan.shares(&limits);
        assert!((shares[0] - 2.0 / 3.0).abs() < 1e-9 && (shares[1] - 1.0 / 3.0).abs() < 1e-9);
    }
}
