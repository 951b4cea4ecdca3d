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

    /// The shares of the machine's time since `before`.
    pub fn since(self, before: HostTicks) -> Shares {
        let all = self.all.saturating_sub(before.all);
        let pct = |now: u64, then: u64| {
            if all == 0 {
                0.0
            } else {
                100.0 * now.saturating_sub(then) as f64 / all as f64
            }
        };
        Shares {
            busy_pct: pct(self.busy, before.busy),
            steal_pct: pct(self.steal, before.steal),
        }
    }
}

/// Per cent of all CPUs' time between two readings.
#[derive(Debug, PartialEq)]
pub struct Shares {
    pub busy_pct: f64,
    pub steal_pct: f64,
}

/// Above this much stolen time, a round (or a run) counts as disturbed.
pub const STEAL_DISTURBED_PCT: f64 = 2.0;

/// The rounds a bench's figures come from.
#[derive(Debug, PartialEq)]
pub struct Counted {
    /// The rounds counted: the calm ones, or every round when none was.
    pub rounds: Vec<usize>,
    /// How many rounds were calm (0: none, and every round counts).
    pub calm: usize,
}

/// Counts the rounds where no run stole more than [`STEAL_DISTURBED_PCT`]
/// (`steal[round]`: the most any of the round's runs stole), or every round
/// when none was that calm. Chosen by the hypervisor's interference, measured
/// apart from the figures, so the choice cannot favour a result.
pub fn counted_rounds(steal: &[f64]) -> Counted {
    let calm: Vec<usize> = (0..steal.len())
        .filter(|&r| steal[r] <= STEAL_DISTURBED_PCT)
        .collect();
    if calm.is_empty() {
        Counted {
            rounds: (0..steal.len()).collect(),
            calm: 0,
        }
    } else {
        Counted {
            calm: calm.len(),
            rounds: calm,
        }
    }
}

/// The median; of an even count, the mean of the middle two (calm subsets
/// come in any size, and either middle value alone would lean one way).
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_calm_rounds_count_unless_none_is() {
        let counted = |rounds: Vec<usize>, calm| Counted { rounds, calm };
        assert_eq!(
            counted_rounds(&[0.5, 3.0, 2.0, 9.0]),
            counted(vec![0, 2], 2)
        );
        assert_eq!(counted_rounds(&[4.0, 3.0]), counted(vec![0, 1], 0));
        assert_eq!(counted_rounds(&[]), counted(vec![], 0));
    }

    #[test]
    fn an_even_count_takes_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 9.0]), Some(3.0));
        assert_eq!(median(vec![]), None);
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
        let shares = |busy_pct, steal_pct| Shares {
            busy_pct,
            steal_pct,
        };
        assert_eq!(after.since(before), shares(25.0, 10.0));
        assert_eq!(before.since(before), shares(0.0, 0.0));
    }

    #[test]
    fn reads_this_machine() {
        let now = HostTicks::now();
        assert!(now.all > 0 && now.busy + now.steal <= now.all);
    }
}
