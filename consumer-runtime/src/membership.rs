//! Notices a group membership that does not settle, or settles with nothing, while the broker answers.
//!
//! librdkafka rejoins a group by itself after a session timeout, but a JoinGroup the coordinator never
//! answers is only given up after `max.poll.interval.ms` (5 minutes by default), and a coordinator can
//! hand out a generation whose leader is a member that died (tansu 0.6 does, after a member is killed and
//! restarted within its session timeout): nobody computes assignments and every member stays "steady"
//! with no partitions. Either way the group's partitions wait. The runtime recreates its Kafka client when
//! this watch says so, as a restarted pod would, but without waiting for a liveness probe. An empty
//! assignment alone is legitimate (more members than partitions), so it is only acted on when the group
//! makes no progress at all while records wait ([`group_stuck`]); the group's own description cannot
//! decide it, as not every broker answers DescribeGroups (tansu 0.6 does not).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The group state librdkafka reports in its statistics (`cgrp.state`, `cgrp.join_state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupState {
    /// Coordinator state, `up` once the coordinator is known and connected.
    pub state: String,
    /// Join state, `steady` once the member has its assignment (possibly empty).
    pub join_state: String,
    /// Partitions assigned to this member.
    pub assignment_size: i32,
}

impl GroupState {
    /// A member in the group with its assignment settled (an empty assignment is settled too: a member
    /// beyond the partition count is a hot standby).
    pub fn settled(&self) -> bool {
        self.state == "up" && self.join_state == "steady"
    }
}

/// How long the membership has been unsettled while a broker answered.
#[derive(Debug, Clone)]
pub struct MembershipWatch {
    limit: Duration,
    unsettled_since: Option<Instant>,
    empty_since: Option<Instant>,
    last: Option<GroupState>,
}

impl MembershipWatch {
    /// A watch that calls the membership stalled after `limit` unsettled with a broker up.
    pub fn new(limit: Duration) -> Self {
        Self {
            limit,
            unsettled_since: None,
            empty_since: None,
            last: None,
        }
    }

    /// Records one statistics report. While no broker is up the clock does not run: a broker outage is
    /// waited out, not answered with a new client (the time counts from the broker's return).
    pub fn observe(&mut self, now: Instant, group: GroupState, broker_up: bool) {
        if group.settled() || !broker_up {
            self.unsettled_since = None;
        } else if self.unsettled_since.is_none() {
            self.unsettled_since = Some(now);
        }
        if !group.settled() || group.assignment_size > 0 || !broker_up {
            self.empty_since = None;
        } else if self.empty_since.is_none() {
            self.empty_since = Some(now);
        }
        self.last = Some(group);
    }

    /// How long the member has been settled without partitions, once that exceeds the limit (then look
    /// at the group's progress, [`group_stuck`]).
    pub fn empty_too_long(&self, now: Instant) -> Option<Duration> {
        let empty = now.saturating_duration_since(self.empty_since?);
        (empty > self.limit).then_some(empty)
    }

    /// The group's progress was sampled: look again after another limit.
    pub fn empty_is_legitimate(&mut self, now: Instant) {
        if self.empty_since.is_some() {
            self.empty_since = Some(now);
        }
    }

    /// `Some((how long, last state))` once the membership has been unsettled for longer than the limit.
    pub fn stalled(&self, now: Instant) -> Option<(Duration, GroupState)> {
        let since = self.unsettled_since?;
        let unsettled = now.saturating_duration_since(since);
        (unsettled > self.limit).then(|| (unsettled, self.last.clone().expect("observed")))
    }
}

/// Where a group stands on one partition: its committed offset and the partition's watermarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionProgress {
    /// The group's committed offset (`None`: nothing committed yet).
    pub committed: Option<i64>,
    /// Low watermark (where a group without a committed offset starts).
    pub low: i64,
    /// High watermark (the next offset to be written).
    pub high: i64,
}

impl PartitionProgress {
    fn waiting(&self) -> bool {
        self.high > self.committed.unwrap_or(self.low).max(self.low)
    }
}

