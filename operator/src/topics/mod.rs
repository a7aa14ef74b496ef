//! Kafka topics of a ConsumerGroup. This module is the pure plan (create, grow, refuse, cap) and the small
//! admin trait the reconciler calls; the IO lives in `kafka` ([`KafkaAdmin`], librdkafka's AdminClient) and
//! `memory` ([`MemoryAdmin`], in memory: for tests and for the paths no broker available to the tests
//! implements, such as CreatePartitions).

use std::collections::BTreeMap;

use futures::future::BoxFuture;

use crate::crd::{ConsumerGroupSpec, PartitionPolicy, TopicSpec};

mod kafka;
mod memory;

pub use kafka::KafkaAdmin;
pub use memory::{MemoryAdmin, MemoryState};

/// A broker error, with the broker's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AdminError(pub String);

/// A topic to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTopicPlan {
    /// Name.
    pub name: String,
    /// Partitions.
    pub partitions: i32,
    /// Replication factor.
    pub replication_factor: i32,
    /// Topic configuration.
    pub config: BTreeMap<String, String>,
}

/// A partition decrease the operator will not make (Kafka cannot; Strimzi semantics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Topic.
    pub topic: String,
    /// Partitions it has.
    pub current: i32,
    /// Partitions the spec asks for.
    pub requested: i32,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "topic `{}` has {} partitions; the spec asks for {}: partitions never decrease (topic left untouched)",
            self.topic, self.current, self.requested
        )
    }
}

/// What to do about a group's topics.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TopicPlan {
    /// Missing topics.
    pub create: Vec<NewTopicPlan>,
    /// Topics whose partitions grow: (name, from, to).
    pub grow: Vec<(String, i32, i32)>,
    /// Decreases refused.
    pub refused: Vec<Refusal>,
    /// Partitions per topic once the plan is carried out (refused topics keep theirs).
    pub partitions: BTreeMap<String, i32>,
    /// Replicas to run.
    pub effective_replicas: i32,
    /// `Some((requested, cap))` when `Cap` lowered the replica count.
    pub capped: Option<(i32, i32)>,
}

/// Plans the topics of `spec` given the partition counts the broker reports (missing topics absent).
pub fn plan_topics(spec: &ConsumerGroupSpec, observed: &BTreeMap<String, i32>) -> TopicPlan {
    let mut plan = TopicPlan::default();
    let grow_to_replicas = spec.partition_policy == PartitionPolicy::GrowPartitions;
    for t in &spec.topics {
        let wanted = if grow_to_replicas {
            t.partitions.max(spec.replicas)
        } else {
            t.partitions
        };
        let after = match observed.get(&t.name).copied() {
            None => {
                plan.create.push(new_topic(t, wanted));
                wanted
            }
            Some(current) if wanted > current => {
                plan.grow.push((t.name.clone(), current, wanted));
                wanted
            }
            // GrowPartitions may have raised the topic above the spec: never shrink, nothing to refuse.
            Some(current) if t.partitions < current && !grow_to_replicas => {
                plan.refused.push(Refusal {
                    topic: t.name.clone(),
                    current,
                    requested: t.partitions,
                });
                current
            }
            Some(current) => current,
        };
        plan.partitions.insert(t.name.clone(), after);
    }
    // A member beyond the largest topic's partition count would own nothing.
    let most = plan.partitions.values().copied().max().unwrap_or(0);
    plan.effective_replicas = spec.replicas;
    if !grow_to_replicas && spec.replicas > most {
        plan.effective_replicas = most;
        plan.capped = Some((spec.replicas, most));
    }
    plan
}

fn new_topic(t: &TopicSpec, partitions: i32) -> NewTopicPlan {
    NewTopicPlan {
        name: t.name.clone(),
        partitions,
        replication_factor: t.replication_factor,
        config: t.config.clone(),
    }
}

