//! Priority scheduling with fairness: who waits and who goes first when a
//! backend is busy.
//!
//! # Wiring (for the request path)
//!
//! 1. Config: embed [`ScheduleConfig`] as `[schedule]` (`#[serde(default)]`)
//!    and call [`ScheduleConfig::resolve`] with the `[[class]]` names and
//!    priorities (class id = position), the backend names and the tenant
//!    ids; a [`ScheduleError`] carries the value's byte span for file:line.
//! 2. Per backend: `Gate::new(plan.clone(), plan.backend(name))`.
//! 3. Per request, after classification and before the upstream call:
//!    `gate.acquire(Job { class, tenant, cost }).await` where `cost` is the
//!    estimated prompt tokens + `max_tokens`. Hold the [`Permit`] until the
//!    response body (stream included) is finished; dropping it frees the
//!    slot. If the client disconnects while queued, dropping the `acquire`
//!    future leaves the queue at once.
//! 4. A [`Rejection`] becomes an OpenAI-style error with
//!    [`Rejection::status`] and `Retry-After: {retry_after_secs()}`.
//! 5. `/metrics`: [`Gate::stats`] (queue depth, in flight, admissions,
//!    rejections by [`RejectReason`], wait histogram over [`WAIT_BUCKETS`]).
//! 6. Kernel feedback: `AdmissionController::new(plan.feedback.clone(),
//!    plan.classes.len())`; every ~250 ms feed it [`Gate::fullness`] (the
//!    worst backend per class when there are several) and write the changed
//!    `(class, permille)` pairs into the `ADMISSION` map.
//!
//! # Config
//!
//! ```toml
//! [schedule]
//! policy = "drr"                 # strict | wfq | drr | at_least
//! timezone = "Europe/Berlin"     # for windows
//! quantum = 4096                 # drr: tokens per round per unit of weight
//! decay = 0.5                    # at_least: geometric split of unclaimed shares
//! max_in_flight = 16             # per backend, unless [[schedule.backend]] says
//! max_queue = 1024               # waiting requests per backend, all classes
//! tenant_max_in_flight = 4       # optional; [[schedule.tenant]] overrides
//! aging = { step_ms = 2000, max_boost = 2 }
//! feedback = { high = 0.9, low = 0.5, hold_full_ms = 2000, hold_drained_ms = 5000 }
//!
//! [[schedule.class]]
//! name = "batch"                 # a [[class]] name
//! weight = 1
//! min_share = 0.1
//! max_queue = 256
//! max_wait_ms = 30000
//! max_in_flight = 4
//! [[schedule.class.window]]      # nights on weekdays: batch gets more
//! days = ["mon", "tue", "wed", "thu", "fri"]
//! start = "22:00"
//! end = "06:00"
//! weight = 4
//! min_share = 0.5
//!
//! [[schedule.backend]]
//! name = "local"                 # a [[backend]] name
//! max_in_flight = 8
//!
//! [[schedule.tenant]]
//! name = "acme"                  # a tenant from [[network]]
//! max_in_flight = 2
//! ```
//!
//! # Decisions
//!
//! - Capacity: `max_in_flight` per backend; optional `max_in_flight` per class
//!   and per tenant (per backend). A job starts when all three allow it.
//! - Policies between classes ([`Policy`]): `strict` (priority, aged);
//!   `wfq` (weighted fair queuing on token cost); `drr` (deficit round robin,
//!   quantum = weight × `quantum` tokens, so cost is tokens); `at_least`
//!   (each class is guaranteed `floor(share × max_in_flight)` slots, shares
//!   explicit or split geometrically by `decay`; a class below its
//!   guarantee goes first, otherwise idle capacity is lent by aged priority;
//!   nothing is preempted, so a returning class gets its share back as
//!   borrowed slots finish).
//! - Within a class: FIFO per tenant, tenants served fairly by token cost.
//! - Aging (strict, at_least): one priority level per `aging.step_ms` of
//!   waiting, at most `aging.max_boost` levels and never above the top
//!   priority; ties go to the earlier arrival, so a low-class job that has
//!   aged up to the top level is served before younger top-class jobs.
//! - Windows: a class's weight, share and limits follow the first matching
//!   `[[schedule.class.window]]` in `timezone`, re-read on the first call of
//!   each new local minute (a busy backend has calls every few ms).
//! - `max_queue = 0` for a class means no waiting: start now or 429.
//! - Rejections: **429** when the request's own class queue is at its
//!   `max_queue` (that class is sending more than it drains: slow down);
//!   **503** when the backend as a whole is saturated (all classes together at
//!   the backend's `max_queue`) or the request waited `max_wait_ms` without a
//!   slot. `Retry-After` is the queue ahead divided by the drain rate seen
//!   lately, 1 s..=600 s.

mod config;
mod feedback;
mod gate;
mod policy;
mod queue;
mod scheduler;
mod stats;
mod window;

use std::time::{Duration, Instant};

use jiff::Timestamp;

pub use config::{
    Aging, BackendPlan, BackendSchedule, ClassRef, ClassSchedule, Limits, Plan, Policy,
    ScheduleConfig, ScheduleError, TenantSchedule, Window,
};
pub use feedback::{AdmissionController, FULL_ADMISSION, FeedbackConfig};
pub use gate::{Gate, Permit};
pub use scheduler::{Scheduler, Ticket};
pub use stats::{ClassStats, RejectReason, Stats, WAIT_BUCKETS, WaitHistogram};

/// Identifies a job inside one backend's scheduler.
pub type JobId = u64;

/// A request asking for a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Job {
    pub class: u32,
    /// Tenant id (0 when the request has none).
    pub tenant: u32,
    /// Estimated prompt tokens + `max_tokens`.
    pub cost: u64,
}

/// The time of a decision: monotonic for waits and rates, wall-clock for
/// time windows. Tests pass a simulated one.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub at: Instant,
    pub wall: Timestamp,
}

impl Now {
    /// The wall clock to a tick (time windows have minute resolution); the
    /// monotonic one precise, since a max wait is a promise to the client.
    pub fn system() -> Now {
        Now {
            at: Instant::now(),
            wall: crate::clock::coarse_timestamp(),
        }
    }
}

/// A request that will not be served; see the module docs for the statuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub class: u32,
    pub reason: RejectReason,
    /// Whole seconds, at least one.
    pub retry_after: Duration,
}

impl Rejection {
    pub fn status(&self) -> u16 {
        match self.reason {
            RejectReason::QueueFull => 429,
            RejectReason::BackendSaturated | RejectReason::WaitTimeout => 503,
        }
    }

    /// The `Retry-After` header value.
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs()
    }
}
