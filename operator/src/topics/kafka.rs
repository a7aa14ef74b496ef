//! [`KafkaAdmin`]: the topic operations and the lag read on librdkafka's AdminClient and a consumer
//! handle (the IO side of the topic plan).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rdkafka::admin::{
    AdminClient, AdminOptions, NewPartitions, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::{AdminError, NewTopicPlan, TopicAdmin};

/// [`TopicAdmin`] on librdkafka's AdminClient.
pub struct KafkaAdmin {
    admin: Arc<AdminClient<DefaultClientContext>>,
    config: ClientConfig,
    timeout: Duration,
}

impl KafkaAdmin {
    /// A client for `bootstrap` with extra librdkafka properties.
    pub fn new(bootstrap: &str, extra: &[(String, String)]) -> Result<Self, AdminError> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", bootstrap);
        for (k, v) in extra {
            config.set(k, v);
        }
        let admin = config.create().map_err(|e| AdminError(e.to_string()))?;
        Ok(Self {
            admin: Arc::new(admin),
            config,
            timeout: Duration::from_secs(10),
        })
    }

    /// `r`, its error preceded by the broker's refusal of this client's credentials or certificate when
    /// that is the cause: the call itself then fails only with a transport error or a timeout.
    async fn judged<T>(&self, r: Result<T, AdminError>) -> Result<T, AdminError> {
        let Err(e) = r else { return r };
        let config = self.config.clone();
        match tokio::task::spawn_blocking(move || refusal(&config)).await {
            Ok(Some(refused)) => Err(AdminError(format!("{refused} ({e})"))),
            _ => Err(e),
        }
    }

    fn options(&self) -> AdminOptions {
        AdminOptions::new().request_timeout(Some(self.timeout))
    }

    /// A topic's configuration as the broker describes it (for tests and diagnostics).
    pub async fn topic_config(&self, name: &str) -> Result<BTreeMap<String, String>, AdminError> {
        let res = self
            .admin
            .describe_configs([&ResourceSpecifier::Topic(name)], &self.options())
            .await
            .map_err(|e| AdminError(e.to_string()))?;
        let r = res
            .into_iter()
            .next()
            .ok_or_else(|| AdminError("no answer".into()))?
            .map_err(|e| AdminError(e.to_string()))?;
        Ok(r.entries
            .into_iter()
            .filter_map(|e| Some((e.name, e.value?)))
            .collect())
    }
}

/// What librdkafka's admin calls return: a result per topic inside a request result.
type AdminResults<T> =
    Result<Vec<Result<T, (String, RDKafkaErrorCode)>>, rdkafka::error::KafkaError>;

fn one_result<T>(r: AdminResults<T>, ok_codes: &[RDKafkaErrorCode]) -> Result<(), AdminError> {
    let results = r.map_err(|e| AdminError(e.to_string()))?;
    for r in results {
        if let Err((name, code)) = r {
            if !ok_codes.contains(&code) {
                return Err(AdminError(format!("{name}: {code}")));
            }
        }
    }
    Ok(())
}

