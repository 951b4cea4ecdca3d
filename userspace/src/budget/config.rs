//! The `[budget]` table: limits per tenant, per API key and per provider pool.
//!
//! Embedded by the main config as one field (`#[serde(default)] budget: BudgetConfig`),
//! so everything lives under `[budget]` and cannot collide with other tables:
//!
//! ```toml
//! [budget]
//! timezone = "Europe/Berlin"      # day/month windows follow this zone's calendar
//! alert_fractions = [0.8, 0.95]   # alert once per window when usage crosses these
//! webhook_url = "http://127.0.0.1:9000/alerts"   # optional, POSTed by the daemon
//! default_output_cap = 4096       # completion tokens reserved when max_tokens is absent
//!
//! [[budget.tenant]]
//! name = "team-a"
//! shed_at_edge = true             # drop its connections in the kernel once a hard
//!                                 # day/month budget is spent
//! tokens_per_minute = { max = 100000 }
//! tokens_per_day = { max = 2000000 }
//! money_per_month = { max = "500.00", mode = "soft" }   # US dollars, a string: no floats
//!
//! [[budget.tenant.key]]           # an API key of team-a: its limits apply on top
//! id = "ci-bot"
//! requests_per_minute = { max = 10 }
//!
//! [[budget.pool]]                 # the provider's own limits for one backend
//! backend = "openai"
//! requests_per_minute = { max = 500 }
//! tokens_per_day = { max = 10000000 }   # rolling 24 h, like the provider's
//! money_per_day = { max = "200" }
//! ```
//!
//! Tenant and key limits: `requests_per_minute`, `tokens_per_minute` (smooth),
//! `tokens_per_day`, `tokens_per_month`, `money_per_day`, `money_per_month`
//! (calendar). Pool limits: `requests_per_minute`, `tokens_per_minute`,
//! `requests_per_day`, `tokens_per_day` (all smooth, refilling at the
//! provider's rate), `money_per_day`, `money_per_month` (calendar). `mode` is
//! `"hard"` (refuse, the default) or `"soft"` (let through, alert).

use std::{fmt, ops::Range};

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use super::LimitKind;
use crate::ledger::LedgerConfig;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// IANA zone whose calendar days and months the day/month windows follow.
    #[serde(default = "default_timezone")]
    pub timezone: Spanned<String>,
    /// Fractions of a limit (0 < f < 1) at which an alert fires, once per window.
    #[serde(default = "default_fractions")]
    pub alert_fractions: Spanned<Vec<f64>>,
    /// Where the daemon POSTs alerts (JSON), if anywhere.
    pub webhook_url: Option<Spanned<String>>,
    /// Completion tokens reserved for a request without `max_tokens`.
    #[serde(default = "default_output_cap")]
    pub default_output_cap: Spanned<u64>,
    #[serde(default)]
    pub ledger: LedgerConfig,
    #[serde(rename = "tenant", default)]
    pub tenants: Vec<TenantBudget>,
    #[serde(rename = "pool", default)]
    pub pools: Vec<PoolBudget>,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            timezone: default_timezone(),
            alert_fractions: default_fractions(),
            webhook_url: None,
            default_output_cap: default_output_cap(),
            ledger: LedgerConfig::default(),
            tenants: Vec::new(),
            pools: Vec::new(),
        }
    }
}

fn default_timezone() -> Spanned<String> {
    Spanned::new(0..0, "UTC".to_string())
}

fn default_fractions() -> Spanned<Vec<f64>> {
    Spanned::new(0..0, vec![0.8, 0.95])
}

fn default_output_cap() -> Spanned<u64> {
    Spanned::new(0..0, 4096)
}

/// One limit: its maximum per window and what happens when it is reached.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit<T> {
    pub max: T,
    #[serde(default)]
    pub mode: Mode,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Refuse what would exceed the limit (429).
    #[default]
    Hard,
    /// Let it through; the alerts still fire.
    Soft,
}

/// An amount of US dollars, held as integer micro-dollars. Written in the
/// config as a decimal string (`"12.50"`, `"$0.000125"`) so no float ever
/// touches money.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dollars(pub u64);

impl<'de> Deserialize<'de> for Dollars {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_dollars(&s)
            .map(Dollars)
            .map_err(serde::de::Error::custom)
    }
}

