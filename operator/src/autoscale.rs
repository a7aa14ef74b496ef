//! Lag-based autoscaling of a ConsumerGroup, decided by a pure function: from the group's lag, its partitions,
//! the current replicas and the recent recommendations, the replicas it should run and why.
//!
//! The rule (HPA semantics for the windows, KEDA's for activation):
//! 1. recommendation = ceil(total lag / `lagPerReplica`); a group at 0 stays at 0 while lag < `activationLag`
//!    and wakes with at least one replica once lag ≥ `activationLag`;
//! 2. clamped to [`minReplicas`, `maxReplicas`], then to the largest topic's partition count (`Cap`: a member
//!    beyond it would own nothing) — with `GrowPartitions` the topics grow instead;
//! 3. scaling up acts on the *lowest* recommendation of the last `scaleUpStabilizationSeconds`, scaling down on
//!    the *highest* of the last `scaleDownStabilizationSeconds` — so a lag series that jumps back and forth
//!    changes the replicas at most once per window, and a group reaches 0 only after a whole window at 0.
//!    Before the first decision the running replicas count as the history.

use serde::{Deserialize, Serialize};

use crate::crd::AutoscalingSpec;

pub use contract::crd::Recommendation;

/// Why the decision is what it is (the metrics label and the status field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Reason {
    /// Lag asks for more replicas and the scale-up window agrees.
    ScaleUp,
    /// Lag asks for fewer replicas and the scale-down window agrees.
    ScaleDown,
    /// A group at 0 woke: lag reached `activationLag`.
    Activated,
    /// A group at 0 stays there: lag is below `activationLag`.
    BelowActivation,
    /// The recommendation equals the current replicas.
    Steady,
    /// More was recommended, but the scale-up window still holds a lower recommendation.
    ScaleUpStabilizing,
    /// Less was recommended, but the scale-down window still holds a higher recommendation.
    ScaleDownStabilizing,
    /// Held at `maxReplicas`.
    AtMax,
    /// Held at the largest topic's partition count (`partitionPolicy: Cap`).
    AtPartitions,
    /// Held at `minReplicas`.
    AtMin,
}

impl Reason {
    /// The name used in metrics, events and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ScaleUp => "ScaleUp",
            Reason::ScaleDown => "ScaleDown",
            Reason::Activated => "Activated",
            Reason::BelowActivation => "BelowActivation",
            Reason::Steady => "Steady",
            Reason::ScaleUpStabilizing => "ScaleUpStabilizing",
            Reason::ScaleDownStabilizing => "ScaleDownStabilizing",
            Reason::AtMax => "AtMax",
            Reason::AtPartitions => "AtPartitions",
            Reason::AtMin => "AtMin",
        }
    }
}

/// What the decision looks at.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// The group's autoscaling settings.
    pub spec: &'a AutoscalingSpec,
    /// Σ (high watermark − committed offset) over the group's partitions.
    pub lag: i64,
    /// Partitions of the group's largest topic.
    pub partitions: i32,
    /// Whether the topics grow with the replicas (`GrowPartitions`) instead of capping them.
    pub grow_partitions: bool,
    /// Replicas the group runs now (the last decision, or `spec.replicas` before the first).
    pub current: i32,
    /// Earlier recommendations, oldest first.
    pub history: &'a [Recommendation],
    /// Unix time in seconds.
    pub now: i64,
}

/// The outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Replicas to run.
    pub desired: i32,
    /// This round's recommendation before the windows.
    pub recommended: i32,
    /// Why.
    pub reason: Reason,
    /// The history to keep: what the windows still need, plus this round's recommendation.
    pub history: Vec<Recommendation>,
}