impl TopicAdmin for KafkaAdmin {
    fn describe<'a>(
        &'a self,
        names: &'a [String],
    ) -> BoxFuture<'a, Result<BTreeMap<String, i32>, AdminError>> {
        let (admin, timeout) = (self.admin.clone(), self.timeout);
        Box::pin(async move {
            // fetch_metadata blocks for up to the timeout: on an async worker, an unreachable broker would
            // stall every other reconcile (seen: 50 groups on a dead broker held back all relays).
            let md =
                tokio::task::spawn_blocking(move || admin.inner().fetch_metadata(None, timeout))
                    .await
                    .map_err(|e| AdminError(e.to_string()))
                    .and_then(|r| r.map_err(|e| AdminError(e.to_string())));
            let md = self.judged(md).await?;
            Ok(md
                .topics()
                .iter()
                .filter(|t| t.error().is_none() && names.iter().any(|n| n == t.name()))
                .map(|t| (t.name().to_owned(), t.partitions().len() as i32))
                .collect())
        })
    }

    fn create<'a>(&'a self, topic: &'a NewTopicPlan) -> BoxFuture<'a, Result<(), AdminError>> {
        Box::pin(async move {
            let mut t = NewTopic::new(
                &topic.name,
                topic.partitions,
                TopicReplication::Fixed(topic.replication_factor),
            );
            for (k, v) in &topic.config {
                t = t.set(k, v);
            }
            self.judged(one_result(
                self.admin.create_topics([&t], &self.options()).await,
                &[RDKafkaErrorCode::TopicAlreadyExists],
            ))
            .await
        })
    }

    fn grow<'a>(&'a self, name: &'a str, total: i32) -> BoxFuture<'a, Result<(), AdminError>> {
        Box::pin(async move {
            let p = NewPartitions::new(name, total as usize);
            self.judged(one_result(
                self.admin.create_partitions([&p], &self.options()).await,
                &[],
            ))
            .await
        })
    }

    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), AdminError>> {
        Box::pin(async move {
            self.judged(one_result(
                self.admin.delete_topics(&[name], &self.options()).await,
                &[RDKafkaErrorCode::UnknownTopicOrPartition],
            ))
            .await
        })
    }

    fn lag<'a>(
        &'a self,
        group: &'a str,
        topics: &'a [String],
    ) -> BoxFuture<'a, Result<i64, AdminError>> {
        let mut config = self.config.clone();
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false");
        let topics = topics.to_vec();
        let timeout = self.timeout;
        Box::pin(async move {
            let lag = tokio::task::spawn_blocking(move || blocking_lag(config, &topics, timeout))
                .await
                .map_err(|e| AdminError(e.to_string()))
                .and_then(|r| r);
            self.judged(lag).await
        })
    }
}

/// Whether the broker refuses a client with `config`, and how, said for a status message. librdkafka
/// reports a refused login or TLS handshake only as an error event on the client's queue, which an
/// AdminClient does not serve; a short-lived consumer with the same settings connects and reads it.
/// Blocking (up to ~3 s).
fn refusal(config: &ClientConfig) -> Option<String> {
    let consumer: BaseConsumer = config.create().ok()?;
    let _ = consumer.fetch_metadata(None, Duration::from_secs(1));
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let Some(Err(KafkaError::MessageConsumption(code))) =
            consumer.poll(Duration::from_millis(100))
        else {
            continue;
        };
        let what = match code {
            RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed => {
                let mechanism = config.get("sasl.mechanism").unwrap_or("SASL");
                let user = config.get("sasl.username").unwrap_or("?");
                format!("the broker refused the {mechanism} login of user {user:?}")
            }
            RDKafkaErrorCode::SSL => {
                "the TLS handshake failed (certificate refused or not trusted)".to_string()
            }
            _ => continue,
        };
        return Some(format!("{what}: {code}"));
    }
    None
}

/// librdkafka's committed-offset and watermark calls block; run off the async workers.
fn blocking_lag(
    config: ClientConfig,
    topics: &[String],
    timeout: Duration,
) -> Result<i64, AdminError> {
    let err = |e: rdkafka::error::KafkaError| AdminError(e.to_string());
    let consumer: BaseConsumer = config.create().map_err(err)?;
    let md = consumer.fetch_metadata(None, timeout).map_err(err)?;
    let mut tpl = TopicPartitionList::new();
    for t in md
        .topics()
        .iter()
        .filter(|t| topics.iter().any(|n| n == t.name()))
    {
        for p in t.partitions() {
            tpl.add_partition(t.name(), p.id());
        }
    }
    let committed = consumer.committed_offsets(tpl, timeout).map_err(err)?;
    let mut lag = 0;
    for e in committed.elements() {
        let (low, high) = consumer
            .fetch_watermarks(e.topic(), e.partition(), timeout)
            .map_err(err)?;
        let from = match e.offset() {
            Offset::Offset(o) => o,
            _ => low,
        };
        lag += (high - from).max(0);
    }
    Ok(lag)
}