/// The broker operations the operator needs.
pub trait TopicAdmin: Send + Sync {
    /// Partition counts of the named topics that exist.
    fn describe<'a>(
        &'a self,
        names: &'a [String],
    ) -> BoxFuture<'a, Result<BTreeMap<String, i32>, AdminError>>;
    /// Creates a topic (an existing one is left as it is).
    fn create<'a>(&'a self, topic: &'a NewTopicPlan) -> BoxFuture<'a, Result<(), AdminError>>;
    /// Raises a topic's partition count to `total`.
    fn grow<'a>(&'a self, name: &'a str, total: i32) -> BoxFuture<'a, Result<(), AdminError>>;
    /// Deletes a topic (a missing one is fine).
    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), AdminError>>;
    /// Sum over the topics' partitions of high watermark − committed offset of `group` (a partition without
    /// a committed offset counts from its low watermark).
    fn lag<'a>(
        &'a self,
        group: &'a str,
        topics: &'a [String],
    ) -> BoxFuture<'a, Result<i64, AdminError>>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(replicas: i32, policy: &str, topics: serde_json::Value) -> ConsumerGroupSpec {
        serde_json::from_value(json!({
            "groupId": "g", "image": "i", "replicas": replicas, "partitionPolicy": policy,
            "kafka": {"bootstrap": "k:9092"},
            "database": {"secretRef": {"name": "db", "key": "url"}},
            "topics": topics,
        }))
        .unwrap()
    }

    fn observed(pairs: &[(&str, i32)]) -> BTreeMap<String, i32> {
        pairs.iter().map(|(n, p)| (n.to_string(), *p)).collect()
    }

    #[test]
    fn missing_topics_are_created_with_their_settings() {
        let s = spec(
            2,
            "Cap",
            json!([{"name": "orders", "partitions": 6, "replicationFactor": 3,
            "config": {"retention.ms": "1000"}}]),
        );
        let p = plan_topics(&s, &observed(&[]));
        assert_eq!(
            p.create,
            vec![NewTopicPlan {
                name: "orders".into(),
                partitions: 6,
                replication_factor: 3,
                config: BTreeMap::from([("retention.ms".into(), "1000".into())]),
            }]
        );
        assert_eq!(p.effective_replicas, 2);
        assert_eq!(p.capped, None);
        assert_eq!(p.partitions, observed(&[("orders", 6)]));
    }

    #[test]
    fn partitions_grow_and_a_decrease_is_refused_untouched() {
        let s = spec(
            1,
            "Cap",
            json!([{"name": "a", "partitions": 8}, {"name": "b", "partitions": 2}]),
        );
        let p = plan_topics(&s, &observed(&[("a", 6), ("b", 4)]));
        assert_eq!(p.grow, vec![("a".into(), 6, 8)]);
        assert_eq!(
            p.refused,
            vec![Refusal {
                topic: "b".into(),
                current: 4,
                requested: 2
            }]
        );
        assert!(p.refused[0]
            .to_string()
            .contains("partitions never decrease"));
        assert_eq!(p.partitions, observed(&[("a", 8), ("b", 4)]));
        assert!(p.create.is_empty());
    }

    #[test]
    fn cap_limits_replicas_to_the_largest_topic() {
        let s = spec(
            10,
            "Cap",
            json!([{"name": "a", "partitions": 6}, {"name": "b", "partitions": 3}]),
        );
        let p = plan_topics(&s, &observed(&[("a", 6), ("b", 3)]));
        assert_eq!(p.effective_replicas, 6);
        assert_eq!(p.capped, Some((10, 6)));
        assert!(p.grow.is_empty());
        // At or below the partition count nothing is capped; zero replicas stays zero.
        assert_eq!(
            plan_topics(
                &spec(6, "Cap", json!([{"name": "a", "partitions": 6}])),
                &observed(&[("a", 6)])
            )
            .capped,
            None
        );
        assert_eq!(
            plan_topics(
                &spec(0, "Cap", json!([{"name": "a", "partitions": 6}])),
                &observed(&[("a", 6)])
            )
            .effective_replicas,
            0
        );
    }

    #[test]
    fn grow_partitions_raises_topics_to_the_replicas_and_never_shrinks() {
        let s = spec(
            10,
            "GrowPartitions",
            json!([{"name": "a", "partitions": 6}, {"name": "b", "partitions": 12}]),
        );
        let p = plan_topics(&s, &observed(&[("a", 6), ("b", 12)]));
        assert_eq!(p.grow, vec![("a".into(), 6, 10)]);
        assert_eq!(p.effective_replicas, 10);
        assert_eq!(p.capped, None);
        // Scaled back down: the topic keeps 10 partitions, and that is not a refusal.
        let s = spec(2, "GrowPartitions", json!([{"name": "a", "partitions": 6}]));
        let p = plan_topics(&s, &observed(&[("a", 10)]));
        assert!(p.grow.is_empty() && p.refused.is_empty());
        assert_eq!(p.partitions, observed(&[("a", 10)]));
        // A new topic under GrowPartitions is created with max(partitions, replicas).
        let s = spec(4, "GrowPartitions", json!([{"name": "c", "partitions": 2}]));
        assert_eq!(plan_topics(&s, &observed(&[])).create[0].partitions, 4);
    }

    #[tokio::test]
    async fn the_memory_admin_grows_only_upwards_and_fails_on_demand() {
        let a = MemoryAdmin::default();
        let t = NewTopicPlan {
            name: "x".into(),
            partitions: 2,
            replication_factor: 1,
            config: BTreeMap::new(),
        };
        a.create(&t).await.unwrap();
        a.create(&t).await.unwrap();
        assert_eq!(a.state().log, ["create x 2"]);
        assert!(a
            .grow("x", 2)
            .await
            .unwrap_err()
            .0
            .contains("Invalid partitions"));
        a.grow("x", 3).await.unwrap();
        assert_eq!(
            a.describe(&["x".into(), "y".into()]).await.unwrap(),
            observed(&[("x", 3)])
        );
        a.with(|s| s.fail = Some("Broker: Not controller".into()));
        assert_eq!(a.delete("x").await.unwrap_err().0, "Broker: Not controller");
    }
}
