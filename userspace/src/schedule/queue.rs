//! One class's waiting room: FIFO per tenant, tenants served fairly by token
//! cost (start-time fair queuing), so a tenant with huge prompts gets the same
//! tokens, not the same requests, as a tenant with small ones.

use std::{
    collections::{HashMap, VecDeque},
    time::Instant,
};

use super::JobId;
use crate::idhash::IdHasher;

#[derive(Debug, Clone)]
pub(super) struct Waiting {
    pub id: JobId,
    pub tenant: u32,
    pub cost: u64,
    pub arrived: Instant,
}

#[derive(Debug, Default)]
struct Flow {
    jobs: VecDeque<Waiting>,
    /// Virtual time at which this tenant's tokens served so far run out.
    last_finish: u128,
}

#[derive(Debug, Default)]
pub(super) struct ClassQueue {
    flows: HashMap<u32, Flow, IdHasher>,
    /// Start tag of the last job served: a tenant that was idle starts here,
    /// so idleness earns no credit.
    vtime: u128,
    len: usize,
}

impl ClassQueue {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn push(&mut self, job: Waiting) {
        self.flows
            .entry(job.tenant)
            .or_default()
            .jobs
            .push_back(job);
        self.len += 1;
    }

    fn start_tag(&self, flow: &Flow) -> u128 {
        flow.last_finish.max(self.vtime)
    }

    /// The job served next among tenants `eligible` admits: the smallest start
    /// tag, ties to the earlier arrival.
    pub fn peek(&self, eligible: impl Fn(u32) -> bool) -> Option<&Waiting> {
        self.flows
            .iter()
            .filter(|(tenant, _)| eligible(**tenant))
            .filter_map(|(_, flow)| flow.jobs.front().map(|job| (self.start_tag(flow), job)))
            .min_by_key(|(tag, job)| (*tag, job.id))
            .map(|(_, job)| job)
    }

    /// Serves the head of `tenant`'s queue (the one [`Self::peek`] chose).
    pub fn pop(&mut self, tenant: u32) -> Option<Waiting> {
        let job = self.flows.get_mut(&tenant)?.jobs.pop_front()?;
        self.len -= 1;
        self.serve(tenant, job.cost);
        Some(job)
    }

    /// Moves `tenant`'s account by a job of `cost` served now.
    fn serve(&mut self, tenant: u32, cost: u64) {
        let vtime = self.vtime;
        let flow = self.flows.entry(tenant).or_default();
        let start = flow.last_finish.max(vtime);
        flow.last_finish = start + cost.max(1) as u128;
        self.vtime = start;
        // Forget tenants that are idle and owe nothing: their next start is vtime anyway.
        self.flows
            .retain(|_, f| !f.jobs.is_empty() || f.last_finish > start);
    }

    /// Serves a job of `tenant` that never waited (nothing was queued in
    /// this class): the tenant's account moves exactly as if it had been
    /// pushed and popped.
    pub fn serve_alone(&mut self, tenant: u32, cost: u64) {
        debug_assert_eq!(self.len, 0, "only when nothing waits");
        self.serve(tenant, cost);
    }

    /// Takes a job out wherever it waits (its client left or it timed out).
    pub fn remove(&mut self, id: JobId, tenant: u32) -> Option<Waiting> {
        let flow = self.flows.get_mut(&tenant)?;
        let pos = flow.jobs.iter().position(|j| j.id == id)?;
        let job = flow.jobs.remove(pos)?;
        self.len -= 1;
        Some(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: JobId, tenant: u32, cost: u64, t0: Instant) -> Waiting {
        Waiting {
            id,
            tenant,
            cost,
            arrived: t0,
        }
    }

    fn drain(q: &mut ClassQueue) -> Vec<JobId> {
        let mut order = Vec::new();
        while let Some(head) = q.peek(|_| true) {
            let (id, tenant) = (head.id, head.tenant);
            assert_eq!(q.pop(tenant).unwrap().id, id);
            order.push(id);
        }
        order
    }

    #[test]
    fn fifo_within_a_tenant_and_token_fair_across_tenants() {
        let t0 = Instant::now();
        let mut q = ClassQueue::default();
        // Tenant 1: three 4000-token prompts first; tenant 2: twelve 1000-token ones.
        for id in 0..3 {
            q.push(job(id, 1, 4000, t0));
        }
        for id in 10..22 {
            q.push(job(id, 2, 1000, t0));
        }
        let order = drain(&mut q);
        assert_eq!(order.len(), 15);
        // Tenant 1 keeps its own order.
        let big: Vec<_> = order.iter().filter(|&&id| id < 10).copied().collect();
        assert_eq!(big, vec![0, 1, 2]);
        // Between two big prompts tenant 2 gets four small ones: equal tokens.
        let pos = |id| order.iter().position(|&x| x == id).unwrap();
        assert_eq!(pos(1) - pos(0) - 1, 4, "{order:?}");
        assert_eq!(pos(2) - pos(1) - 1, 4, "{order:?}");
    }

    #[test]
    fn ineligible_tenants_are_skipped_and_removal_works_mid_queue() {
        let t0 = Instant::now();
        let mut q = ClassQueue::default();
        q.push(job(1, 1, 10, t0));
        q.push(job(2, 2, 10, t0));
        q.push(job(3, 2, 10, t0));
        assert_eq!(q.peek(|t| t != 1).unwrap().id, 2);
        assert_eq!(q.remove(3, 2).unwrap().id, 3);
        assert!(q.remove(3, 2).is_none());
        assert_eq!(q.len(), 2);
        assert_eq!(drain(&mut q), vec![1, 2]);
        assert_eq!(q.len(), 0);
    }
}
