//! The pure scheduler of one backend: capacity, queues, limits, rejections.
//! No I/O and no clock of its own: every call takes `now`.
//!
//! Invariant after every call that returns started jobs (an admitted
//! `submit`, `remove`): either the backend is full or no waiting job may
//! start (class and tenant caps), and the caller wakes exactly the jobs
//! returned. A new time window that loosens a class cap takes effect at the
//! next such call (the next arrival or finish), never later than one job's
//! run time on a busy backend. A rejection starts nothing, so it has nothing
//! to report.

use std::{collections::HashMap, sync::Arc, time::Duration};

use crate::idhash::IdHasher;

use super::{
    Job, JobId, Now, Rejection,
    config::{BackendPlan, Limits, Plan},
    policy::{Context, Head, PolicyState},
    queue::{ClassQueue, Waiting},
    stats::{ClassStats, DrainMeter, RejectReason, Stats},
};

/// Longest `Retry-After` we advise, whatever the drain rate says.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// A queued or started job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub id: JobId,
    /// The job's class (ids past the configured ones folded into the last).
    pub class: u32,
    /// When the job is rejected if it has not started.
    pub deadline: std::time::Instant,
    /// Jobs started by this call; contains `id` when it started at once.
    pub started: Vec<JobId>,
}

#[derive(Debug)]
struct Entry {
    job: Job,
    deadline: std::time::Instant,
    running: bool,
}

#[derive(Debug, Default)]
struct ClassState {
    queue: ClassQueue,
    in_flight: u32,
    drain: DrainMeter,
    stats: ClassStats,
}

#[derive(Debug)]
pub struct Scheduler {
    plan: Arc<Plan>,
    backend: BackendPlan,
    limits: Vec<Limits>,
    guaranteed: Vec<u32>,
    /// Local minute the limits were computed for (windows have minute resolution).
    limits_minute: Option<i64>,
    classes: Vec<ClassState>,
    policy: PolicyState,
    jobs: HashMap<JobId, Entry, IdHasher>,
    tenants_running: HashMap<u32, u32, IdHasher>,
    /// Reused for the policy's view of in-flight counts (no allocation per job).
    in_flight_scratch: Vec<u32>,
    in_flight: u32,
    queued: usize,
    next_id: JobId,
    drain: DrainMeter,
    /// Tests compare the fast path of `submit` with the general one.
    #[cfg(test)]
    general_only: bool,
}

impl Scheduler {
    pub fn new(plan: Arc<Plan>, backend: BackendPlan, now: Now) -> Scheduler {
        let n = plan.classes.len();
        let mut s = Scheduler {
            policy: PolicyState::new(plan.policy, n),
            plan,
            backend,
            limits: Vec::new(),
            guaranteed: Vec::new(),
            limits_minute: None,
            classes: (0..n).map(|_| ClassState::default()).collect(),
            jobs: HashMap::default(),
            tenants_running: HashMap::default(),
            in_flight_scratch: Vec::new(),
            in_flight: 0,
            queued: 0,
            next_id: 0,
            drain: DrainMeter::default(),
            #[cfg(test)]
            general_only: false,
        };
        s.refresh(now);
        s
    }

