//! Routing: which arm serves a request, and in which order the others are
//! tried when it fails. Pure: the caller passes the live state (GPU load, queue
//! lengths, limit-pool scarcity, breaker state, cloud budget) and gets back an
//! ordered plan with one reason that explains it.
//!
//! A route is a model name clients use; its arms are (backend, upstream model)
//! pairs with a kind (local GPU or cloud), prices, a context limit, a quality
//! weight and per-task strengths.

pub mod breaker;
mod router;
pub mod task;

use std::collections::BTreeMap;

use serde::Deserialize;
use smallvec::SmallVec;
use toml::Spanned;

pub use self::router::{ArmGuard, RouteRuntime, Router};

pub use self::task::{Complexity, TaskKind, TaskLabel};

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The model name clients ask for.
    pub model: Spanned<String>,
    /// Shorthand for a route with one local arm on this backend.
    pub backend: Option<Spanned<String>>,
    /// With `backend`: the model name that backend knows (default: `model`).
    pub upstream_model: Option<String>,
    #[serde(rename = "arm", default)]
    pub arms: Vec<ArmConfig>,
    #[serde(default)]
    pub policy: PolicyKind,
    /// local_first: prompts longer than this go to the cloud.
    #[serde(default = "default_context_threshold")]
    pub cloud_context_threshold: u64,
    /// local_first: GPU utilization above which the local arms count as saturated.
    #[serde(default = "default_gpu_saturated_pct")]
    pub gpu_saturated_pct: u32,
    /// local_first: local queue length above which the cloud is preferred.
    #[serde(default = "default_queue_threshold")]
    pub local_queue_threshold: u32,
    /// Classes with this priority number or better may use the cloud even when
    /// the cloud budget is spent.
    pub cloud_override_priority: Option<u8>,
    #[serde(default)]
    pub balance: Balance,
}

fn default_context_threshold() -> u64 {
    4096
}
fn default_gpu_saturated_pct() -> u32 {
    90
}
fn default_queue_threshold() -> u32 {
    8
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ArmConfig {
    pub backend: Spanned<String>,
    /// Model name sent upstream (default: the route's model).
    pub upstream_model: Option<String>,
    #[serde(default = "local")]
    pub kind: ArmKind,
    /// USD per million input tokens (= micro-dollars per token).
    #[serde(default)]
    pub price_input_per_mtok: f64,
    #[serde(default)]
    pub price_output_per_mtok: f64,
    /// Prompt + completion tokens the arm accepts (default: no limit).
    #[serde(default = "unlimited")]
    pub max_context: u64,
    #[serde(default = "one")]
    pub quality: f64,
    /// Concurrency cap handed to the scheduler (0 = none).
    #[serde(default)]
    pub max_in_flight: u32,
    /// GPU indices this (local) arm runs on.
    #[serde(default)]
    pub gpus: Vec<u32>,
    /// Multipliers of value by task kind (default 1.0).
    #[serde(default)]
    pub strengths: BTreeMap<TaskKind, f64>,
}

fn one() -> f64 {
    1.0
}

fn local() -> ArmKind {
    ArmKind::Local
}

fn unlimited() -> u64 {
    u64::MAX / 2
}

impl RouteConfig {
    /// The arms, with the `backend = ...` shorthand made a single local arm.
    pub fn normalized(&self) -> Result<RouteConfig, (Option<std::ops::Range<usize>>, String)> {
        let mut r = self.clone();
        match (&self.backend, self.arms.is_empty()) {
            (Some(b), true) => {
                r.arms = vec![ArmConfig {
                    backend: b.clone(),
                    upstream_model: self.upstream_model.clone(),
                    kind: ArmKind::Local,
                    price_input_per_mtok: 0.0,
                    price_output_per_mtok: 0.0,
                    max_context: unlimited(),
                    quality: 1.0,
                    max_in_flight: 0,
                    gpus: Vec::new(),
                    strengths: BTreeMap::new(),
                }];
                Ok(r)
            }
            (Some(b), false) => Err((
                Some(b.span()),
                "a route has either `backend` (one arm) or [[route.arm]] tables, not both".into(),
            )),
            (None, true) => Err((
                Some(self.model.span()),
                format!(
                    "route `{}` has no `backend` and no [[route.arm]]",
                    self.model.get_ref()
                ),
            )),
            (None, false) => Ok(r),
        }
    }
}

/// Retries, backoff and breakers for every route: `[routing]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Add `x-kedge-route: <arm backend>; reason=<reason>` to responses.
    #[serde(default = "yes")]
    pub explain_header: bool,
    /// Arms tried per request at most (the first included).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Retries allowed per request, as a share of requests (plus `retry_min_per_sec`).
    #[serde(default = "default_retry_ratio")]
    pub retry_ratio: f64,
    #[serde(default = "default_retry_floor")]
    pub retry_min_per_sec: f64,
    #[serde(default = "default_backoff_base")]
    pub backoff_base_ms: u64,
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
    #[serde(default)]
    pub breaker: breaker::BreakerConfig,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            explain_header: true,
            max_attempts: default_attempts(),
            retry_ratio: default_retry_ratio(),
            retry_min_per_sec: default_retry_floor(),
            backoff_base_ms: default_backoff_base(),
            backoff_max_ms: default_backoff_max(),
            breaker: breaker::BreakerConfig::default(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_attempts() -> u32 {
    3
}
fn default_retry_ratio() -> f64 {
    0.2
}
fn default_retry_floor() -> f64 {
    2.0
}
fn default_backoff_base() -> u64 {
    25
}
fn default_backoff_max() -> u64 {
    1000
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ArmKind {
    Local,
    Cloud,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// Local GPU first; the cloud for long prompts, a saturated GPU or a long
    /// local queue, while the cloud budget allows.
    #[default]
    LocalFirst,
    /// Highest `quality × value / effective cost` first.
    Score,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    LeastInFlight,
    RoundRobin,
    Random,
}

/// What is known about one arm right now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ArmState {
    pub in_flight: u32,
    /// Requests waiting for this arm's backend.
    pub queue_len: u32,
    /// Breaker open and not yet due a probe.
    pub unavailable: bool,
    /// Hottest of the arm's GPUs, if known.
    pub gpu_util_pct: Option<u32>,
    /// The tightest limit pool the arm draws from.
    pub pool: Option<PoolScarcity>,
}

/// How close a provider limit pool is to exhaustion.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PoolScarcity {
    /// 0..=1 of the window's quota still available.
    pub remaining_fraction: f64,
    pub seconds_to_reset: f64,
}

/// What the router needs to know about the request.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteRequest {
    pub prompt_tokens: u64,
    /// `max_tokens` or the configured cap.
    pub max_output_tokens: u64,
    pub task: TaskLabel,
    /// The class's priority number (0 = highest).
    pub priority: u8,
    /// The cloud money budget still allows this request.
    pub cloud_budget_ok: bool,
}

