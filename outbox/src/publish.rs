use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::{schema::SchemaName, trace::capture_traceparent, validate, Error, NewEvent};

/// Default payload limit: leaves room for key and headers under librdkafka's 1,000,000-byte
/// `message.max.bytes`, so an accepted event can also be produced with default settings.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 900 * 1024;

/// The writer side of one outbox schema.
#[derive(Debug, Clone)]
pub struct Outbox {
    schema: SchemaName,
    max_payload_bytes: usize,
    insert_sql: String,
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new(SchemaName::default())
    }
}

impl Outbox {
    /// An outbox in `schema` with the default payload limit.
    pub fn new(schema: SchemaName) -> Self {
        let insert_sql = format!(
            "INSERT INTO {} (event_id, topic, key, payload, headers, event_type, aggregate_type, aggregate_id) \
             SELECT e, t, k, p, h, ty, at, ai FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bytea[], \
             $5::jsonb[], $6::text[], $7::text[], $8::text[]) WITH ORDINALITY AS u(e, t, k, p, h, ty, at, ai, n) \
             ORDER BY n",
            schema.table("events")
        );
        Self {
            schema,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            insert_sql,
        }
    }

    /// Sets the payload limit checked before insert.
    pub fn with_max_payload_bytes(mut self, max: usize) -> Self {
        self.max_payload_bytes = max;
        self
    }

    /// The schema this outbox writes to.
    pub fn schema(&self) -> &SchemaName {
        &self.schema
    }

    /// Validates and writes one event in the caller's transaction; returns its `event_id`.
    pub async fn publish(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        event: NewEvent,
    ) -> Result<Uuid, Error> {
        let ids = self.publish_all(tx, vec![event]).await?;
        Ok(ids[0])
    }

    /// Validates every event, then writes them all with one statement in the caller's transaction, in
    /// order. Nothing is written when any event is invalid. Returns the `event_id`s in input order.
    pub async fn publish_all(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        events: Vec<NewEvent>,
    ) -> Result<Vec<Uuid>, Error> {
        for ev in &events {
            validate::event(ev, self.max_payload_bytes)?;
        }
        let n = events.len();
        let (mut ids, mut topics, mut keys, mut payloads, mut headers) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut types, mut agg_types, mut agg_ids) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for mut ev in events {
            capture_traceparent(&mut ev.headers);
            ids.push(Uuid::now_v7());
            topics.push(ev.topic);
            keys.push(ev.key);
            payloads.push(ev.payload);
            headers.push(serde_json::to_value(&ev.headers)?);
            types.push(ev.event_type);
            agg_types.push(ev.aggregate_type);
            agg_ids.push(ev.aggregate_id);
        }
        if n > 0 {
            sqlx::query(&self.insert_sql)
                .bind(&ids)
                .bind(topics)
                .bind(keys)
                .bind(payloads)
                .bind(headers)
                .bind(types)
                .bind(agg_types)
                .bind(agg_ids)
                .execute(&mut **tx)
                .await?;
        }
        Ok(ids)
    }
}

/// [`Outbox::publish`] on the default schema with default limits.
pub async fn publish(tx: &mut Transaction<'_, Postgres>, event: NewEvent) -> Result<Uuid, Error> {
    Outbox::default().publish(tx, event).await
}

/// [`Outbox::publish_all`] on the default schema with default limits.
pub async fn publish_all(
    tx: &mut Transaction<'_, Postgres>,
    events: Vec<NewEvent>,
) -> Result<Vec<Uuid>, Error> {
    Outbox::default().publish_all(tx, events).await
}
