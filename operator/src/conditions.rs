//! kstatus conditions, computed from what a reconcile found. `Ready` is always present; `Reconciling` and
//! `Stalled` appear only while true (abnormal-true); `Paused` only while the pause annotation is set.
//! `lastTransitionTime` moves only when a condition's status changes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// What a reconcile concluded about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Everything as specified.
    Ready,
    /// Converging (rollout, pods starting): will get there without help.
    Progressing {
        /// Why not ready yet.
        message: String,
    },
    /// Cannot converge without a change (bad spec, refused decrease, broker error).
    Stalled {
        /// `InvalidSpec`, `NotSupported`, `KafkaError`, ...
        reason: String,
        /// What is wrong, naming the field or the broker's message.
        message: String,
    },
}

/// Condition types.
pub const READY: &str = "Ready";
/// See [`READY`].
pub const RECONCILING: &str = "Reconciling";
/// See [`READY`].
pub const STALLED: &str = "Stalled";
/// See [`READY`].
pub const PAUSED: &str = "Paused";

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(now),
    }
}

/// Keeps the previous transition time of a condition whose status did not change.
fn keep_transition(mut c: Condition, previous: &[Condition]) -> Condition {
    if let Some(p) = previous.iter().find(|p| p.type_ == c.type_) {
        if p.status == c.status {
            c.last_transition_time = p.last_transition_time.clone();
        }
    }
    c
}

/// The conditions after a reconcile with outcome `health` at `generation`.
pub fn compute(
    previous: &[Condition],
    health: &Outcome,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let mut out = match health {
        Outcome::Ready => vec![condition(
            READY,
            true,
            "Reconciled",
            "all owned objects are up to date and ready",
            generation,
            now,
        )],
        Outcome::Progressing { message } => vec![
            condition(READY, false, "Progressing", message, generation, now),
            condition(RECONCILING, true, "Progressing", message, generation, now),
        ],
        Outcome::Stalled { reason, message } => vec![
            condition(READY, false, reason, message, generation, now),
            condition(STALLED, true, reason, message, generation, now),
        ],
    };
    out = out
        .into_iter()
        .map(|c| keep_transition(c, previous))
        .collect();
    out
}

/// The conditions of a paused object: the previous ones, plus `Paused=True` saying why nothing changes.
pub fn paused(previous: &[Condition], generation: Option<i64>, now: Timestamp) -> Vec<Condition> {
    let mut out: Vec<Condition> = previous
        .iter()
        .filter(|c| c.type_ != PAUSED)
        .cloned()
        .collect();
    out.push(keep_transition(
        condition(
            PAUSED,
            true,
            "PausedByAnnotation",
            "reconciliation is paused by the annotation outbox.dev/paused=\"true\"; owned objects are left as they are",
            generation,
            now,
        ),
        previous,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn find<'a>(c: &'a [Condition], t: &str) -> Option<&'a Condition> {
        c.iter().find(|c| c.type_ == t)
    }

    #[test]
    fn ready_alone_when_healthy() {
        let c = compute(&[], &Outcome::Ready, Some(3), at(10));
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].type_, READY);
        assert_eq!(c[0].status, "True");
        assert_eq!(c[0].observed_generation, Some(3));
    }

    #[test]
    fn abnormal_conditions_appear_only_while_true() {
        let p = compute(
            &[],
            &Outcome::Progressing {
                message: "1/2 pods ready".into(),
            },
            Some(1),
            at(10),
        );
        assert_eq!(find(&p, READY).unwrap().status, "False");
        assert_eq!(find(&p, RECONCILING).unwrap().message, "1/2 pods ready");
        assert!(find(&p, STALLED).is_none());
        let s = compute(
            &p,
            &Outcome::Stalled {
                reason: "NotSupported".into(),
                message: "never decrease".into(),
            },
            Some(2),
            at(20),
        );
        assert_eq!(find(&s, READY).unwrap().reason, "NotSupported");
        assert_eq!(find(&s, STALLED).unwrap().status, "True");
        assert!(find(&s, RECONCILING).is_none());
        let r = compute(&s, &Outcome::Ready, Some(2), at(30));
        assert!(find(&r, STALLED).is_none());
    }

    #[test]
    fn transition_time_moves_only_with_the_status() {
        let a = compute(
            &[],
            &Outcome::Progressing {
                message: "x".into(),
            },
            Some(1),
            at(10),
        );
        let b = compute(
            &a,
            &Outcome::Stalled {
                reason: "KafkaError".into(),
                message: "y".into(),
            },
            Some(1),
            at(20),
        );
        assert_eq!(
            find(&b, READY).unwrap().last_transition_time,
            Time(at(10)),
            "still False"
        );
        let c = compute(&b, &Outcome::Ready, Some(1), at(30));
        assert_eq!(find(&c, READY).unwrap().last_transition_time, Time(at(30)));
    }

    #[test]
    fn paused_keeps_the_rest_and_says_so() {
        let a = compute(&[], &Outcome::Ready, Some(1), at(10));
        let p = paused(&a, Some(2), at(20));
        assert_eq!(find(&p, READY).unwrap().status, "True");
        let c = find(&p, PAUSED).unwrap();
        assert_eq!(c.status, "True");
        assert!(c.message.contains("outbox.dev/paused"));
        assert_eq!(paused(&p, Some(2), at(30)).len(), 2, "no duplicate Paused");
        assert!(
            find(&compute(&p, &Outcome::Ready, Some(2), at(40)), PAUSED).is_none(),
            "gone once resumed"
        );
    }
}