/// Why the plan is what it is: the access log, the response header and the
/// `reason` label of the routing metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    LocalFirst,
    ContextTooLong,
    GpuSaturated,
    LocalQueueLong,
    /// Every local arm that could take the request has an open breaker.
    LocalUnavailable,
    /// The cloud was wanted but its budget is spent: queue for local.
    CloudBudgetSpent,
    /// The cloud was wanted, its budget is spent, but the class may override.
    CloudOverride,
    Score,
    /// No arm can take the request (context too long everywhere, all unavailable).
    NoArm,
}

impl Reason {
    pub const ALL: [Reason; 9] = [
        Reason::LocalFirst,
        Reason::ContextTooLong,
        Reason::GpuSaturated,
        Reason::LocalQueueLong,
        Reason::LocalUnavailable,
        Reason::CloudBudgetSpent,
        Reason::CloudOverride,
        Reason::Score,
        Reason::NoArm,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::LocalFirst => "local_first",
            Reason::ContextTooLong => "context_too_long",
            Reason::GpuSaturated => "gpu_saturated",
            Reason::LocalQueueLong => "local_queue_long",
            Reason::LocalUnavailable => "local_unavailable",
            Reason::CloudBudgetSpent => "cloud_budget_spent",
            Reason::CloudOverride => "cloud_override",
            Reason::Score => "score",
            Reason::NoArm => "no_arm",
        }
    }
}

/// Arms to try, in order (indices into the route's arms), and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub order: Arms,
    pub reason: Reason,
}

impl ArmConfig {
    /// Expected price of the request on this arm, in micro-dollars.
    pub fn cost_micros(&self, prompt_tokens: u64, output_tokens: u64) -> u64 {
        (prompt_tokens as f64 * self.price_input_per_mtok
            + output_tokens as f64 * self.price_output_per_mtok)
            .ceil() as u64
    }

    fn fits(&self, req: &RouteRequest) -> bool {
        req.prompt_tokens + req.max_output_tokens <= self.max_context
    }
}