    /// Queues `job` (or starts it if it may start now). Class ids past the
    /// configured ones fall into the last class, like the kernel's default.
    pub fn submit(&mut self, mut job: Job, now: Now) -> Result<Ticket, Rejection> {
        self.refresh(now);
        job.class = job.class.min(self.classes.len() as u32 - 1);
        let class = job.class as usize;
        if !self.may_start(job.class, job.tenant) {
            if self.classes[class].queue.len() >= self.limits[class].max_queue as usize {
                return Err(self.reject(job.class, RejectReason::QueueFull, now));
            }
            if self.queued >= self.backend.max_queue as usize {
                return Err(self.reject(job.class, RejectReason::BackendSaturated, now));
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let deadline = now.at + self.limits[class].max_wait;
        #[cfg(test)]
        let general_only = self.general_only;
        #[cfg(not(test))]
        let general_only = false;
        self.jobs.insert(
            id,
            Entry {
                job,
                deadline,
                running: false,
            },
        );
        if self.queued == 0 && !general_only && self.may_start(job.class, job.tenant) {
            return Ok(self.start_alone(id, job, deadline, now));
        }
        self.classes[class].queue.push(Waiting {
            id,
            tenant: job.tenant,
            cost: job.cost,
            arrived: now.at,
        });
        self.queued += 1;
        self.policy.backlogged(job.class);
        let started = self.dispatch(now);
        Ok(Ticket {
            id,
            class: job.class,
            deadline,
            started,
        })
    }

    /// The job is done or its client left: a waiting job leaves the queue
    /// (counted as cancelled), a running one frees its slot. Unknown ids are
    /// ignored. Returns the jobs started in the freed room.
    pub fn remove(&mut self, id: JobId, now: Now) -> Vec<JobId> {
        self.refresh(now);
        if let Some(entry) = self.jobs.remove(&id) {
            let class = entry.job.class as usize;
            if entry.running {
                self.in_flight -= 1;
                self.classes[class].in_flight -= 1;
                if let Some(n) = self.tenants_running.get_mut(&entry.job.tenant) {
                    *n -= 1;
                    if *n == 0 {
                        self.tenants_running.remove(&entry.job.tenant);
                    }
                }
            } else {
                self.unqueue(id, &entry.job);
                self.classes[class].stats.cancelled += 1;
            }
        }
        self.dispatch(now)
    }

    /// Rejects a job that is still waiting at its deadline. `None` when it has
    /// started (or left) meanwhile, or its deadline is still ahead.
    pub fn time_out(&mut self, id: JobId, now: Now) -> Option<Rejection> {
        let entry = self.jobs.get(&id)?;
        if entry.running || now.at < entry.deadline {
            return None;
        }
        let job = entry.job;
        self.jobs.remove(&id);
        self.unqueue(id, &job);
        Some(self.reject(job.class, RejectReason::WaitTimeout, now))
    }

    pub fn stats(&self) -> Stats {
        Stats {
            capacity: self.backend.max_in_flight,
            in_flight: self.in_flight,
            classes: self
                .classes
                .iter()
                .map(|c| ClassStats {
                    queued: c.queue.len(),
                    in_flight: c.in_flight,
                    ..c.stats.clone()
                })
                .collect(),
        }
    }

    /// Queue fullness per class (0..=1) for the kernel feedback controller.
    /// Requests waiting, all classes together (cheap: no stats copied).
    pub fn queued(&self) -> usize {
        self.classes.iter().map(|c| c.queue.len()).sum()
    }

    pub fn fullness(&self) -> Vec<f64> {
        self.classes
            .iter()
            .zip(&self.limits)
            .map(|(c, l)| match l.max_queue {
                0 => (c.queue.len() > 0) as u8 as f64,
                max => (c.queue.len() as f64 / max as f64).min(1.0),
            })
            .collect()
    }

    /// Limits in force now: windows have minute resolution, so recompute on a
    /// new local minute only.
    fn refresh(&mut self, now: Now) {
        let minute = now.wall.as_second().div_euclid(60);
        if self.limits_minute == Some(minute) {
            return;
        }
        self.limits_minute = Some(minute);
        self.limits = self.plan.limits_at(now.wall);
        let capacity = self.backend.max_in_flight as f64;
        self.guaranteed = self
            .plan
            .shares(&self.limits)
            .into_iter()
            .map(|share| (share * capacity + 1e-9).floor() as u32)
            .collect();
    }

    fn tenant_may_start(&self, tenant: u32) -> bool {
        self.plan
            .tenant_cap(tenant)
            .is_none_or(|cap| self.tenants_running.get(&tenant).copied().unwrap_or(0) < cap)
    }

    fn class_may_start(&self, class: u32) -> bool {
        self.limits[class as usize]
            .max_in_flight
            .is_none_or(|cap| self.classes[class as usize].in_flight < cap)
    }

    fn may_start(&self, class: u32, tenant: u32) -> bool {
        self.in_flight < self.backend.max_in_flight
            && self.class_may_start(class)
            && self.tenant_may_start(tenant)
    }

    /// Starts waiting jobs, in policy order, while there is room.
    fn dispatch(&mut self, now: Now) -> Vec<JobId> {
        let mut started = Vec::new();
        while self.in_flight < self.backend.max_in_flight && self.queued > 0 {
            let heads: Vec<Head> = (0..self.classes.len() as u32)
                .filter(|&c| self.class_may_start(c))
                .filter_map(|c| {
                    let head = self.classes[c as usize]
                        .queue
                        .peek(|t| self.tenant_may_start(t))?;
                    Some(Head {
                        class: c,
                        id: head.id,
                        tenant: head.tenant,
                        cost: head.cost,
                        arrived: head.arrived,
                    })
                })
                .collect();
            let Some(head) = self.choose(&heads, now) else {
                break;
            };
            self.start_queued(head, now);
            started.push(head.id);
        }
        started
    }

    /// The policy's pick among `heads`, seeing the classes' in-flight counts.
    fn choose(&mut self, heads: &[Head], now: Now) -> Option<Head> {
        let mut in_flight = std::mem::take(&mut self.in_flight_scratch);
        in_flight.clear();
        in_flight.extend(self.classes.iter().map(|c| c.in_flight));
        let cx = Context {
            now: now.at,
            plan: &self.plan,
            limits: &self.limits,
            in_flight: &in_flight,
            guaranteed: &self.guaranteed,
        };
        let chosen = self.policy.choose(heads, &cx);
        self.in_flight_scratch = in_flight;
        chosen
    }

    /// `submit` of a job that may start while nothing waits: what queueing it
    /// and dispatching would do (the policy sees it as the only head, the
    /// tenant queue serves it at once), without the queue round trip. This is
    /// every request's path on a backend that is not saturated.
    fn start_alone(
        &mut self,
        id: JobId,
        job: Job,
        deadline: std::time::Instant,
        now: Now,
    ) -> Ticket {
        let head = Head {
            class: job.class,
            id,
            tenant: job.tenant,
            cost: job.cost,
            arrived: now.at,
        };
        self.policy.backlogged(job.class);
        let chosen = self.choose(std::slice::from_ref(&head), now);
        debug_assert!(chosen.is_some_and(|h| h.id == id), "a lone head is chosen");
        self.classes[job.class as usize]
            .queue
            .serve_alone(job.tenant, job.cost);
        self.start(head, now);
        Ticket {
            id,
            class: job.class,
            deadline,
            started: vec![id],
        }
    }

    /// `head` leaves its queue and runs.
    fn start_queued(&mut self, head: Head, now: Now) {
        self.classes[head.class as usize].queue.pop(head.tenant);
        self.queued -= 1;
        self.start(head, now);
    }

    /// `head`, out of the queue, runs.
    fn start(&mut self, head: Head, now: Now) {
        let class = &mut self.classes[head.class as usize];
        class.in_flight += 1;
        class.drain.departed(now.at);
        class.stats.admitted += 1;
        class
            .stats
            .wait
            .observe(now.at.saturating_duration_since(head.arrived));
        if class.queue.len() == 0 {
            self.policy.idle(head.class);
        }
        self.in_flight += 1;
        self.drain.departed(now.at);
        *self.tenants_running.entry(head.tenant).or_insert(0) += 1;
        if let Some(entry) = self.jobs.get_mut(&head.id) {
            entry.running = true;
        }
    }

    fn unqueue(&mut self, id: JobId, job: &Job) {
        let class = &mut self.classes[job.class as usize];
        if class.queue.remove(id, job.tenant).is_some() {
            self.queued -= 1;
            if class.queue.len() == 0 {
                self.policy.idle(job.class);
            }
        }
    }

    /// Counts the rejection and advises when to come back: the time the queue
    /// ahead needs at the drain rate seen lately (the class's own, else the
    /// backend's, else the class's max wait), in whole seconds, 1 s..=10 min.
    fn reject(&mut self, class: u32, reason: RejectReason, now: Now) -> Rejection {
        let c = &mut self.classes[class as usize];
        c.stats.rejected[reason.index()] += 1;
        let estimate = match reason {
            RejectReason::BackendSaturated => None,
            _ => c.drain.time_to_drain(c.queue.len() + 1, now.at),
        }
        .or_else(|| self.drain.time_to_drain(self.queued + 1, now.at))
        .unwrap_or(self.limits[class as usize].max_wait);
        // Whole seconds, rounded up from whole milliseconds so float noise in
        // the mean cannot add a second.
        let secs = (estimate.as_millis() as u64).div_ceil(1000);
        let retry_after = Duration::from_secs(secs).clamp(Duration::from_secs(1), MAX_RETRY_AFTER);
        Rejection {
            class,
            reason,
            retry_after,
        }
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