/// `"12.5"` → 12 500 000 micro-dollars; at most six decimals.
pub fn parse_dollars(s: &str) -> Result<u64, String> {
    let bad = || format!("`{s}` is not an amount of dollars like \"12.50\" (at most 6 decimals)");
    let t = s.trim().trim_start_matches('$');
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(frac) || frac.len() > 6 {
        return Err(bad());
    }
    let whole: u64 = whole.parse().map_err(|_| bad())?;
    let frac: u64 = format!("{frac:0<6}").parse().map_err(|_| bad())?;
    whole
        .checked_mul(1_000_000)
        .and_then(|w| w.checked_add(frac))
        .ok_or_else(bad)
}

/// Micro-dollars as `$12.50` (cents always, more digits only when present).
pub fn format_dollars(micros: u64) -> String {
    let frac = format!("{:06}", micros % 1_000_000);
    let frac = frac.trim_end_matches('0');
    format!("${}.{frac:0<2}", micros / 1_000_000)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantBudget {
    pub name: Spanned<String>,
    /// Mirror "hard day/month budget spent" into the kernel, which then drops
    /// the tenant's new connections before they cost a socket.
    #[serde(default)]
    pub shed_at_edge: bool,
    pub requests_per_minute: Option<Limit<u64>>,
    pub tokens_per_minute: Option<Limit<u64>>,
    pub tokens_per_day: Option<Limit<u64>>,
    pub tokens_per_month: Option<Limit<u64>>,
    pub money_per_day: Option<Limit<Dollars>>,
    pub money_per_month: Option<Limit<Dollars>>,
    #[serde(rename = "key", default)]
    pub keys: Vec<KeyBudget>,
}

/// Limits of one API key (by its id, never the secret), on top of its tenant's.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyBudget {
    pub id: Spanned<String>,
    pub requests_per_minute: Option<Limit<u64>>,
    pub tokens_per_minute: Option<Limit<u64>>,
    pub tokens_per_day: Option<Limit<u64>>,
    pub tokens_per_month: Option<Limit<u64>>,
    pub money_per_day: Option<Limit<Dollars>>,
    pub money_per_month: Option<Limit<Dollars>>,
}

/// A provider's limits for one backend, shared by every request routed there.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolBudget {
    pub backend: Spanned<String>,
    pub requests_per_minute: Option<Limit<u64>>,
    pub tokens_per_minute: Option<Limit<u64>>,
    pub requests_per_day: Option<Limit<u64>>,
    pub tokens_per_day: Option<Limit<u64>>,
    pub money_per_day: Option<Limit<Dollars>>,
    pub money_per_month: Option<Limit<Dollars>>,
}

/// A configured limit, flattened: kind, maximum (requests, tokens or micro-dollars), mode.
pub(crate) type Spec = (LimitKind, u64, Mode);

fn collect(
    counts: [(LimitKind, &Option<Limit<u64>>); 4],
    money: [(LimitKind, &Option<Limit<Dollars>>); 2],
) -> Vec<Spec> {
    let counts = counts
        .into_iter()
        .filter_map(|(k, l)| l.map(|l| (k, l.max, l.mode)));
    let money = money
        .into_iter()
        .filter_map(|(k, l)| l.map(|l| (k, l.max.0, l.mode)));
    counts.chain(money).collect()
}

impl TenantBudget {
    pub(crate) fn specs(&self) -> Vec<Spec> {
        use LimitKind::*;
        collect(
            [
                (RequestsPerMinute, &self.requests_per_minute),
                (TokensPerMinute, &self.tokens_per_minute),
                (TokensPerDay, &self.tokens_per_day),
                (TokensPerMonth, &self.tokens_per_month),
            ],
            [
                (MoneyPerDay, &self.money_per_day),
                (MoneyPerMonth, &self.money_per_month),
            ],
        )
    }
}

impl KeyBudget {
    pub(crate) fn specs(&self) -> Vec<Spec> {
        use LimitKind::*;
        collect(
            [
                (RequestsPerMinute, &self.requests_per_minute),
                (TokensPerMinute, &self.tokens_per_minute),
                (TokensPerDay, &self.tokens_per_day),
                (TokensPerMonth, &self.tokens_per_month),
            ],
            [
                (MoneyPerDay, &self.money_per_day),
                (MoneyPerMonth, &self.money_per_month),
            ],
        )
    }
}