/// Arm indices of one route, in some order. A route has a handful of arms:
/// kept inline, so planning a request allocates nothing.
pub type Arms = SmallVec<[usize; 8]>;

/// Plans one request on `route`. `states[i]` is arm i's live state; `rotation`
/// is a per-route counter (round robin) or any random number (random).
pub fn plan(route: &RouteConfig, req: &RouteRequest, states: &[ArmState], rotation: usize) -> Plan {
    let fitting: Arms = (0..route.arms.len())
        .filter(|&i| !states.get(i).is_some_and(|s| s.unavailable))
        .filter(|&i| route.arms[i].fits(req))
        .collect();
    if fitting.is_empty() {
        return Plan {
            order: Arms::new(),
            reason: Reason::NoArm,
        };
    }
    let local_down = !route
        .arms
        .iter()
        .enumerate()
        .any(|(i, a)| a.kind == ArmKind::Local && a.fits(req) && fitting.contains(&i))
        && route
            .arms
            .iter()
            .any(|a| a.kind == ArmKind::Local && a.fits(req));
    match route.policy {
        PolicyKind::LocalFirst => {
            plan_local_first(route, req, states, &fitting, rotation, local_down)
        }
        PolicyKind::Score => plan_by_score(route, req, states, &fitting, rotation),
    }
}

fn plan_local_first(
    route: &RouteConfig,
    req: &RouteRequest,
    states: &[ArmState],
    fitting: &[usize],
    rotation: usize,
    local_down: bool,
) -> Plan {
    let of_kind = |kind| -> Arms {
        let arms: Arms = fitting
            .iter()
            .copied()
            .filter(|&i| route.arms[i].kind == kind)
            .collect();
        balanced(route.balance, arms, states, rotation)
    };
    let local = of_kind(ArmKind::Local);
    let cloud = of_kind(ArmKind::Cloud);
    let state = |i: usize| states.get(i).cloned().unwrap_or_default();

    let want_cloud = if local_down {
        Some(Reason::LocalUnavailable)
    } else if local.is_empty() || req.prompt_tokens > route.cloud_context_threshold {
        Some(Reason::ContextTooLong)
    } else if local.iter().all(|&i| {
        state(i)
            .gpu_util_pct
            .is_some_and(|u| u > route.gpu_saturated_pct)
    }) {
        Some(Reason::GpuSaturated)
    } else if local
        .iter()
        .all(|&i| state(i).queue_len > route.local_queue_threshold)
    {
        Some(Reason::LocalQueueLong)
    } else {
        None
    };
    let may_override = route
        .cloud_override_priority
        .is_some_and(|p| req.priority <= p);
    let concat = |a: &[usize], b: &[usize]| a.iter().chain(b).copied().collect::<Arms>();
    match want_cloud {
        Some(reason) if !cloud.is_empty() && req.cloud_budget_ok => Plan {
            order: concat(&cloud, &local),
            reason,
        },
        Some(_) if !cloud.is_empty() && may_override => Plan {
            order: concat(&cloud, &local),
            reason: Reason::CloudOverride,
        },
        Some(_) if !local.is_empty() && !cloud.is_empty() => Plan {
            order: local,
            reason: Reason::CloudBudgetSpent,
        },
        Some(_) if local.is_empty() && !req.cloud_budget_ok => Plan {
            order: Arms::new(),
            reason: Reason::CloudBudgetSpent,
        },
        Some(reason) => Plan {
            order: concat(&local, &cloud),
            reason,
        },
        None => Plan {
            order: if req.cloud_budget_ok {
                concat(&local, &cloud)
            } else {
                local
            },
            reason: Reason::LocalFirst,
        },
    }
}

