//! What the runtime tests of this crate share: a handler that records each event, its database, and
//! records with an `event_id` header.

use std::time::Duration;

use consumer_runtime::{Handler, HandlerError, Message};
use outbox::SchemaName;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use sqlx::{Postgres, Transaction};

/// Records each event it handles in `effects`.
pub struct Record;

impl Handler for Record {
    async fn handle(
        &self,
        msg: &Message,
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO effects (event_id) VALUES ($1)")
            .bind(msg.event_id)
            .execute(&mut **tx)
            .await
            .map_err(|e| HandlerError::Retriable(e.to_string()))?;
        Ok(())
    }
}

/// A fresh database with the inbox (schema `inbox`) and the `effects` table [`Record`] writes.
pub async fn effects_db() -> test_support::pg::TestDb {
    let db = test_support::pg::fresh_db().await;
    consumer_runtime::inbox::migrate(&db.pool, &SchemaName::new("inbox").unwrap())
        .await
        .unwrap();
    sqlx::query("CREATE TABLE effects (event_id uuid NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    db
}

/// Produces one record per key to `topic`, each with a fresh `event_id` header.
pub async fn produce_events(bootstrap: &str, topic: &str, keys: &[&str]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    for key in keys {
        let id = uuid::Uuid::now_v7().to_string();
        let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: "event_id",
            value: Some(id.as_bytes()),
        });
        producer
            .send(
                FutureRecord::to(topic)
                    .key(*key)
                    .payload("x")
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
}
