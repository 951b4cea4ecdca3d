//! Which class's head goes next when a slot is free: strict priority, WFQ,
//! DRR by token cost, or at-least shares with lending.

use std::{collections::VecDeque, time::Instant};

use super::{
    JobId,
    config::{Limits, Plan, Policy},
};

/// Fixed-point scale of WFQ tags, so `cost / weight` keeps its fraction.
const WFQ_SCALE: u128 = 1 << 20;

/// The job a class would serve next (its tenant-fair head), if it may start.
#[derive(Debug, Clone, Copy)]
pub(super) struct Head {
    pub class: u32,
    pub id: JobId,
    pub tenant: u32,
    pub cost: u64,
    pub arrived: Instant,
}

/// What the policies read besides the heads.
pub(super) struct Context<'a> {
    pub now: Instant,
    pub plan: &'a Plan,
    pub limits: &'a [Limits],
    pub in_flight: &'a [u32],
    /// at_least: slots reserved for each class.
    pub guaranteed: &'a [u32],
}

impl Context<'_> {
    /// Priority after aging: lower goes first; one level per `aging_step`
    /// waited, at most `max_boost` levels, never past the top priority (or
    /// aged top-class jobs would just outrun aged low ones). Ties go to the
    /// earlier arrival, which is how an aged job overtakes younger ones.
    fn rank(&self, head: &Head) -> (i64, JobId) {
        let waited = self.now.saturating_duration_since(head.arrived);
        let steps = waited.as_nanos() / self.plan.aging_step.as_nanos().max(1);
        let boost = steps.min(self.plan.max_boost as u128) as i64;
        let priority = self.plan.classes[head.class as usize].priority as i64;
        let top = self
            .plan
            .classes
            .iter()
            .map(|c| c.priority)
            .min()
            .unwrap_or(0) as i64;
        ((priority - boost).max(top), head.id)
    }

    fn quantum(&self, class: u32) -> u64 {
        (self.limits[class as usize].weight as u64).saturating_mul(self.plan.quantum)
    }
}

#[derive(Debug)]
pub(super) struct PolicyState {
    policy: Policy,
    drr: Drr,
    wfq_vtime: u128,
    wfq_finish: Vec<u128>,
}

impl PolicyState {
    pub fn new(policy: Policy, classes: usize) -> PolicyState {
        PolicyState {
            policy,
            drr: Drr {
                ring: VecDeque::new(),
                deficit: vec![0; classes],
                credited: false,
            },
            wfq_vtime: 0,
            wfq_finish: vec![0; classes],
        }
    }

    /// `class` has a waiting job again.
    pub fn backlogged(&mut self, class: u32) {
        if !self.drr.ring.contains(&class) {
            self.drr.ring.push_back(class);
        }
    }

    /// `class` has no waiting job any more.
    pub fn idle(&mut self, class: u32) {
        if let Some(pos) = self.drr.ring.iter().position(|&c| c == class) {
            self.drr.ring.remove(pos);
            if pos == 0 {
                self.drr.credited = false;
            }
        }
        // DRR: an idle class keeps no credit, or it could burst later.
        self.drr.deficit[class as usize] = 0;
    }

    /// Picks one of `heads` (one per class that may start a job now).
    pub fn choose(&mut self, heads: &[Head], cx: &Context<'_>) -> Option<Head> {
        match self.policy {
            Policy::Strict => heads.iter().min_by_key(|h| cx.rank(h)).copied(),
            Policy::AtLeast => {
                // First the classes still below their guarantee, then lending.
                let below = heads
                    .iter()
                    .filter(|h| cx.in_flight[h.class as usize] < cx.guaranteed[h.class as usize])
                    .min_by_key(|h| cx.rank(h));
                below
                    .or_else(|| heads.iter().min_by_key(|h| cx.rank(h)))
                    .copied()
            }
            Policy::Wfq => {
                let tagged = heads.iter().map(|h| {
                    let start = self.wfq_vtime.max(self.wfq_finish[h.class as usize]);
                    let weight = cx.limits[h.class as usize].weight.max(1) as u128;
                    let finish = start + h.cost.max(1) as u128 * WFQ_SCALE / weight;
                    (finish, start, *h)
                });
                let (finish, start, head) = tagged.min_by_key(|(finish, _, h)| (*finish, h.id))?;
                self.wfq_finish[head.class as usize] = finish;
                self.wfq_vtime = start;
                Some(head)
            }
            Policy::Drr => {
                let class = self.drr.pick(
                    |c| heads.iter().find(|h| h.class == c).map(|h| h.cost.max(1)),
                    |c| cx.quantum(c),
                )?;
                heads.iter().find(|h| h.class == class).copied()
            }
        }
    }
}

/// Deficit round robin over backlogged classes. The front of `ring` is the
/// class whose turn it is; `credited` says whether it got this turn's quantum.
#[derive(Debug)]
struct Drr {
    ring: VecDeque<u32>,
    deficit: Vec<u64>,
    credited: bool,
}

impl Drr {
    /// `cost_of(c)` is the head cost of class `c` if it may start now;
    /// classes that may not are passed over without credit.
    fn pick(
        &mut self,
        cost_of: impl Fn(u32) -> Option<u64>,
        quantum: impl Fn(u32) -> u64,
    ) -> Option<u32> {
        if !self.ring.iter().any(|&c| cost_of(c).is_some()) {
            return None;
        }
        loop {
            for _ in 0..self.ring.len() {
                let class = self.ring[0];
                if let Some(cost) = cost_of(class) {
                    let deficit = &mut self.deficit[class as usize];
                    if !self.credited {
                        *deficit = deficit.saturating_add(quantum(class));
                        self.credited = true;
                    }
                    if cost <= *deficit {
                        *deficit -= cost;
                        return Some(class);
                    }
                }
                self.ring.rotate_left(1);
                self.credited = false;
            }
            // A whole round and nobody could afford its head (costs far above
            // the quantum): grant the empty rounds at once instead of looping.
            let rounds = self
                .ring
                .iter()
                .filter_map(|&c| {
                    let missing = cost_of(c)?.saturating_sub(self.deficit[c as usize]);
                    Some(missing.div_ceil(quantum(c).max(1)))
                })
                .min()
                .unwrap_or(0);
            if rounds > 1 {
                for &c in &self.ring {
                    if cost_of(c).is_some() {
                        let grant = (rounds - 1).saturating_mul(quantum(c));
                        let deficit = &mut self.deficit[c as usize];
                        *deficit = deficit.saturating_add(grant);
                    }
                }
            }
        }
    }
}
