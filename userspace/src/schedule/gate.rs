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

use super::{
    Job, JobId, Now, Rejection,
    config::{BackendPlan, Plan},
    scheduler::Scheduler,
    stats::Stats,
};

struct State {
    scheduler: Scheduler,
    waiters: HashMap<JobId, oneshot::Sender<()>>,
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
                    waiters: HashMap::new(),
                }),
            }),
        }
    }

    /// Waits for a slot. Rejected at once when the queue is full, or at the
    /// class's max wait. Cancel-safe: dropping the future leaves the queue.
    pub async fn acquire(&self, job: Job) -> Result<Permit, Rejection> {
        let arrived = Instant::now();
        let (ticket, mut started) = {
            let mut state = self.shared.lock();
            let ticket = state.scheduler.submit(job, Now::system())?;
            let (tx, rx) = oneshot::channel();
            state.waiters.insert(ticket.id, tx);
            state.wake(&ticket.started);
            (ticket, rx)
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

    /// Queue fullness per class, for [`super::AdmissionController::update`].
    pub fn fullness(&self) -> Vec<f64> {
        self.shared.lock().scheduler.fullness()
    }
}