/// Decides the replicas (see the module documentation for the rule).
pub fn decide(i: &Inputs<'_>) -> Decision {
    let s = i.spec;
    let per_replica = s.lag_per_replica.max(1);
    let lag = i.lag.max(0);
    let raw = i32::try_from((lag + per_replica - 1) / per_replica).unwrap_or(i32::MAX);
    let mut bound = None;
    let mut recommended = raw;
    if i.current == 0 {
        if lag < s.activation_lag.max(1) {
            recommended = 0;
            bound = Some(Reason::BelowActivation);
        } else {
            recommended = recommended.max(1);
        }
    }
    if recommended > s.max_replicas {
        recommended = s.max_replicas;
        bound = Some(Reason::AtMax);
    }
    if !i.grow_partitions && i.partitions > 0 && recommended > i.partitions {
        recommended = i.partitions;
        bound = Some(Reason::AtPartitions);
    }
    if recommended < s.min_replicas {
        recommended = s.min_replicas;
        bound = Some(Reason::AtMin);
    }

    // With no history (the first decision), the replicas running were right until now: the windows start
    // from them, so creating a group or turning autoscaling on never scales down at once.
    let seed = [Recommendation {
        replicas: i.current,
        since: i.now - 1,
    }];
    let past = if i.history.is_empty() {
        &seed[..]
    } else {
        i.history
    };
    let history = with_recommendation(past, recommended, i.now, window_keep(s));
    let in_window = |seconds: i32| window(&history, i.now, i64::from(seconds.max(0)));
    let (desired, reason) = if recommended > i.current {
        let lowest = in_window(s.scale_up_stabilization_seconds)
            .min()
            .unwrap_or(recommended);
        let desired = lowest.max(i.current);
        let reason = if desired == i.current {
            Reason::ScaleUpStabilizing
        } else if i.current == 0 {
            Reason::Activated
        } else {
            Reason::ScaleUp
        };
        (desired, reason)
    } else if recommended < i.current {
        let highest = in_window(s.scale_down_stabilization_seconds)
            .max()
            .unwrap_or(recommended);
        let desired = highest.min(i.current);
        let reason = if desired == i.current {
            Reason::ScaleDownStabilizing
        } else {
            Reason::ScaleDown
        };
        (desired, reason)
    } else {
        (i.current, bound.unwrap_or(Reason::Steady))
    };
    Decision {
        desired,
        recommended,
        reason,
        history,
    }
}

/// How far back the history must reach.
fn window_keep(s: &AutoscalingSpec) -> i64 {
    i64::from(
        s.scale_up_stabilization_seconds
            .max(s.scale_down_stabilization_seconds)
            .max(0),
    )
}

/// `history` with `replicas` recorded at `now`, as change points, without entries older than `keep` seconds
/// (the entry in force at `now - keep` stays: it covers the start of the window).
fn with_recommendation(
    history: &[Recommendation],
    replicas: i32,
    now: i64,
    keep: i64,
) -> Vec<Recommendation> {
    let mut h: Vec<Recommendation> = history.iter().copied().filter(|r| r.since <= now).collect();
    if h.last().map(|r| r.replicas) != Some(replicas) {
        h.push(Recommendation {
            replicas,
            since: now,
        });
    }
    let start = now - keep;
    // The first entry still in force at `start`: everything before it is outside every window.
    let first = h.iter().rposition(|r| r.since <= start).unwrap_or(0);
    h.drain(..first);
    h
}