impl PoolBudget {
    pub(crate) fn specs(&self) -> Vec<Spec> {
        use LimitKind::*;
        collect(
            [
                (RequestsPerMinute, &self.requests_per_minute),
                (TokensPerMinute, &self.tokens_per_minute),
                (RequestsPerDay, &self.requests_per_day),
                (TokensPerDay, &self.tokens_per_day),
            ],
            [
                (MoneyPerDay, &self.money_per_day),
                (MoneyPerMonth, &self.money_per_month),
            ],
        )
    }
}

/// A problem in the `[budget]` table. `span` is a byte range in the config
/// text (as in `toml::Spanned`), for the caller to turn into file:line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetConfigError {
    pub span: Option<Range<usize>>,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for BudgetConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

fn error<T>(at: &Spanned<T>, message: String, hint: Option<&str>) -> BudgetConfigError {
    let span = at.span();
    BudgetConfigError {
        span: (span != (0..0)).then_some(span),
        message,
        hint: hint.map(str::to_owned),
    }
}

impl BudgetConfig {
    /// Every problem found, in file order of discovery; empty when valid.
    pub fn validate(&self) -> Vec<BudgetConfigError> {
        let mut errors = Vec::new();
        if jiff::tz::TimeZone::get(self.timezone.get_ref()).is_err() {
            errors.push(error(
                &self.timezone,
                format!("unknown time zone `{}`", self.timezone.get_ref()),
                Some("use an IANA name such as \"UTC\" or \"Europe/Berlin\""),
            ));
        }
        if self
            .alert_fractions
            .get_ref()
            .iter()
            .any(|f| !(*f > 0.0 && *f < 1.0))
        {
            errors.push(error(
                &self.alert_fractions,
                "alert fractions must lie strictly between 0 and 1".into(),
                Some("e.g. [0.8, 0.95]; reaching the limit itself always alerts"),
            ));
        }
        if let Some(url) = &self.webhook_url {
            let ok = url.get_ref().parse::<hyper::Uri>().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some()
            });
            if !ok {
                errors.push(error(
                    url,
                    format!("webhook_url `{}` is not an http(s) URL", url.get_ref()),
                    None,
                ));
            }
        }
        if *self.default_output_cap.get_ref() == 0 {
            errors.push(error(
                &self.default_output_cap,
                "default_output_cap must be at least 1".into(),
                Some("it is what a request without max_tokens reserves"),
            ));
        }
        errors.extend(self.ledger.validate());

        let mut tenants = std::collections::HashSet::new();
        for t in &self.tenants {
            let name = t.name.get_ref();
            if !tenants.insert(name) {
                errors.push(error(
                    &t.name,
                    format!("tenant `{name}` is listed twice"),
                    None,
                ));
            }
            check_specs(
                &mut errors,
                &t.name,
                &format!("tenant `{name}`"),
                &t.specs(),
            );
            if t.shed_at_edge
                && !t
                    .specs()
                    .iter()
                    .any(|(k, _, m)| *m == Mode::Hard && k.is_calendar_budget())
            {
                errors.push(error(
                    &t.name,
                    format!("tenant `{name}` sets shed_at_edge but has no hard day/month budget"),
                    Some("add e.g. tokens_per_day = { max = 1000000 }, or drop shed_at_edge"),
                ));
            }
            let mut keys = std::collections::HashSet::new();
            for k in &t.keys {
                let id = k.id.get_ref();
                if !keys.insert(id) {
                    errors.push(error(
                        &k.id,
                        format!("key `{id}` of tenant `{name}` is listed twice"),
                        None,
                    ));
                }
                check_specs(
                    &mut errors,
                    &k.id,
                    &format!("key `{id}` of tenant `{name}`"),
                    &k.specs(),
                );
            }
        }
        let mut pools = std::collections::HashSet::new();
        for p in &self.pools {
            let backend = p.backend.get_ref();
            if !pools.insert(backend) {
                errors.push(error(
                    &p.backend,
                    format!("pool for backend `{backend}` is listed twice"),
                    None,
                ));
            }
            check_specs(
                &mut errors,
                &p.backend,
                &format!("pool `{backend}`"),
                &p.specs(),
            );
        }
        errors
    }

    /// Pools must name configured backends; the caller passes their names.
    pub fn check_backends(&self, known: &[&str]) -> Vec<BudgetConfigError> {
        self.pools
            .iter()
            .filter(|p| !known.contains(&p.backend.get_ref().as_str()))
            .map(|p| {
                error(
                    &p.backend,
                    format!("pool names unknown backend `{}`", p.backend.get_ref()),
                    Some(&format!("defined backends: {}", known.join(", "))),
                )
            })
            .collect()
    }

    /// Alert thresholds in per mille, ascending, deduplicated.
    pub(crate) fn alert_permille(&self) -> Vec<u32> {
        let mut p: Vec<u32> = self
            .alert_fractions
            .get_ref()
            .iter()
            .filter(|f| **f > 0.0 && **f < 1.0)
            .map(|f| ((f * 1000.0).round() as u32).clamp(1, 999))
            .collect();
        p.sort_unstable();
        p.dedup();
        p
    }
}

