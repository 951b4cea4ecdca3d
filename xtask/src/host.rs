//! The machine's CPU time from `/proc/stat`, for the benches' host figures.

/// All CPUs' ticks (USER_HZ) since boot, split the way the benches report them.
#[derive(Clone, Copy)]
pub struct HostTicks {
    /// Running this guest's work: user, nice, system, irq, softirq.
    pub busy: u64,
    /// Stolen: the hypervisor ran other guests while this one had work. On a
    /// shared host it is what makes one minute's figures unlike the next's.
    pub steal: u64,
    /// Everything, idle and iowait included.
    pub all: u64,
}

impl HostTicks {
    pub fn now() -> HostTicks {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        // "cpu  user nice system idle iowait irq softirq steal guest guest_nice";
        // guest time is already counted in user and nice.
        let t: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .take(8)
            .filter_map(|v| v.parse().ok())
            .collect();
        let at = |i: usize| t.get(i).copied().unwrap_or(0);
        HostTicks {
            busy: at(0) + at(1) + at(2) + at(5) + at(6),
            steal: at(7),
            all: t.iter().sum(),
        }
    }

    /// Per cent of the machine's time since `before` that was busy and stolen.
    pub fn since(self, before: HostTicks) -> (f64, f64) {
        let all = self.all.saturating_sub(before.all);
        if all == 0 {
            return (0.0, 0.0);
        }
        let pct = |now: u64, then: u64| 100.0 * now.saturating_sub(then) as f64 / all as f64;
        (pct(self.busy, before.busy), pct(self.steal, before.steal))
    }
}

/// Above this much stolen time, a round (or a run) counts as disturbed.
pub const STEAL_DISTURBED_PCT: f64 = 2.0;

/// The rounds whose figures a bench reports: those where no run stole more
/// than [`STEAL_DISTURBED_PCT`] (`steal[round]`: the most any of the round's
/// runs stole), or every round when none was that calm. Chosen by the
/// hypervisor's interference, measured apart from the figures, so the choice
/// cannot favour a result.
pub fn calm_rounds(steal: &[f64]) -> Vec<usize> {
    let calm: Vec<usize> = (0..steal.len())
        .filter(|&r| steal[r] <= STEAL_DISTURBED_PCT)
        .collect();
    if calm.is_empty() {
        (0..steal.len()).collect()
    } else {
        calm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_calm_rounds_count_unless_none_is() {
        assert_eq!(calm_rounds(&[0.5, 3.0, 2.0, 9.0]), vec![0, 2]);
        assert_eq!(calm_rounds(&[4.0, 3.0]), vec![0, 1]);
        assert_eq!(calm_rounds(&[]), Vec::<usize>::new());
    }

    #[test]
    fn shares_are_of_all_time_between_the_readings() {
        let before = HostTicks {
            busy: 100,
            steal: 10,
            all: 1000,
        };
        let after = HostTicks {
            busy: 150,
            steal: 30,
            all: 1200,
        };
        assert_eq!(after.since(before), (25.0, 10.0));
        assert_eq!(before.since(before), (0.0, 0.0));
    }

    #[test]
    fn reads_this_machine() {
        let now = HostTicks::now();
        assert!(now.all > 0 && now.busy + now.steal <= now.all);
    }
}