/// Whether the group made no progress between two samples a rejoin timeout apart while records waited:
/// no committed offset moved and some partition had records beyond its committed offset both times. A
/// member without partitions that sees this knows the partitions are owned by nobody who consumes.
pub fn group_stuck(
    before: &BTreeMap<(String, i32), PartitionProgress>,
    after: &BTreeMap<(String, i32), PartitionProgress>,
) -> bool {
    let moved = after
        .iter()
        .any(|(tp, a)| before.get(tp).is_none_or(|b| b.committed != a.committed));
    let waited = after
        .iter()
        .any(|(tp, a)| a.waiting() && before.get(tp).is_some_and(PartitionProgress::waiting));
    !after.is_empty() && !moved && waited
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(state: &str, join_state: &str) -> GroupState {
        GroupState {
            state: state.into(),
            join_state: join_state.into(),
            assignment_size: 0,
        }
    }

    fn owning(n: i32) -> GroupState {
        GroupState {
            assignment_size: n,
            ..group("up", "steady")
        }
    }

    const LIMIT: Duration = Duration::from_secs(60);

    #[test]
    fn a_member_waiting_to_join_past_the_limit_is_stalled() {
        let t0 = Instant::now();
        let mut w = MembershipWatch::new(LIMIT);
        w.observe(t0, group("up", "wait-join"), true);
        w.observe(t0 + Duration::from_secs(59), group("up", "wait-join"), true);
        assert!(w.stalled(t0 + Duration::from_secs(59)).is_none());
        w.observe(t0 + Duration::from_secs(61), group("up", "wait-join"), true);
        let (for_, last) = w.stalled(t0 + Duration::from_secs(61)).expect("stalled");
        assert_eq!(for_, Duration::from_secs(61));
        assert_eq!(last, group("up", "wait-join"));
    }

    #[test]
    fn settling_restarts_the_clock_even_without_partitions() {
        let t0 = Instant::now();
        let mut w = MembershipWatch::new(LIMIT);
        w.observe(t0, group("up", "wait-sync"), true);
        w.observe(t0 + Duration::from_secs(30), group("up", "steady"), true);
        w.observe(t0 + Duration::from_secs(40), group("up", "wait-join"), true);
        assert!(w.stalled(t0 + Duration::from_secs(95)).is_none());
        assert!(w.stalled(t0 + Duration::from_secs(101)).is_some());
    }

    #[test]
    fn time_without_a_broker_does_not_count() {
        let t0 = Instant::now();
        let mut w = MembershipWatch::new(LIMIT);
        w.observe(t0, group("wait-coord", "init"), true);
        w.observe(
            t0 + Duration::from_secs(10),
            group("wait-coord", "init"),
            false,
        );
        w.observe(
            t0 + Duration::from_secs(100),
            group("query-coord", "init"),
            true,
        );
        assert!(w.stalled(t0 + Duration::from_secs(150)).is_none());
        assert!(w.stalled(t0 + Duration::from_secs(161)).is_some());
    }

    #[test]
    fn a_settled_member_without_partitions_is_reported_after_the_limit_until_found_legitimate() {
        let t0 = Instant::now();
        let mut w = MembershipWatch::new(LIMIT);
        w.observe(t0, owning(3), true);
        w.observe(t0 + Duration::from_secs(1), owning(0), true);
        assert!(
            w.stalled(t0 + Duration::from_secs(100)).is_none(),
            "settled"
        );
        assert!(w.empty_too_long(t0 + Duration::from_secs(60)).is_none());
        assert!(w.empty_too_long(t0 + Duration::from_secs(62)).is_some());
        w.empty_is_legitimate(t0 + Duration::from_secs(62));
        assert!(w.empty_too_long(t0 + Duration::from_secs(100)).is_none());
        assert!(w.empty_too_long(t0 + Duration::from_secs(123)).is_some());
        w.observe(t0 + Duration::from_secs(124), owning(1), true);
        assert!(w.empty_too_long(t0 + Duration::from_secs(300)).is_none());
    }

    fn progress(entries: &[(i32, Option<i64>, i64)]) -> BTreeMap<(String, i32), PartitionProgress> {
        entries
            .iter()
            .map(|&(p, committed, high)| {
                let at = PartitionProgress {
                    committed,
                    low: 0,
                    high,
                };
                (("orders".to_string(), p), at)
            })
            .collect()
    }

    #[test]
    fn a_group_is_stuck_when_nothing_commits_while_records_wait() {
        let before = progress(&[(0, Some(10), 50), (1, None, 0)]);
        let after = progress(&[(0, Some(10), 90), (1, None, 0)]);
        assert!(group_stuck(&before, &after));
        let committed = progress(&[(0, Some(11), 90), (1, None, 0)]);
        assert!(!group_stuck(&before, &committed), "someone consumes");
        let idle = progress(&[(0, Some(50), 50), (1, None, 0)]);
        assert!(!group_stuck(&idle, &idle), "nothing to consume");
        let new_records = progress(&[(0, Some(50), 60), (1, None, 0)]);
        assert!(
            !group_stuck(&idle, &new_records),
            "records only just arrived"
        );
        let never_committed = progress(&[(0, None, 5)]);
        assert!(group_stuck(&never_committed, &never_committed));
        assert!(!group_stuck(&BTreeMap::new(), &BTreeMap::new()));
    }
}
