//! Deterministic tests of the scheduler with a simulated clock: jobs "run"
//! until the test finishes them, so the order of service is exact.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use jiff::{Timestamp, civil::date, tz::TimeZone};

use super::*;
use crate::schedule::{ClassRef, ScheduleConfig};

struct Sim {
    s: Scheduler,
    now: Now,
    /// Every job started, in order.
    started: Vec<JobId>,
    /// Running jobs, oldest first.
    running: VecDeque<JobId>,
    jobs: HashMap<JobId, Job>,
}

/// Tuesday 2026-11-24, noon UTC.
fn tuesday_noon() -> Timestamp {
    "2026-11-24T12:00:00Z".parse().unwrap()
}

fn berlin(y: i16, m: i8, d: i8, h: i8) -> Timestamp {
    let tz = TimeZone::get("Europe/Berlin").unwrap();
    date(y, m, d)
        .at(h, 0, 0, 0)
        .to_zoned(tz)
        .unwrap()
        .timestamp()
}

impl Sim {
    fn new(schedule: &str, classes: &[(&'static str, u8)]) -> Sim {
        Sim::at(schedule, classes, tuesday_noon())
    }

    fn at(schedule: &str, classes: &[(&'static str, u8)], wall: Timestamp) -> Sim {
        let cfg: ScheduleConfig = toml::from_str(schedule).unwrap();
        let refs: Vec<ClassRef> = classes
            .iter()
            .map(|&(name, priority)| ClassRef { name, priority })
            .collect();
        let tenants = HashMap::from([
            ("acme".to_string(), 1),
            ("globex".to_string(), 2),
            ("initech".to_string(), 3),
        ]);
        let plan = Arc::new(cfg.resolve(&refs, &["gpu"], &tenants).unwrap());
        let backend = plan.backend("gpu");
        let now = Now {
            at: Instant::now(),
            wall,
        };
        Sim {
            s: Scheduler::new(plan, backend, now),
            now,
            started: Vec::new(),
            running: VecDeque::new(),
            jobs: HashMap::new(),
        }
    }

    fn record(&mut self, started: Vec<JobId>) {
        for id in started {
            assert!(!self.started.contains(&id), "job {id} started twice");
            self.started.push(id);
            self.running.push_back(id);
        }
    }

    fn submit(&mut self, class: u32, tenant: u32, cost: u64) -> Result<JobId, Rejection> {
        let job = Job {
            class,
            tenant,
            cost,
        };
        let ticket = self.s.submit(job, self.now)?;
        self.jobs.insert(ticket.id, job);
        self.record(ticket.started);
        Ok(ticket.id)
    }

    fn finish(&mut self, id: JobId) {
        self.running.retain(|&r| r != id);
        let started = self.s.remove(id, self.now);
        self.record(started);
    }

    fn finish_oldest(&mut self) {
        let id = self.running.front().copied().expect("something runs");
        self.finish(id);
    }

    fn advance(&mut self, d: Duration) {
        self.now.at += d;
        self.now.wall = self.now.wall.checked_add(d).unwrap();
    }

    fn class_of(&self, id: JobId) -> u32 {
        self.jobs[&id].class
    }

    /// Classes of the jobs started after the first `skip`.
    fn started_classes(&self, skip: usize) -> Vec<u32> {
        self.started[skip..]
            .iter()
            .map(|&id| self.class_of(id))
            .collect()
    }

    fn in_flight(&self, class: u32) -> u32 {
        self.s.stats().classes[class as usize].in_flight
    }

    fn queued(&self, class: u32) -> usize {
        self.s.stats().classes[class as usize].queued
    }
}

fn count(classes: &[u32], class: u32) -> usize {
    classes.iter().filter(|&&c| c == class).count()
}

const THREE: &[(&str, u8)] = &[("high", 0), ("mid", 1), ("low", 2)];

#[test]
fn strict_serves_by_priority_fifo_per_tenant_fair_across_tenants() {
    let mut sim = Sim::new(
        "policy = \"strict\"\nmax_in_flight = 1\n[aging]\nmax_boost = 0",
        THREE,
    );
    let first = sim.submit(2, 1, 100).unwrap();
    assert_eq!(sim.started, vec![first], "an idle backend starts at once");
    let l1 = sim.submit(2, 1, 100).unwrap();
    let l2 = sim.submit(2, 1, 100).unwrap();
    let h1 = sim.submit(0, 1, 100).unwrap();
    let m1 = sim.submit(1, 1, 100).unwrap();
    let h2 = sim.submit(0, 1, 100).unwrap();
    let h3 = sim.submit(0, 1, 100).unwrap();
    let h4 = sim.submit(0, 2, 100).unwrap();
    for _ in 0..7 {
        sim.finish_oldest();
    }
    // High before mid before low; inside high, tenant 2's only job comes
    // second, not behind tenant 1's backlog.
    assert_eq!(sim.started, vec![first, h1, h4, h2, h3, m1, l1, l2]);
}

#[test]
fn wfq_shares_slots_by_weight_and_by_token_cost() {
    let two = &[("a", 0), ("b", 1)];
    let by_weight = "policy = \"wfq\"\nmax_in_flight = 1\n\
        [[class]]\nname = \"a\"\nweight = 3\n[[class]]\nname = \"b\"\nweight = 1";
    let mut sim = Sim::new(by_weight, two);
    for _ in 0..30 {
        sim.submit(1, 1, 1000).unwrap();
        sim.submit(0, 1, 1000).unwrap();
    }
    for _ in 0..40 {
        sim.finish_oldest();
    }
    let served = sim.started_classes(1);
    assert_eq!(served.len(), 40);
    let a = count(&served, 0);
    assert!(
        (29..=31).contains(&a),
        "weight 3:1 gives a ≈ 30 of 40: {served:?}"
    );

    // Equal weights, a's requests cost three times b's: b gets three times
    // as many requests, the same tokens.
    let mut sim = Sim::new("policy = \"wfq\"\nmax_in_flight = 1", two);
    for _ in 0..30 {
        sim.submit(0, 1, 3000).unwrap();
        sim.submit(1, 1, 1000).unwrap();
    }
    for _ in 0..40 {
        sim.finish_oldest();
    }
    let served = sim.started_classes(1);
    let b = count(&served, 1);
    assert!(
        (29..=31).contains(&b),
        "cost 3:1 gives b ≈ 30 of 40: {served:?}"
    );
}

#[test]
fn drr_balances_tokens_not_requests() {
    let two = &[("chat", 0), ("bulk", 1)];
    let cfg = "policy = \"drr\"\nquantum = 4096\nmax_in_flight = 1\nmax_queue = 1000\n\
        [[class]]\nname = \"chat\"\nmax_queue = 1000";
    let mut sim = Sim::new(cfg, two);
    for _ in 0..12 {
        sim.submit(1, 1, 32_000).unwrap();
    }
    for _ in 0..800 {
        sim.submit(0, 2, 500).unwrap();
    }
    let mut tokens = [0u64; 2];
    let mut seen = 0;
    while sim.queued(0) > 0 && sim.queued(1) > 0 {
        sim.finish_oldest();
        for &id in &sim.started[seen..] {
            tokens[sim.class_of(id) as usize] += sim.jobs[&id].cost;
        }
        seen = sim.started.len();
        // DRR's bound: served tokens differ by at most one quantum plus the
        // largest request while both classes wait.
        let gap = tokens[0].abs_diff(tokens[1]);
        assert!(gap <= 32_000 + 4096, "after {seen} starts: {tokens:?}");
    }
    let served = sim.started_classes(0);
    // ~11 huge prompts went through, and ~700 small ones beside them.
    assert!(count(&served, 1) >= 10, "{tokens:?}");
    assert!(count(&served, 0) >= 600, "{tokens:?}");
}

#[test]
fn huge_prompts_of_one_tenant_do_not_starve_another_tenant_in_the_same_class() {
    let mut sim = Sim::new("max_in_flight = 1", &[("chat", 0)]);
    let hog: Vec<JobId> = (0..5).map(|_| sim.submit(0, 1, 20_000).unwrap()).collect();
    let small: Vec<JobId> = (0..40).map(|_| sim.submit(0, 2, 1000).unwrap()).collect();
    for _ in 0..25 {
        sim.finish_oldest();
    }
    // Hog's first job ran at once; after it, tenant 2 gets ~20 small jobs
    // (20,000 tokens) before the hog's second.
    let second = sim.started.iter().position(|&id| id == hog[1]).unwrap();
    let small_before = sim.started[..second]
        .iter()
        .filter(|id| small.contains(id))
        .count();
    assert_eq!(small_before, 20, "{:?}", sim.started);
}

#[test]
fn at_least_guarantees_shares_and_lends_idle_capacity() {
    // decay 0.5 over two classes: high 2/3, low 1/3 of 10 slots → 6 and 3.
    let two = &[("high", 0), ("low", 1)];
    let mut sim = Sim::new(
        "policy = \"at_least\"\ndecay = 0.5\nmax_in_flight = 10",
        two,
    );
    // Only low waits: it borrows the whole backend.
    for _ in 0..15 {
        sim.submit(1, 1, 100).unwrap();
    }
    assert_eq!(sim.in_flight(1), 10);
    // High arrives: nothing is preempted, freed slots go to high first.
    for _ in 0..30 {
        sim.submit(0, 1, 100).unwrap();
    }
    assert_eq!(sim.in_flight(0), 0);
    for _ in 0..7 {
        sim.finish_oldest();
    }
    assert_eq!((sim.in_flight(0), sim.in_flight(1)), (7, 3));
    // From now on low keeps its 3 guaranteed slots under high's flood
    // (strict priority would give it none), and high keeps the rest.
    while sim.queued(1) > 0 {
        sim.finish_oldest();
        assert_eq!((sim.in_flight(0), sim.in_flight(1)), (7, 3));
    }
    // Low's queue is empty: its slots are lent back to high as they free up.
    for _ in 0..3 {
        let low = *sim
            .running
            .iter()
            .find(|&&id| sim.class_of(id) == 1)
            .unwrap();
        sim.finish(low);
    }
    assert_eq!((sim.in_flight(0), sim.in_flight(1)), (10, 0));
}

/// When (after its arrival) the low job starts under a sustained high load,
/// with high jobs arriving every 100 ms and finishing every 200 ms.
fn low_job_start_under_high_load(max_boost: u32) -> Option<Duration> {
    let cfg = format!(
        "policy = \"strict\"\nmax_in_flight = 1\n[aging]\nstep_ms = 1000\nmax_boost = {max_boost}"
    );
    let mut sim = Sim::new(&cfg, THREE);
    sim.submit(0, 1, 100).unwrap();
    let low = sim.submit(2, 2, 100).unwrap();
    let arrival = sim.now.at;
    for tick in 1..=100 {
        sim.advance(Duration::from_millis(100));
        sim.submit(0, 1, 100).unwrap();
        if tick % 2 == 0 {
            sim.finish_oldest();
        }
        if sim.started.contains(&low) {
            return Some(sim.now.at - arrival);
        }
    }
    assert!(sim.queued(0) > 20, "high load was sustained");
    None
}

#[test]
fn aging_serves_a_low_class_under_sustained_high_load() {
    // Two levels of boost lift priority 2 to 0 after 2 s; the low job is
    // older than every high job waiting then, so it goes at the next free slot.
    let waited = low_job_start_under_high_load(2).expect("low job served");
    assert!(
        waited >= Duration::from_secs(2) && waited <= Duration::from_millis(2200),
        "{waited:?}"
    );
    // A boost of one level is not enough to reach the top: the bound holds.
    assert_eq!(low_job_start_under_high_load(1), None);
}

#[test]
fn windows_switch_weights_at_local_time_on_weekdays_only() {
    let cfg = r#"
        policy = "drr"
        quantum = 1000
        max_in_flight = 1
        timezone = "Europe/Berlin"
        [[class]]
        name = "chat"
        weight = 4
        [[class.window]]
        days = ["mon", "tue", "wed", "thu", "fri"]
        start = "22:00"
        end = "06:00"
        weight = 1
        [[class]]
        name = "batch"
        weight = 1
        [[class.window]]
        days = ["mon", "tue", "wed", "thu", "fri"]
        start = "22:00"
        end = "06:00"
        weight = 4
    "#;
    let two = &[("chat", 0), ("batch", 1)];
    // Batch's share of 50 starts, one per second, from `from` on.
    let batch_share = |sim: &mut Sim| {
        let before = sim.started.len();
        for _ in 0..50 {
            sim.advance(Duration::from_secs(1));
            sim.finish_oldest();
        }
        count(&sim.started_classes(before), 1)
    };
    // Tuesday 21:00 in Berlin: chat 4, batch 1.
    let mut sim = Sim::at(cfg, two, berlin(2026, 11, 24, 21));
    for _ in 0..200 {
        sim.submit(0, 1, 1000).unwrap();
        sim.submit(1, 1, 1000).unwrap();
    }
    let day = batch_share(&mut sim);
    assert!((9..=11).contains(&day), "{day}");
    // 22:00 local: batch 4, chat 1.
    sim.advance(Duration::from_secs(3600 - 50));
    let night = batch_share(&mut sim);
    assert!((39..=41).contains(&night), "{night}");

    // Saturday 22:00 is not a weekday night: the day weights stay.
    let mut sim = Sim::at(cfg, two, berlin(2026, 11, 28, 22));
    for _ in 0..100 {
        sim.submit(0, 1, 1000).unwrap();
        sim.submit(1, 1, 1000).unwrap();
    }
    let saturday = batch_share(&mut sim);
    assert!((9..=11).contains(&saturday), "{saturday}");
}

#[test]
fn bounded_queues_reject_with_status_and_drain_based_retry_after() {
    let cfg = "policy = \"strict\"\nmax_in_flight = 1\nmax_queue = 5\n\
        [[class]]\nname = \"a\"\nmax_queue = 3\nmax_wait_ms = 10000\n\
        [[class]]\nname = \"b\"\nmax_queue = 3";
    let mut sim = Sim::new(cfg, &[("a", 0), ("b", 1)]);
    sim.submit(0, 1, 100).unwrap();
    for _ in 0..3 {
        sim.submit(0, 1, 100).unwrap();
    }
    let full = sim.submit(0, 1, 100).unwrap_err();
    assert_eq!((full.reason, full.status()), (RejectReason::QueueFull, 429));
    // No drain seen yet: the class's max wait is the advice.
    assert_eq!(full.retry_after_secs(), 10);

    // One start every 2 s, then the queue fills again: 4 ahead × 2 s.
    for _ in 0..3 {
        sim.advance(Duration::from_secs(2));
        sim.finish_oldest();
    }
    for _ in 0..3 {
        sim.submit(0, 1, 100).unwrap();
    }
    let full = sim.submit(0, 1, 100).unwrap_err();
    assert_eq!(full.retry_after_secs(), 8);

    // Class b has room, but the backend's 5 places are taken: 503.
    sim.submit(1, 1, 100).unwrap();
    sim.submit(1, 1, 100).unwrap();
    let saturated = sim.submit(1, 1, 100).unwrap_err();
    assert_eq!(
        (saturated.reason, saturated.status()),
        (RejectReason::BackendSaturated, 503)
    );
    assert_eq!(saturated.retry_after_secs(), 12, "6 ahead × 2 s");

    // A queued job is rejected at its max wait, not before.
    let waiting = *sim
        .s
        .jobs
        .keys()
        .filter(|&&id| !sim.running.contains(&id))
        .min()
        .unwrap();
    sim.advance(Duration::from_millis(9999));
    assert_eq!(sim.s.time_out(waiting, sim.now), None);
    sim.advance(Duration::from_millis(1));
    let late = sim.s.time_out(waiting, sim.now).unwrap();
    assert_eq!(
        (late.reason, late.status()),
        (RejectReason::WaitTimeout, 503)
    );
    // Running jobs never time out.
    assert_eq!(sim.s.time_out(sim.running[0], sim.now), None);

    let stats = sim.s.stats();
    assert_eq!(stats.classes[0].rejected(RejectReason::QueueFull), 2);
    assert_eq!(stats.classes[1].rejected(RejectReason::BackendSaturated), 1);
    assert_eq!(stats.classes[0].rejected(RejectReason::WaitTimeout), 1);
    assert_eq!(stats.classes[0].queued, 2);
    assert_eq!(stats.classes[0].admitted, 4);
    assert_eq!(stats.classes[0].wait.count, 4);
    assert_eq!(sim.s.fullness(), vec![2.0 / 3.0, 2.0 / 3.0]);
}

#[test]
fn tenant_and_class_caps_hold_back_only_their_own_jobs() {
    let cfg = "max_in_flight = 8\ntenant_max_in_flight = 3\n\
        [[tenant]]\nname = \"acme\"\nmax_in_flight = 1\n\
        [[class]]\nname = \"batch\"\nmax_in_flight = 2";
    let mut sim = Sim::new(cfg, &[("chat", 0), ("batch", 1)]);
    let acme: Vec<JobId> = (0..3).map(|_| sim.submit(0, 1, 100).unwrap()).collect();
    let globex: Vec<JobId> = (0..5).map(|_| sim.submit(0, 2, 100).unwrap()).collect();
    let batch: Vec<JobId> = (0..4).map(|_| sim.submit(1, 3, 100).unwrap()).collect();
    let running =
        |ids: &[JobId], sim: &Sim| ids.iter().filter(|id| sim.running.contains(id)).count();
    assert_eq!(running(&acme, &sim), 1);
    assert_eq!(running(&globex, &sim), 3);
    assert_eq!(running(&batch, &sim), 2);
    // Two slots stay free: every waiting job is held by its own cap.
    assert_eq!(sim.s.stats().in_flight, 6);
    // acme's finished job lets acme's next one in, nobody else's.
    sim.finish(acme[0]);
    assert_eq!(sim.started.last(), Some(&acme[1]));
    assert_eq!(sim.s.stats().in_flight, 6);
    sim.finish(batch[0]);
    assert_eq!(sim.started.last(), Some(&batch[2]));
}

#[test]
fn a_cancelled_job_leaves_the_queue_and_a_removed_running_job_frees_its_slot() {
    let mut sim = Sim::new("max_in_flight = 1", &[("chat", 0)]);
    let a = sim.submit(0, 1, 100).unwrap();
    let b = sim.submit(0, 1, 100).unwrap();
    let c = sim.submit(0, 1, 100).unwrap();
    sim.finish(b); // b's client left while queued
    assert_eq!(sim.started, vec![a]);
    assert_eq!(sim.queued(0), 1);
    sim.finish(a);
    assert_eq!(sim.started, vec![a, c]);
    let stats = sim.s.stats();
    assert_eq!(stats.classes[0].cancelled, 1);
    assert_eq!(stats.classes[0].admitted, 2);
    // Unknown ids are harmless.
    assert!(sim.s.remove(b, sim.now).is_empty());
}

#[test]
fn a_class_without_a_queue_starts_at_once_or_is_refused() {
    let cfg = "max_in_flight = 1\n[[class]]\nname = \"chat\"\nmax_queue = 0";
    let mut sim = Sim::new(cfg, &[("chat", 0)]);
    let first = sim.submit(0, 1, 100).unwrap();
    assert_eq!(sim.started, vec![first]);
    let refused = sim.submit(0, 1, 100).unwrap_err();
    assert_eq!(refused.status(), 429);
    assert_eq!(sim.s.fullness(), vec![0.0]);
}

/// The fast path of `submit` (a job that may start while nothing waits)
/// leaves the scheduler exactly where queueing and dispatching would: the
/// same random traffic through both gives the same starts, rejections,
/// stats and, through the policies' and tenant queues' accounts, the same
/// later order, under every policy.
#[test]
fn the_fast_path_equals_queueing_and_dispatching() {
    let configs = [
        "policy = \"strict\"\nmax_in_flight = 3\nmax_queue = 6\n[aging]\nstep_ms = 50\nmax_boost = 1",
        "policy = \"wfq\"\nmax_in_flight = 2\n[[class]]\nname = \"low\"\nweight = 3",
        "policy = \"drr\"\nmax_in_flight = 3\nquantum = 700",
        "policy = \"at_least\"\ndecay = 0.5\nmax_in_flight = 4",
        "policy = \"drr\"\nmax_in_flight = 2\n[[tenant]]\nname = \"acme\"\nmax_in_flight = 1",
    ];
    for cfg in configs {
        let mut fast = Sim::new(cfg, THREE);
        let mut general = Sim::new(cfg, THREE);
        general.s.general_only = true;
        let mut random = crate::test_support::XorShift(0x9E37_79B9_7F4A_7C15);
        let mut fast_path_taken = 0;
        for _ in 0..3000 {
            let rng = random.next();
            match rng % 7 {
                0..=2 => {
                    let (class, tenant, cost) =
                        ((rng >> 8) % 3, 1 + (rng >> 16) % 3, (rng >> 24) % 5000);
                    let idle = fast.s.queued == 0;
                    let a = fast.submit(class as u32, tenant as u32, cost);
                    let b = general.submit(class as u32, tenant as u32, cost);
                    assert_eq!(a, b, "{cfg}");
                    fast_path_taken += (idle && fast.running.back() == a.as_ref().ok()) as u32;
                }
                3..=5 if !fast.running.is_empty() => {
                    let pick = (rng >> 8) as usize % fast.running.len();
                    let id = fast.running[pick];
                    fast.finish(id);
                    general.finish(id);
                }
                _ => {
                    let d = Duration::from_millis((rng >> 8) % 80);
                    fast.advance(d);
                    general.advance(d);
                }
            }
            assert_eq!(fast.started, general.started, "{cfg}");
        }
        assert_eq!(
            format!("{:?}", fast.s.stats()),
            format!("{:?}", general.s.stats()),
            "{cfg}"
        );
        assert!(
            fast_path_taken > 20,
            "{cfg}: the fast path ran {fast_path_taken} times"
        );
    }
}
