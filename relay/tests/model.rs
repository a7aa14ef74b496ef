//! The relay's ordering rules simulated over random interleavings, as `lease-election` simulates its
//! elector: a model of the outbox table (writers serialised per key, committing late, in any order across
//! keys), the pipeline's claims ([`decide::claimable`], from the start or above the batches in hand), the
//! producer (acknowledgments oldest batch first; any record may fail through the broker's fault, and then
//! so do the later records of its key in that batch, as the idempotent producer keeps a partition's
//! records in order), the settle plan ([`decide::settle_after`]) and fence-free commits. After every step
//! each key's first deliveries must be in id order; after a fault-free drain nothing may be missing.
//!
//! A second test holds the model's claim rule to the real SQL: random tables in PostgreSQL, the same
//! claim through `Store::claim` and through [`decide::claimable`], the same ids.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use proptest::prelude::*;
use relay::decide::{
    self, Claim, Delivery, Fault, PendingRow, PoisonPolicy, RetryPolicy, TopicKey,
};
use relay::event::ClaimedEvent;

const KEYS: usize = 4;
const DEPTH: usize = 3;
const BATCH: usize = 3;

#[derive(Debug, Clone)]
enum Step {
    /// A writer of key `k` inserts its next event (uncommitted), if the key's previous one committed.
    Insert(usize),
    /// The oldest uncommitted insert of key `k` commits (n-th uncommitted row overall, for variety).
    Commit(usize),
    /// A claim, from the start (`true`) or above the rows in hand.
    Claim(bool),
    /// The oldest batch in flight is acknowledged; `mask` picks records that fail (broker's fault).
    Ack(u8),
    /// The acknowledged batch commits its settle.
    Settle,
    /// Backoffs elapse.
    Tick,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..KEYS).prop_map(Step::Insert),
        3 => (0..8usize).prop_map(Step::Commit),
        3 => any::<bool>().prop_map(Step::Claim),
        2 => any::<u8>().prop_map(Step::Ack),
        2 => Just(Step::Settle),
        1 => Just(Step::Tick),
    ]
}

#[derive(Debug, Clone)]
struct Row {
    id: i64,
    key: usize,
    committed: bool,
    due: bool,
    attempts: i32,
}

struct Batch {
    events: Vec<ClaimedEvent>,
    slots: Vec<Option<Delivery>>,
    outcomes: Option<Vec<Delivery>>,
}

#[derive(Default)]
struct Model {
    rows: Vec<Row>,
    next_id: i64,
    /// Batches in hand, oldest first; the front one may be acknowledged and settling.
    batches: VecDeque<Batch>,
    failed_before: decide::FailedHeads,
    /// Per key, the ids in the order they reached the partition.
    log: HashMap<usize, Vec<i64>>,
}

fn topic_key(k: usize) -> TopicKey {
    ("orders".into(), format!("k{k}"))
}

fn policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        backoff_base: Duration::from_millis(1),
        backoff_max: Duration::from_millis(1),
        poison: PoisonPolicy::ParkKey,
    }
}

impl Model {
    fn pending(&self) -> Vec<PendingRow> {
        let locked: HashSet<i64> = self
            .batches
            .iter()
            .flat_map(|b| b.events.iter().map(|e| e.id))
            .collect();
        self.rows
            .iter()
            .filter(|r| r.committed)
            .map(|r| PendingRow {
                id: r.id,
                key: topic_key(r.key),
                due: r.due,
                locked: locked.contains(&r.id),
            })
            .collect()
    }

    fn apply(&mut self, s: &Step) {
        match *s {
            Step::Insert(k) => {
                if self.rows.iter().any(|r| r.key == k && !r.committed) {
                    return; // the key's writers are serialised
                }
                self.next_id += 1;
                self.rows.push(Row {
                    id: self.next_id,
                    key: k,
                    committed: false,
                    due: true,
                    attempts: 0,
                });
            }
            Step::Commit(n) => {
                if let Some(r) = self.rows.iter_mut().filter(|r| !r.committed).nth(n) {
                    r.committed = true;
                }
            }
            Step::Claim(from_start) => self.claim(from_start),
            Step::Ack(mask) => self.ack(mask),
            Step::Settle => self.settle(),
            Step::Tick => self.rows.iter_mut().for_each(|r| r.due = true),
        }
    }