fn check_specs(
    errors: &mut Vec<BudgetConfigError>,
    at: &Spanned<String>,
    owner: &str,
    specs: &[Spec],
) {
    for (kind, max, _) in specs {
        if *max == 0 {
            errors.push(error(
                at,
                format!("{owner}: {} must be greater than 0", kind.label()),
                Some("leave the key out for no limit"),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_parse_exactly_and_reject_floats_in_disguise() {
        assert_eq!(parse_dollars("12.50"), Ok(12_500_000));
        assert_eq!(parse_dollars("$0.000125"), Ok(125));
        assert_eq!(parse_dollars("7"), Ok(7_000_000));
        for bad in ["", "-1", "1.0000001", "1e3", "12,50", ".5"] {
            assert!(parse_dollars(bad).is_err(), "{bad}");
        }
        assert_eq!(format_dollars(12_500_000), "$12.50");
        assert_eq!(format_dollars(125), "$0.000125");
        assert_eq!(format_dollars(0), "$0.00");
    }

    #[test]
    fn parses_the_documented_example_and_reports_every_problem() {
        let text = r#"
timezone = "Europe/Berlin"
alert_fractions = [0.95, 0.8]
[[tenant]]
name = "team-a"
shed_at_edge = true
tokens_per_day = { max = 2000000 }
money_per_month = { max = "500.00", mode = "soft" }
[[tenant.key]]
id = "ci-bot"
requests_per_minute = { max = 10 }
[[pool]]
backend = "openai"
tokens_per_day = { max = 10000000 }
"#;
        let c: BudgetConfig = toml::from_str(text).unwrap();
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        assert_eq!(c.alert_permille(), vec![800, 950]);
        assert_eq!(c.tenants[0].specs().len(), 2);
        assert_eq!(
            c.tenants[0].money_per_month.unwrap().max,
            Dollars(500_000_000)
        );
        assert_eq!(c.check_backends(&["local"]).len(), 1);
        assert!(c.check_backends(&["openai"]).is_empty());

        let bad = text
            .replace("Europe/Berlin", "Mars/Olympus")
            .replace("2000000", "0")
            .replace("[0.95, 0.8]", "[1.5]");
        let c: BudgetConfig = toml::from_str(&bad).unwrap();
        let errors = c.validate();
        let all = errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(all.contains("unknown time zone `Mars/Olympus`"), "{all}");
        assert!(all.contains("between 0 and 1"), "{all}");
        assert!(
            all.contains("tokens_per_day must be greater than 0"),
            "{all}"
        );
        let tz = errors
            .iter()
            .find(|e| e.message.contains("time zone"))
            .unwrap();
        assert_eq!(&bad[tz.span.clone().unwrap()], "\"Mars/Olympus\"");

        let unknown = text.replace(
            "shed_at_edge = true",
            "shed_at_edge = true\ntokens_per_year = 1",
        );
        let e = toml::from_str::<BudgetConfig>(&unknown).unwrap_err();
        assert!(
            e.message().contains("unknown field `tokens_per_year`"),
            "{e}"
        );
        let money = text.replace("\"500.00\"", "500.5");
        assert!(
            toml::from_str::<BudgetConfig>(&money).is_err(),
            "money must be a string"
        );
    }

    #[test]
    fn shed_at_edge_needs_a_hard_calendar_budget() {
        let text =
            "[[tenant]]\nname = \"a\"\nshed_at_edge = true\ntokens_per_minute = { max = 5 }\n";
        let c: BudgetConfig = toml::from_str(text).unwrap();
        let e = c.validate();
        assert_eq!(e.len(), 1);
        assert!(e[0].message.contains("shed_at_edge"), "{e:?}");
    }
}
