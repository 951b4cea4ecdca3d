//! The async face of one backend's [`Scheduler`]: `acquire` waits in the queue
//! and resolves to a [`Permit`]; dropping the permit frees the slot.
//!
//! Each waiter parks on its own oneshot, sent by whichever call started its
//! job (under the same lock), so nothing polls. A waiter whose future is
//! dropped leaves the queue in that drop, and if it had just been started it
//! gives the slot straight back.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

use crate::idhash::IdHasher;

use super::{
    Job, JobId, Now, Rejection,
    config::{BackendPlan, Plan},
    scheduler::Scheduler,
    stats::Stats,
};

struct State {
    scheduler: Scheduler,
    waiters: HashMap<JobId, oneshot::Sender<()>, IdHasher>,
}

impl State {
    fn wake(&mut self, started: &[JobId]) {
        for id in started {
            if let Some(tx) = self.waiters.remove(id) {
                // A closed receiver means the waiter is being dropped; its
                // guard frees the slot under this same lock right after.
                let _ = tx.send(());
            }
        }
    }
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent between calls (no call panics halfway), so a
        // poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `id` out of the scheduler, queued or running, and wakes the jobs
    /// that start in its place.
    fn leave(&self, id: JobId) {
        let mut state = self.lock();
        state.waiters.remove(&id);
        let started = state.scheduler.remove(id, Now::system());
        state.wake(&started);
    }
}

/// Admission to one backend. Cheap to clone; all clones share the queue.
#[derive(Clone)]
pub struct Gate {
    shared: Arc<Shared>,
}

/// A slot on the backend, held for the whole upstream exchange (including a
/// streamed response). Dropping it lets the next job in.
pub struct Permit {
    shared: Arc<Shared>,
    id: JobId,
    class: u32,
    waited: Duration,
}

impl Permit {
    /// The class the job ran in (out-of-range ids are folded into the last).
    pub fn class(&self) -> u32 {
        self.class
    }

    /// Time spent queued before the slot was granted.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.shared.leave(self.id);
    }
}

/// Leaves the queue if `acquire` is dropped while waiting.
struct LeaveOnDrop<'a> {
    shared: &'a Shared,
    id: Option<JobId>,
}

impl Drop for LeaveOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.shared.leave(id);
        }
    }
}