/// The recommendations in force at some moment of `[now - seconds, now]`.
fn window(history: &[Recommendation], now: i64, seconds: i64) -> impl Iterator<Item = i32> + '_ {
    let start = now - seconds;
    history.iter().enumerate().filter_map(move |(k, r)| {
        let until = history.get(k + 1).map(|n| n.since).unwrap_or(i64::MAX);
        (until > start || k + 1 == history.len()).then_some(r.replicas)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AutoscalingSpec {
        AutoscalingSpec {
            min_replicas: 0,
            max_replicas: 10,
            lag_per_replica: 100,
            activation_lag: 10,
            scale_up_stabilization_seconds: 0,
            scale_down_stabilization_seconds: 60,
            poll_interval_seconds: 15,
        }
    }

    /// Runs `decide` over `(now, lag)` steps, feeding back history and replicas; returns the replicas.
    fn run(
        spec: &AutoscalingSpec,
        partitions: i32,
        start: i32,
        steps: &[(i64, i64)],
    ) -> Vec<(i32, Reason)> {
        let mut history = Vec::new();
        let mut current = start;
        let mut out = Vec::new();
        for &(now, lag) in steps {
            let d = decide(&Inputs {
                spec,
                lag,
                partitions,
                grow_partitions: false,
                current,
                history: &history,
                now,
            });
            history = d.history;
            current = d.desired;
            out.push((d.desired, d.reason));
        }
        out
    }

    #[test]
    fn lag_per_replica_rounds_up_and_is_clamped_to_max_and_partitions() {
        let s = spec();
        assert_eq!(run(&s, 12, 1, &[(0, 250)]), [(3, Reason::ScaleUp)]);
        assert_eq!(
            run(&s, 12, 1, &[(0, 5_000)]),
            [(10, Reason::ScaleUp)],
            "max 10"
        );
        assert_eq!(
            run(&s, 6, 1, &[(0, 5_000)]),
            [(6, Reason::ScaleUp)],
            "6 partitions"
        );
        assert_eq!(run(&s, 6, 6, &[(0, 5_000)]), [(6, Reason::AtPartitions)]);
        assert_eq!(run(&s, 12, 10, &[(0, 5_000)]), [(10, Reason::AtMax)]);
        // GrowPartitions: the partitions follow the replicas, so they do not cap.
        let d = decide(&Inputs {
            spec: &s,
            lag: 5_000,
            partitions: 6,
            grow_partitions: true,
            current: 1,
            history: &[],
            now: 0,
        });
        assert_eq!(d.desired, 10);
    }

    #[test]
    fn min_replicas_holds_and_a_group_at_zero_wakes_only_at_the_activation_lag() {
        let mut s = spec();
        s.min_replicas = 2;
        assert_eq!(run(&s, 6, 2, &[(0, 0)]), [(2, Reason::AtMin)]);
        let s = spec();
        assert_eq!(run(&s, 6, 0, &[(0, 9)]), [(0, Reason::BelowActivation)]);
        assert_eq!(run(&s, 6, 0, &[(0, 10)]), [(1, Reason::Activated)]);
        assert_eq!(run(&s, 6, 0, &[(0, 350)]), [(4, Reason::Activated)]);
        // Above zero the activation lag plays no part: a little lag keeps one pod.
        assert_eq!(run(&s, 6, 1, &[(0, 3)]), [(1, Reason::Steady)]);
    }

    #[test]
    fn zero_only_after_a_whole_scale_down_window_without_lag() {
        let s = spec(); // scale-down window 60 s
                        // Lag is 0 from second 15: the window holds the 4 until second 75.
        let got = run(
            &s,
            6,
            4,
            &[(0, 400), (15, 0), (30, 0), (74, 0), (75, 0), (90, 0)],
        );
        assert_eq!(
            got,
            [
                (4, Reason::Steady),
                (4, Reason::ScaleDownStabilizing),
                (4, Reason::ScaleDownStabilizing),
                (4, Reason::ScaleDownStabilizing),
                (0, Reason::ScaleDown),
                (0, Reason::BelowActivation),
            ]
        );
    }

    #[test]
    fn scale_up_waits_for_the_lowest_recommendation_of_its_window() {
        let mut s = spec();
        s.scale_up_stabilization_seconds = 30;
        // Lag is high from second 10: the window holds the 1 until second 40.
        let got = run(&s, 10, 1, &[(0, 100), (10, 900), (39, 900), (40, 900)]);
        assert_eq!(
            got,
            [
                (1, Reason::Steady),
                (1, Reason::ScaleUpStabilizing),
                (1, Reason::ScaleUpStabilizing),
                (9, Reason::ScaleUp),
            ]
        );
    }

    #[test]
    fn a_flapping_lag_changes_replicas_at_most_once_per_window() {
        let mut s = spec();
        s.scale_up_stabilization_seconds = 60;
        s.scale_down_stabilization_seconds = 60;
        // Lag jumping between 100 and 800 every 15 s for 10 minutes.
        let steps: Vec<(i64, i64)> = (0..40)
            .map(|k| (k * 15, if k % 2 == 0 { 800 } else { 100 }))
            .collect();
        let got = run(&s, 10, 4, &steps);
        let changes = got.windows(2).filter(|w| w[0].0 != w[1].0).count();
        assert!(changes <= 1, "{changes} changes: {got:?}");
        // Without windows the same series changes the replicas at every step.
        let mut nervous = s.clone();
        nervous.scale_up_stabilization_seconds = 0;
        nervous.scale_down_stabilization_seconds = 0;
        let got = run(&nervous, 10, 4, &steps);
        assert_eq!(got.windows(2).filter(|w| w[0].0 != w[1].0).count(), 39);
    }

    #[test]
    fn the_first_decision_does_not_scale_down_at_once() {
        let s = spec(); // scale-down window 60 s
        assert_eq!(
            run(&s, 6, 3, &[(1_000, 0), (1_059, 0), (1_060, 0)]),
            [
                (3, Reason::ScaleDownStabilizing),
                (3, Reason::ScaleDownStabilizing),
                (0, Reason::ScaleDown)
            ]
        );
    }

    #[test]
    fn the_history_keeps_only_what_the_windows_need() {
        let s = spec(); // longest window 60 s
        let mut history = Vec::new();
        for k in 0..100 {
            let d = decide(&Inputs {
                spec: &s,
                lag: (k % 7) * 100,
                partitions: 10,
                grow_partitions: false,
                current: 3,
                history: &history,
                now: k * 15,
            });
            history = d.history;
        }
        assert!(history.len() <= 6, "{history:?}");
        assert!(history[0].since <= 99 * 15 - 60);
        assert!(history.windows(2).all(|w| w[0].replicas != w[1].replicas));
    }
}