    /// The relay's claim: above the highest id in hand unless from the start (then the ids in hand are
    /// passed), withholding the keys the acknowledged batch failed (not committed yet).
    fn claim(&mut self, from_start: bool) {
        if self.batches.len() >= DEPTH {
            return;
        }
        let in_hand: Vec<i64> = self
            .batches
            .iter()
            .flat_map(|b| b.events.iter().map(|e| e.id))
            .collect();
        let claim = match in_hand.iter().max() {
            Some(&h) if !from_start => Claim {
                after: h,
                in_flight: vec![],
            },
            _ => Claim {
                after: 0,
                in_flight: in_hand,
            },
        };
        let ids = decide::claimable(&self.pending(), &claim, BATCH, &HashSet::new());
        if ids.is_empty() {
            return;
        }
        let mut withheld: HashSet<TopicKey> = HashSet::new();
        if let Some(Batch {
            events,
            outcomes: Some(outcomes),
            ..
        }) = self.batches.front()
        {
            for (e, d) in events.iter().zip(outcomes) {
                if matches!(d, Delivery::Failed { .. }) {
                    withheld.insert((e.topic.clone(), e.key.clone()));
                }
            }
        }
        let events: Vec<ClaimedEvent> = ids
            .iter()
            .map(|id| {
                let r = self.rows.iter().find(|r| r.id == *id).unwrap();
                let mut e = ClaimedEvent::for_test(r.id, "orders", &format!("k{}", r.key), vec![]);
                e.attempts = r.attempts;
                e
            })
            .collect();
        let slots = decide::prepare_after(&events, 1_000_000, PoisonPolicy::ParkKey, &withheld);
        self.batches.push_back(Batch {
            events,
            slots,
            outcomes: None,
        });
    }

    fn ack(&mut self, mask: u8) {
        let Some(b) = self.batches.front_mut() else {
            return;
        };
        if b.outcomes.is_some() {
            return;
        }
        let mut failed_keys: HashSet<String> = HashSet::new();
        let mut outcomes = vec![];
        for (i, (e, slot)) in b.events.iter().zip(&b.slots).enumerate() {
            let d = match slot {
                Some(d) => d.clone(),
                None if failed_keys.contains(&e.key) || mask & (1 << (i % 8)) != 0 => {
                    failed_keys.insert(e.key.clone());
                    Delivery::Failed {
                        error: "timed out".into(),
                        code: "MessageTimedOut".into(),
                        fault: Fault::Broker,
                    }
                }
                None => {
                    let k: usize = e.key[1..].parse().unwrap();
                    self.log.entry(k).or_default().push(e.id);
                    Delivery::Acked {
                        partition: 0,
                        offset: 0,
                    }
                }
            };
            outcomes.push(d);
        }
        b.outcomes = Some(outcomes);
    }

    fn settle(&mut self) {
        if !matches!(
            self.batches.front(),
            Some(Batch {
                outcomes: Some(_),
                ..
            })
        ) {
            return;
        }
        let b = self.batches.pop_front().unwrap();
        let outcomes = b.outcomes.unwrap();
        let plan =
            decide::settle_after(&b.events, &outcomes, &policy(), || 0.0, &self.failed_before);
        assert_eq!(
            plan.order_violations, 0,
            "an acknowledgment overtook a failure of its key"
        );
        for a in plan.actions {
            match a {
                decide::Settle::Delivered { id, .. } => self.rows.retain(|r| r.id != id),
                decide::Settle::Retry { id, counts, .. } => {
                    let r = self.rows.iter_mut().find(|r| r.id == id).unwrap();
                    r.attempts += counts as i32;
                    r.due = false;
                }
                decide::Settle::Dead { .. } => panic!("broker faults never dead-letter"),
            }
        }
        self.failed_before = if self.batches.is_empty() {
            decide::FailedHeads::new()
        } else {
            plan.failed_heads
        };
    }

    fn check_order(&self) {
        for (k, ids) in &self.log {
            let mut seen = HashSet::new();
            let mut last = 0;
            for id in ids {
                if seen.insert(*id) {
                    assert!(
                        *id > last,
                        "key {k}: {id} reached the partition after {last}: {ids:?}"
                    );
                    last = *id;
                }
            }
        }
    }

    /// Everything commits, faults stop, and the relay drains the outbox.
    fn drain(&mut self) {
        self.rows.iter_mut().for_each(|r| r.committed = true);
        for _ in 0..1000 {
            if self.rows.is_empty() && self.batches.is_empty() {
                return;
            }
            self.apply(&Step::Tick);
            self.ack(0);
            self.settle();
            self.claim(true);
            self.check_order();
        }
        panic!("the outbox did not drain: {:?}", self.rows);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn every_interleaving_keeps_each_keys_order_and_loses_nothing(steps in prop::collection::vec(step(), 1..120)) {
        let mut m = Model::default();
        for s in &steps {
            m.apply(s);
            m.check_order();
        }
        let written = m.next_id as usize;
        m.drain();
        let delivered: HashSet<i64> = m.log.values().flatten().copied().collect();
        prop_assert_eq!(delivered.len(), written, "every event delivered");
    }
}