impl Gate {
    pub fn new(plan: Arc<Plan>, backend: BackendPlan) -> Gate {
        Gate {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    scheduler: Scheduler::new(plan, backend, Now::system()),
                    waiters: HashMap::default(),
                }),
            }),
        }
    }

    /// Waits for a slot. Rejected at once when the queue is full, or at the
    /// class's max wait. Cancel-safe: dropping the future leaves the queue.
    pub async fn acquire(&self, job: Job) -> Result<Permit, Rejection> {
        let (ticket, mut started, arrived) = {
            let mut state = self.shared.lock();
            let ticket = state.scheduler.submit(job, Now::system())?;
            state.wake(&ticket.started);
            if ticket.started.contains(&ticket.id) {
                // Started at once (the backend had room): nothing to wait for.
                drop(state);
                return Ok(Permit {
                    shared: self.shared.clone(),
                    id: ticket.id,
                    class: ticket.class,
                    waited: Duration::ZERO,
                });
            }
            let (tx, rx) = oneshot::channel();
            state.waiters.insert(ticket.id, tx);
            (ticket, rx, Instant::now())
        };
        let mut guard = LeaveOnDrop {
            shared: &self.shared,
            id: Some(ticket.id),
        };
        let deadline = tokio::time::Instant::from_std(ticket.deadline);
        loop {
            tokio::select! {
                biased;
                _ = &mut started => break,
                _ = tokio::time::sleep_until(deadline) => {}
            }
            let mut state = self.shared.lock();
            if let Some(rejection) = state.scheduler.time_out(ticket.id, Now::system()) {
                state.waiters.remove(&ticket.id);
                guard.id = None;
                return Err(rejection);
            }
            // Not rejected: it started just now (the signal is already sent,
            // under this lock) and the next turn takes it.
        }
        guard.id = None;
        Ok(Permit {
            shared: self.shared.clone(),
            id: ticket.id,
            class: ticket.class,
            waited: arrived.elapsed(),
        })
    }

    pub fn stats(&self) -> Stats {
        self.shared.lock().scheduler.stats()
    }

    /// Requests waiting for this backend (for routing, on every request).
    pub fn queued(&self) -> usize {
        self.shared.lock().scheduler.queued()
    }

    /// Queue fullness per class, for [`super::AdmissionController::update`].
    pub fn fullness(&self) -> Vec<f64> {
        self.shared.lock().scheduler.fullness()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::schedule::{ClassRef, RejectReason, ScheduleConfig};

    fn gate(schedule: &str) -> Gate {
        let cfg: ScheduleConfig = toml::from_str(schedule).unwrap();
        let classes = [
            ClassRef {
                name: "high",
                priority: 0,
            },
            ClassRef {
                name: "mid",
                priority: 1,
            },
            ClassRef {
                name: "low",
                priority: 2,
            },
        ];
        let plan = Arc::new(cfg.resolve(&classes, &["gpu"], &HashMap::new()).unwrap());
        let backend = plan.backend("gpu");
        Gate::new(plan, backend)
    }

    fn job(class: u32) -> Job {
        Job {
            class,
            tenant: 1,
            cost: 100,
        }
    }

    /// Polls `cond` until it holds; fails the test after 5 s.
    async fn until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn queued(gate: &Gate) -> usize {
        gate.stats().classes.iter().map(|c| c.queued).sum()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_leaves_the_queue_frees_its_place_at_once() {
        let gate = gate("max_in_flight = 1\n[[class]]\nname = \"high\"\nmax_queue = 1");
        let holder = gate.acquire(job(0)).await.unwrap();
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.acquire(job(0)).await.map(|_| ()) }
        });
        until("the waiter to queue", || queued(&gate) == 1).await;
        // The one place in the queue is taken.
        let full = gate.acquire(job(0)).await.err().unwrap();
        assert_eq!(full.reason, RejectReason::QueueFull);

        // The client disconnects: its future is dropped mid-wait.
        waiter.abort();
        assert!(waiter.await.unwrap_err().is_cancelled());
        assert_eq!(queued(&gate), 0, "left in the drop, not later");
        assert_eq!(gate.stats().classes[0].cancelled, 1);

        // The place is free again, and the freed slot goes to the new waiter,
        // not to the one that left.
        let next = tokio::spawn({
            let gate = gate.clone();
            async move { gate.acquire(job(0)).await.map(|p| p.waited()) }
        });
        until("the next waiter to queue", || queued(&gate) == 1).await;
        drop(holder);
        let waited = next.await.unwrap().expect("admitted");
        assert!(waited > Duration::ZERO);
        // Admitted: the holder and `next`; never the waiter that left.
        assert_eq!(gate.stats().classes[0].admitted, 2);
        assert_eq!(
            gate.stats().in_flight,
            0,
            "its permit was dropped with the task"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn permits_wake_waiters_in_policy_order() {
        let gate = gate("policy = \"strict\"\nmax_in_flight = 1\n[aging]\nmax_boost = 0");
        let holder = gate.acquire(job(2)).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Arrivals low, mid, high, low, high: each queued before the next.
        for (n, class) in [2, 1, 0, 2, 0].into_iter().enumerate() {
            let (gate2, order) = (gate.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let permit = gate2.acquire(job(class)).await.unwrap();
                order.lock().unwrap().push((permit.class(), n));
            }));
            until("the arrival to queue", || queued(&gate) == n + 1).await;
        }
        drop(holder);
        for task in tasks {
            task.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(order, vec![(0, 2), (0, 4), (1, 1), (2, 0), (2, 3)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrency_cap_is_honoured_under_contention() {
        let gate = gate("max_in_flight = 3");
        let current = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..24)
            .map(|i| {
                let (gate, current, peak) = (gate.clone(), current.clone(), peak.clone());
                tokio::spawn(async move {
                    let _permit = gate.acquire(job(i % 3)).await.unwrap();
                    let now = current.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    // Stand-in for the upstream call while the slot is held.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    current.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 3);
        let stats = gate.stats();
        assert_eq!(stats.in_flight, 0);
        assert_eq!(stats.classes.iter().map(|c| c.admitted).sum::<u64>(), 24);
        assert_eq!(queued(&gate), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiter_is_rejected_at_its_max_wait() {
        let gate = gate("max_in_flight = 1\n[[class]]\nname = \"high\"\nmax_wait_ms = 100");
        let _holder = gate.acquire(job(0)).await.unwrap();
        let started = Instant::now();
        let late = gate.acquire(job(0)).await.err().unwrap();
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert_eq!(
            (late.reason, late.status()),
            (RejectReason::WaitTimeout, 503)
        );
        assert!(late.retry_after_secs() >= 1);
        assert_eq!(queued(&gate), 0);
        assert_eq!(
            gate.stats().classes[0].rejected(RejectReason::WaitTimeout),
            1
        );
    }
}
