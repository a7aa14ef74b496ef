//! The demo consumers of seed 003: a pharmacy and a notification service, two consumer groups reading
//! the same `OrderCreated` events, each writing its effect through the runtime (so each order has exactly
//! one effect per group, whatever Kafka redelivers).

use outbox::SchemaName;
use serde::Deserialize;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use consumer_runtime::{Handler, HandlerError, Message};

/// Schema of the demo consumers' tables.
pub const SCHEMA: &str = "demo";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./demo-migrations");

/// Creates `demo.pharmacy_orders` and `demo.notifications`. Idempotent.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    let schema = SchemaName::new(SCHEMA).expect("valid schema name");
    outbox::migrate_schema(pool, &schema, &MIGRATOR).await
}

/// Which demo service this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Writes a `pharmacy_orders` row per order (group `pharmacy`).
    Pharmacy,
    /// Writes a `notifications` row per order (group `notification`).
    Notification,
}

impl Role {
    /// The consumer group of this role.
    pub fn group_id(self) -> &'static str {
        match self {
            Role::Pharmacy => "pharmacy",
            Role::Notification => "notification",
        }
    }
}

/// The `OrderCreated` payload written by `demo-api`.
#[derive(Debug, Clone, Deserialize)]
pub struct OrderCreated {
    /// Order id.
    pub order_id: Uuid,
    /// Customer name.
    pub customer: String,
    /// Ordered items.
    pub items: serde_json::Value,
}

/// The handler of a demo role.
#[derive(Debug, Clone, Copy)]
pub struct DemoHandler(pub Role);

/// Events other than `OrderCreated` are ignored (recorded in the inbox, no effect); an `OrderCreated`
/// whose payload does not parse is a permanent failure and goes to the DLQ.
pub fn parse(msg: &Message) -> Result<Option<OrderCreated>, HandlerError> {
    if msg.event_type() != Some("OrderCreated") {
        return Ok(None);
    }
    msg.json::<OrderCreated>()
        .map(Some)
        .map_err(|e| HandlerError::Permanent(format!("OrderCreated payload: {e}")))
}

fn db(e: sqlx::Error) -> HandlerError {
    HandlerError::Retriable(e.to_string())
}

impl Handler for DemoHandler {
    async fn handle(
        &self,
        msg: &Message,
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        let Some(order) = parse(msg)? else {
            return Ok(());
        };
        match self.0 {
            Role::Pharmacy => sqlx::query(
                "INSERT INTO demo.pharmacy_orders (order_id, event_id, customer, items) VALUES ($1, $2, $3, $4)",
            )
            .bind(order.order_id)
            .bind(msg.event_id)
            .bind(&order.customer)
            .bind(&order.items),
            Role::Notification => sqlx::query(
                "INSERT INTO demo.notifications (order_id, event_id, recipient, message) VALUES ($1, $2, $3, $4)",
            )
            .bind(order.order_id)
            .bind(msg.event_id)
            .bind(&order.customer)
            .bind(format!("Your order {} was received", order.order_id)),
        }
        .execute(&mut **tx)
        .await
        .map_err(db)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn msg(event_type: Option<&str>, payload: &str) -> Message {
        let mut headers = BTreeMap::new();
        if let Some(t) = event_type {
            headers.insert("event_type".to_owned(), t.to_owned());
        }
        Message {
            event_id: Uuid::now_v7(),
            topic: "orders".into(),
            key: None,
            payload: payload.as_bytes().to_vec(),
            headers,
            partition: 0,
            offset: 0,
        }
    }

    #[test]
    fn order_created_parses_and_bad_payloads_are_permanent() {
        let id = Uuid::now_v7();
        let ok = msg(
            Some("OrderCreated"),
            &format!(r#"{{"order_id":"{id}","customer":"ann","items":[]}}"#),
        );
        assert_eq!(parse(&ok).unwrap().unwrap().order_id, id);
        assert!(parse(&msg(Some("Other"), "garbage")).unwrap().is_none());
        assert!(parse(&msg(None, "garbage")).unwrap().is_none());
        let e = parse(&msg(Some("OrderCreated"), r#"{"poison":true}"#)).unwrap_err();
        assert!(
            matches!(&e, HandlerError::Permanent(m) if m.contains("missing field `order_id`")),
            "{e:?}"
        );
    }
}