/// `quality^(1 + k) × value / effective cost`, where k grows with complexity
/// (demanding work cares more about quality), value is the arm's strength for
/// the task, and effective cost is the expected price made dearer by pool
/// scarcity and local load, and cheaper for quota about to reset unused.
pub fn score(arm: &ArmConfig, state: &ArmState, req: &RouteRequest) -> f64 {
    let k = match req.task.complexity {
        Complexity::Low => 0.0,
        Complexity::Medium => 0.5,
        Complexity::High => 1.0,
    };
    let value = arm.strengths.get(&req.task.kind).copied().unwrap_or(1.0);
    // A floor of 0.01 µ$/token keeps free (local) arms comparable instead of infinite.
    let base = (arm.cost_micros(req.prompt_tokens, req.max_output_tokens) as f64)
        .max(0.01 * (req.prompt_tokens + req.max_output_tokens).max(1) as f64);
    let mut multiplier = 1.0;
    if let Some(pool) = state.pool {
        let r = pool.remaining_fraction.clamp(0.0, 1.0);
        multiplier /= r.max(0.05);
        if pool.seconds_to_reset < 60.0 && r > 0.5 {
            multiplier *= 0.5; // use it or lose it
        }
    }
    if arm.kind == ArmKind::Local {
        if let Some(u) = state.gpu_util_pct {
            multiplier *= 1.0 + (u.min(99) as f64 / (100.0 - u.min(99) as f64)) / 10.0;
        }
        if arm.max_in_flight > 0 {
            multiplier *= 1.0 + state.in_flight as f64 / arm.max_in_flight as f64;
        }
    }
    arm.quality.max(0.0).powf(1.0 + k) * value / (base * multiplier)
}

fn plan_by_score(
    route: &RouteConfig,
    req: &RouteRequest,
    states: &[ArmState],
    fitting: &[usize],
    rotation: usize,
) -> Plan {
    let state = |i: usize| states.get(i).cloned().unwrap_or_default();
    let candidates: Arms = fitting
        .iter()
        .copied()
        .filter(|&i| req.cloud_budget_ok || route.arms[i].kind == ArmKind::Local)
        .collect();
    // Equal scores are balanced among themselves, so rank by score bands.
    let mut scored: SmallVec<[(f64, usize); 8]> = candidates
        .iter()
        .map(|&i| (score(&route.arms[i], &state(i), req), i))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut order = Arms::new();
    let mut i = 0;
    while i < scored.len() {
        let mut j = i + 1;
        while j < scored.len() && (scored[j].0 - scored[i].0).abs() <= scored[i].0 * 1e-9 {
            j += 1;
        }
        let band: Arms = scored[i..j].iter().map(|s| s.1).collect();
        order.extend(balanced(route.balance, band, states, rotation));
        i = j;
    }
    Plan {
        order,
        reason: if candidates.is_empty() {
            Reason::CloudBudgetSpent
        } else {
            Reason::Score
        },
    }
}

/// Orders equivalent arms by the balancing rule.
fn balanced(balance: Balance, mut out: Arms, states: &[ArmState], rotation: usize) -> Arms {
    if out.len() < 2 {
        return out;
    }
    match balance {
        Balance::LeastInFlight => {
            out.sort_by_key(|&i| (states.get(i).map_or(0, |s| s.in_flight), i));
        }
        Balance::RoundRobin | Balance::Random => {
            let n = out.len();
            out.rotate_left(rotation % n);
        }
    }
    out
}

/// Why an upstream attempt failed, when that failure may be retried elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailoverCause {
    Connect,
    Timeout,
    RateLimited,
    ServerError,
    ContextLength,
}

