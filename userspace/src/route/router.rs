//! The routing state that lives across requests: per-arm in-flight counts and
//! circuit breakers, per-route rotation and retry budgets. The decisions stay
//! in the pure functions of the parent module.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
    time::Instant,
};

use smallvec::SmallVec;

use super::{
    ArmConfig, ArmState, RouteConfig, RoutingConfig,
    breaker::{Breaker, RetryBudget},
};

pub struct ArmRuntime {
    /// Index into `[[backend]]`.
    pub backend: usize,
    in_flight: Arc<AtomicU32>,
    breaker: Mutex<Breaker>,
}

pub struct RouteRuntime {
    /// Position in `[[route]]` (a metrics key).
    pub index: usize,
    /// The model name, shared with every request routed here.
    pub name: Arc<str>,
    /// Normalized: the `backend` shorthand is a one-arm list.
    pub cfg: RouteConfig,
    pub arms: Vec<ArmRuntime>,
    rotation: AtomicUsize,
    retries: Mutex<RetryBudget>,
}

pub struct Router {
    pub cfg: RoutingConfig,
    routes: Vec<RouteRuntime>,
}

/// Counts a request against its arm while it is alive.
pub struct ArmGuard(Arc<AtomicU32>);

impl Drop for ArmGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Router {
    /// `routes` are normalized and `backend_of(name)` resolves arm backends
    /// (both checked when the config was loaded).
    pub fn new(
        cfg: RoutingConfig,
        routes: &[RouteConfig],
        backend_of: impl Fn(&str) -> usize,
    ) -> Router {
        let routes = routes
            .iter()
            .enumerate()
            .map(|(index, r)| RouteRuntime {
                index,
                name: r.model.get_ref().as_str().into(),
                arms: r
                    .arms
                    .iter()
                    .map(|a| ArmRuntime {
                        backend: backend_of(a.backend.get_ref()),
                        in_flight: Arc::new(AtomicU32::new(0)),
                        breaker: Mutex::new(Breaker::new(cfg.breaker.clone())),
                    })
                    .collect(),
                cfg: r.clone(),
                rotation: AtomicUsize::new(0),
                retries: Mutex::new(RetryBudget::new(cfg.retry_ratio, cfg.retry_min_per_sec)),
            })
            .collect();
        Router { cfg, routes }
    }

    pub fn find(&self, model: &str) -> Option<&RouteRuntime> {
        self.routes.iter().find(|r| r.cfg.model.get_ref() == model)
    }

    pub fn routes(&self) -> &[RouteRuntime] {
        &self.routes
    }
}

impl RouteRuntime {
    pub fn model(&self) -> &str {
        self.cfg.model.get_ref()
    }

    pub fn arm(&self, i: usize) -> (&ArmConfig, &ArmRuntime) {
        (&self.cfg.arms[i], &self.arms[i])
    }

    /// Live state of every arm, for [`super::plan`]; `gpu_util(i)` and
    /// `queue_len(backend)` come from the GPU poller and the schedulers.
    pub fn states(
        &self,
        now: Instant,
        gpu_util: impl Fn(&ArmConfig) -> Option<u32>,
        queue_len: impl Fn(usize) -> u32,
    ) -> SmallVec<[ArmState; 4]> {
        self.cfg
            .arms
            .iter()
            .zip(&self.arms)
            .map(|(cfg, rt)| ArmState {
                in_flight: rt.in_flight.load(Ordering::Relaxed),
                queue_len: queue_len(rt.backend),
                unavailable: rt
                    .breaker
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_open(now),
                gpu_util_pct: gpu_util(cfg),
                pool: None,
            })
            .collect()
    }

    /// A number that moves on with every request (round robin, random).
    pub fn next_rotation(&self) -> usize {
        self.rotation.fetch_add(1, Ordering::Relaxed)
    }

    pub fn begin(&self, arm: usize) -> ArmGuard {
        let c = self.arms[arm].in_flight.clone();
        c.fetch_add(1, Ordering::Relaxed);
        ArmGuard(c)
    }

    pub fn breaker_allows(&self, arm: usize, now: Instant) -> bool {
        self.arms[arm]
            .breaker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .try_acquire(now)
    }

    pub fn record(&self, arm: usize, success: bool, now: Instant) {
        let mut b = self.arms[arm]
            .breaker
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if success {
            b.on_success();
        } else {
            b.on_failure(now);
        }
    }

    pub fn on_request(&self, now: Instant) {
        self.retries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .on_request(now);
    }

    pub fn try_retry(&self, now: Instant) -> bool {
        self.retries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .try_retry(now)
    }
}
