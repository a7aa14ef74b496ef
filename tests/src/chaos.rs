//! The chaos schedule of the soak: which fault comes next, after how long, against which process, for how
//! long. Pure and seeded, so a seed replays the same schedule.

use std::fmt;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One kind of fault the driver injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// SIGKILL the relay that holds the right to publish; restart it.
    KillRelayLeader,
    /// SIGKILL a relay standing by; restart it.
    KillRelayStandby,
    /// SIGKILL one consumer (either group); restart it.
    KillConsumer,
    /// SIGSTOP the publishing relay past its renew deadline, then SIGCONT: the fence must refuse it.
    PauseRelayLeader,
    /// Crash PostgreSQL (immediate shutdown: every connection drops) and start it again.
    RestartPostgres,
    /// Take the broker down (connections cut, new ones refused), then up again.
    BrokerOutage,
    /// Post an order with `crash=after-commit`: the API exits right after its commit; restart it.
    ApiCrashAfterCommit,
    /// A hot key's writer holds its transaction open for the hold (`commit_delay_ms`), so its event
    /// commits late, below the batches the relay has in flight; the key's next orders follow at once.
    LateCommit,
    /// The broker is cut off for [`LONG_OUTAGE`], longer than the soak relays' attempts × delivery
    /// timeout: the broker's faults count no attempt, so nothing may be dead-lettered.
    LongBrokerOutage,
    /// An event too large for the relay, then a small one of its key, on a topic no group reads: the
    /// first is dead-lettered and parks the key; it is redriven (dead again: the key stays parked, the
    /// small one must not overtake it), then discarded, and the small one goes out. Its DLQ copy goes to
    /// a topic that may not exist: the forwarder retries it without touching the main flow.
    PoisonRedriveDiscard,
}

/// How long a [`Fault::LongBrokerOutage`] lasts.
pub const LONG_OUTAGE: Duration = Duration::from_secs(12);

impl Fault {
    /// Every kind, in a fixed order.
    pub const ALL: [Fault; 10] = [
        Fault::KillRelayLeader,
        Fault::KillRelayStandby,
        Fault::KillConsumer,
        Fault::PauseRelayLeader,
        Fault::RestartPostgres,
        Fault::BrokerOutage,
        Fault::ApiCrashAfterCommit,
        Fault::LateCommit,
        Fault::LongBrokerOutage,
        Fault::PoisonRedriveDiscard,
    ];

    /// The name in the ledger line.
    pub fn name(self) -> &'static str {
        match self {
            Fault::KillRelayLeader => "kill_relay_leader",
            Fault::KillRelayStandby => "kill_relay_standby",
            Fault::KillConsumer => "kill_consumer",
            Fault::PauseRelayLeader => "pause_relay_leader",
            Fault::RestartPostgres => "restart_postgres",
            Fault::BrokerOutage => "broker_outage",
            Fault::ApiCrashAfterCommit => "api_crash_after_commit",
            Fault::LateCommit => "late_commit",
            Fault::LongBrokerOutage => "long_broker_outage",
            Fault::PoisonRedriveDiscard => "poison_redrive_discard",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One step of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Quiet time before the fault.
    pub wait: Duration,
    /// The fault.
    pub fault: Fault,
    /// Chooses the victim among the candidates (index modulo their number).
    pub pick: u32,
    /// How long the fault lasts: the outage, or the time a killed process stays down before its restart
    /// (a pause always lasts past the renew deadline, see [`Schedule::pause`]).
    pub hold: Duration,
}

/// Bounds of a schedule.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Shortest quiet time between faults.
    pub min_wait: Duration,
    /// Longest quiet time between faults.
    pub max_wait: Duration,
    /// Longest outage or time down.
    pub max_hold: Duration,
}

/// An endless, seeded sequence of steps. The first [`Fault::ALL`]`.len()` steps hold each kind once (in a
/// seeded order), so even a short run meets every fault; after that the kinds are drawn uniformly.
pub struct Schedule {
    rng: StdRng,
    bounds: Bounds,
    first: Vec<Fault>,
}

impl Schedule {
    /// The schedule of `seed`.
    pub fn new(seed: u64, bounds: Bounds) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut first = Fault::ALL.to_vec();
        // Fisher–Yates with the schedule's own generator, so the permutation is part of the replay.
        for i in (1..first.len()).rev() {
            let j = rng.random_range(0..=i);
            first.swap(i, j);
        }
        first.reverse();
        Self { rng, bounds, first }
    }

    /// How long a paused relay stays stopped: past the Lease's duration, so a standby takes over and the
    /// paused one finds itself fenced when it resumes.
    pub fn pause(lease_duration: Duration) -> Duration {
        lease_duration + Duration::from_secs(1)
    }
}

fn between(rng: &mut StdRng, lo: Duration, hi: Duration) -> Duration {
    if hi <= lo {
        return lo;
    }
    Duration::from_millis(rng.random_range(lo.as_millis() as u64..=hi.as_millis() as u64))
}

impl Iterator for Schedule {
    type Item = Step;

    fn next(&mut self) -> Option<Step> {
        let fault = match self.first.pop() {
            Some(f) => f,
            None => Fault::ALL[self.rng.random_range(0..Fault::ALL.len())],
        };
        let wait = between(&mut self.rng, self.bounds.min_wait, self.bounds.max_wait);
        let hold = between(
            &mut self.rng,
            Duration::from_millis(200),
            self.bounds.max_hold,
        );
        Some(Step {
            wait,
            fault,
            pick: self.rng.random(),
            hold,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds() -> Bounds {
        Bounds {
            min_wait: Duration::from_millis(500),
            max_wait: Duration::from_secs(3),
            max_hold: Duration::from_secs(2),
        }
    }

    #[test]
    fn a_seed_replays_the_same_schedule_and_another_seed_does_not() {
        let a: Vec<Step> = Schedule::new(7, bounds()).take(50).collect();
        let b: Vec<Step> = Schedule::new(7, bounds()).take(50).collect();
        let c: Vec<Step> = Schedule::new(8, bounds()).take(50).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn the_first_steps_hold_every_kind_once_and_later_kinds_vary() {
        for seed in 0..20 {
            let steps: Vec<Step> = Schedule::new(seed, bounds()).take(200).collect();
            let mut first: Vec<Fault> = steps[..Fault::ALL.len()].iter().map(|s| s.fault).collect();
            first.sort();
            assert_eq!(first, Fault::ALL, "seed {seed}");
            for kind in Fault::ALL {
                assert!(
                    steps[Fault::ALL.len()..].iter().any(|s| s.fault == kind),
                    "seed {seed}: {kind} never drawn in 193 steps"
                );
            }
        }
    }

    #[test]
    fn waits_and_holds_stay_within_the_bounds() {
        for s in Schedule::new(1, bounds()).take(500) {
            assert!(
                s.wait >= bounds().min_wait && s.wait <= bounds().max_wait,
                "{s:?}"
            );
            assert!(
                s.hold >= Duration::from_millis(200) && s.hold <= bounds().max_hold,
                "{s:?}"
            );
        }
    }
}