impl FailoverCause {
    pub fn label(self) -> &'static str {
        match self {
            FailoverCause::Connect => "connect",
            FailoverCause::Timeout => "timeout",
            FailoverCause::RateLimited => "rate_limited",
            FailoverCause::ServerError => "server_error",
            FailoverCause::ContextLength => "context_length",
        }
    }

    /// Classifies an upstream answer (status and, for 400, the body) that came
    /// back before any byte reached the client. `None`: not retryable.
    pub fn from_response(status: u16, body: &[u8]) -> Option<FailoverCause> {
        match status {
            429 => Some(FailoverCause::RateLimited),
            500..=599 => Some(FailoverCause::ServerError),
            400 | 413 => {
                let text = String::from_utf8_lossy(body).to_lowercase();
                (text.contains("context_length_exceeded")
                    || text.contains("maximum context length")
                    || text.contains("context length"))
                .then_some(FailoverCause::ContextLength)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arm(backend: &str, kind: ArmKind, price: f64, max_context: u64) -> ArmConfig {
        ArmConfig {
            backend: Spanned::new(0..0, backend.into()),
            upstream_model: None,
            kind,
            price_input_per_mtok: price,
            price_output_per_mtok: price * 4.0,
            max_context,
            quality: 1.0,
            max_in_flight: 0,
            gpus: vec![0],
            strengths: BTreeMap::new(),
        }
    }

    fn route(policy: PolicyKind) -> RouteConfig {
        RouteConfig {
            model: Spanned::new(0..0, "llama".into()),
            backend: None,
            upstream_model: None,
            arms: vec![
                arm("gpu-a", ArmKind::Local, 0.0, 8192),
                arm("gpu-b", ArmKind::Local, 0.0, 8192),
                arm("cloud", ArmKind::Cloud, 2.5, 128_000),
            ],
            policy,
            cloud_context_threshold: 4096,
            gpu_saturated_pct: 90,
            local_queue_threshold: 8,
            cloud_override_priority: Some(0),
            balance: Balance::LeastInFlight,
        }
    }

    fn req(prompt: u64) -> RouteRequest {
        RouteRequest {
            prompt_tokens: prompt,
            max_output_tokens: 256,
            task: TaskLabel {
                kind: TaskKind::Chat,
                complexity: Complexity::Low,
                signals: vec![],
            },
            priority: 2,
            cloud_budget_ok: true,
        }
    }

    fn states(n: usize) -> Vec<ArmState> {
        vec![ArmState::default(); n]
    }

    #[test]
    fn local_first_prefers_the_least_busy_gpu_then_fails_over_to_cloud() {
        let r = route(PolicyKind::LocalFirst);
        let mut s = states(3);
        s[0].in_flight = 5;
        let p = plan(&r, &req(100), &s, 0);
        assert_eq!(
            p,
            Plan {
                order: Arms::from_slice(&[1, 0, 2]),
                reason: Reason::LocalFirst
            }
        );
    }

    #[test]
    fn long_prompts_saturated_gpus_and_long_queues_go_to_the_cloud() {
        let r = route(PolicyKind::LocalFirst);
        let p = plan(&r, &req(5000), &states(3), 0);
        assert_eq!((p.order[0], p.reason), (2, Reason::ContextTooLong));
        // Too long for the local context entirely: the cloud only.
        let p = plan(&r, &req(9000), &states(3), 0);
        assert_eq!(
            p,
            Plan {
                order: Arms::from_slice(&[2]),
                reason: Reason::ContextTooLong
            }
        );

        let mut s = states(3);
        s[0].gpu_util_pct = Some(95);
        s[1].gpu_util_pct = Some(91);
        assert_eq!(plan(&r, &req(100), &s, 0).reason, Reason::GpuSaturated);
        s[1].gpu_util_pct = Some(50);
        assert_eq!(plan(&r, &req(100), &s, 0).reason, Reason::LocalFirst);

        let mut s = states(3);
        s[0].queue_len = 20;
        s[1].queue_len = 9;
        assert_eq!(plan(&r, &req(100), &s, 0).reason, Reason::LocalQueueLong);
    }

    #[test]
    fn spent_cloud_budget_queues_for_local_unless_the_class_may_override() {
        let r = route(PolicyKind::LocalFirst);
        let mut q = req(5000);
        q.cloud_budget_ok = false;
        let p = plan(&r, &q, &states(3), 0);
        assert_eq!(
            p,
            Plan {
                order: Arms::from_slice(&[0, 1]),
                reason: Reason::CloudBudgetSpent
            }
        );
        q.priority = 0;
        let p = plan(&r, &q, &states(3), 0);
        assert_eq!((p.order[0], p.reason), (2, Reason::CloudOverride));
        // Nothing local fits and no budget: nothing to try.
        let mut q = req(9000);
        q.cloud_budget_ok = false;
        assert!(plan(&r, &q, &states(3), 0).order.is_empty());
        // Without the cloud budget a short prompt never fails over to the cloud.
        let mut q = req(100);
        q.cloud_budget_ok = false;
        assert_eq!(plan(&r, &q, &states(3), 0).order[..], [0, 1]);
    }

    #[test]
    fn unavailable_arms_are_skipped() {
        let r = route(PolicyKind::LocalFirst);
        let mut s = states(3);
        s[0].unavailable = true;
        s[1].unavailable = true;
        let p = plan(&r, &req(100), &s, 0);
        assert_eq!(p.order[..], [2]);
        assert_eq!(p.reason, Reason::LocalUnavailable, "no local arm left");
        s[2].unavailable = true;
        assert_eq!(plan(&r, &req(100), &s, 0).reason, Reason::NoArm);
    }

    #[test]
    fn round_robin_rotates_among_equals() {
        let mut r = route(PolicyKind::LocalFirst);
        r.balance = Balance::RoundRobin;
        assert_eq!(plan(&r, &req(1), &states(3), 0).order[0], 0);
        assert_eq!(plan(&r, &req(1), &states(3), 1).order[0], 1);
        assert_eq!(plan(&r, &req(1), &states(3), 2).order[0], 0);
    }

    #[test]
    fn score_weighs_quality_strengths_price_and_scarcity() {
        let mut r = route(PolicyKind::Score);
        r.arms[2].quality = 3.0;
        r.arms[2].strengths.insert(TaskKind::Code, 2.0);
        let s = states(3);
        // Cheap local arms win plain chat.
        let p = plan(&r, &req(100), &s, 0);
        assert_eq!(p.reason, Reason::Score);
        assert_eq!(p.order[2], 2);
        // Demanding code work: quality and strength outweigh the price.
        let mut q = req(6000);
        q.task = TaskLabel {
            kind: TaskKind::Code,
            complexity: Complexity::High,
            signals: vec![],
        };
        let local = score(&r.arms[0], &s[0], &q);
        let cloud = score(&r.arms[2], &s[2], &q);
        assert!(
            cloud < local,
            "price still dominates at 2.5 $/Mtok: {cloud} vs {local}"
        );
        r.arms[2].price_input_per_mtok = 0.01;
        r.arms[2].price_output_per_mtok = 0.01;
        assert_eq!(plan(&r, &q, &s, 0).order[0], 2);
        // A nearly exhausted pool makes the same arm dearer.
        let mut scarce = s.clone();
        scarce[2].pool = Some(PoolScarcity {
            remaining_fraction: 0.05,
            seconds_to_reset: 3600.0,
        });
        assert!(score(&r.arms[2], &scarce[2], &q) < score(&r.arms[2], &s[2], &q) / 10.0);
        // Unused quota about to reset is discounted.
        let mut resetting = s.clone();
        resetting[2].pool = Some(PoolScarcity {
            remaining_fraction: 0.9,
            seconds_to_reset: 10.0,
        });
        assert!(score(&r.arms[2], &resetting[2], &q) > score(&r.arms[2], &s[2], &q));
    }

    #[test]
    fn local_load_lowers_the_score() {
        let r = route(PolicyKind::Score);
        let mut a = r.arms[0].clone();
        a.max_in_flight = 4;
        let idle = ArmState::default();
        let busy = ArmState {
            in_flight: 4,
            gpu_util_pct: Some(95),
            ..Default::default()
        };
        assert!(score(&a, &busy, &req(100)) < score(&a, &idle, &req(100)) / 2.0);
    }

    #[test]
    fn failover_causes() {
        assert_eq!(
            FailoverCause::from_response(429, b""),
            Some(FailoverCause::RateLimited)
        );
        assert_eq!(
            FailoverCause::from_response(503, b""),
            Some(FailoverCause::ServerError)
        );
        let body = br#"{"error":{"code":"context_length_exceeded"}}"#;
        assert_eq!(
            FailoverCause::from_response(400, body),
            Some(FailoverCause::ContextLength)
        );
        assert_eq!(FailoverCause::from_response(400, b"bad json"), None);
        assert_eq!(FailoverCause::from_response(401, b""), None);
    }

    #[test]
    fn config_parses_with_defaults() {
        let r: RouteConfig = toml::from_str(
            r#"
            model = "llama"
            [[arm]]
            backend = "gpu"
            kind = "local"
            max_context = 8192
            [[arm]]
            backend = "cloud"
            kind = "cloud"
            upstream_model = "gpt-4o-mini"
            price_input_per_mtok = 0.15
            price_output_per_mtok = 0.6
            max_context = 128000
            strengths = { code = 1.5 }
            "#,
        )
        .unwrap();
        assert_eq!(r.policy, PolicyKind::LocalFirst);
        assert_eq!(r.cloud_context_threshold, 4096);
        assert_eq!(r.arms[1].strengths[&TaskKind::Code], 1.5);
        assert_eq!(r.arms[1].cost_micros(1_000_000, 0), 150_000);
        assert!(toml::from_str::<RouteConfig>("model = \"x\"\narm = []\nbogus = 1").is_err());
        let short: RouteConfig = toml::from_str("model = \"m\"\nbackend = \"gpu\"").unwrap();
        let n = short.normalized().unwrap();
        assert_eq!((n.arms.len(), n.arms[0].kind), (1, ArmKind::Local));
        assert!(r.normalized().is_ok());
        let none: RouteConfig = toml::from_str("model = \"m\"").unwrap();
        assert!(none.normalized().unwrap_err().1.contains("no `backend`"));
    }
}
