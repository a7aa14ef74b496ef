//! Did every order get exactly one effect per consumer group? Read from the database.

use sqlx::PgPool;

/// Effects per order for one consumer group's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Effects {
    /// Orders with exactly one row.
    pub exactly_once: i64,
    /// Orders with no row yet.
    pub missing: i64,
    /// Orders with more than one row (a duplicate effect: must never happen).
    pub duplicated: i64,
}

/// The ledger of the demo: orders against pharmacy rows and notification rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ledger {
    /// Orders committed.
    pub orders: i64,
    /// `demo.pharmacy_orders` per order.
    pub pharmacy: Effects,
    /// `demo.notifications` per order.
    pub notification: Effects,
}

impl Ledger {
    /// Every order has exactly one effect in each group.
    pub fn complete(&self) -> bool {
        self.pharmacy.exactly_once == self.orders && self.notification.exactly_once == self.orders
    }

    /// No order has two effects in a group.
    pub fn no_duplicates(&self) -> bool {
        self.pharmacy.duplicated == 0 && self.notification.duplicated == 0
    }
}

async fn effects(pool: &PgPool, table: &str) -> Result<Effects, sqlx::Error> {
    let (exactly_once, missing, duplicated): (i64, i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*) FILTER (WHERE n = 1), count(*) FILTER (WHERE n = 0), count(*) FILTER (WHERE n > 1) \
         FROM (SELECT o.id, (SELECT count(*) FROM {table} e WHERE e.order_id = o.id) AS n FROM shop.orders o) x"
    ))
    .fetch_one(pool)
    .await?;
    Ok(Effects {
        exactly_once,
        missing,
        duplicated,
    })
}

/// Reads the ledger now.
pub async fn ledger(pool: &PgPool) -> Result<Ledger, sqlx::Error> {
    Ok(Ledger {
        orders: sqlx::query_scalar("SELECT count(*) FROM shop.orders")
            .fetch_one(pool)
            .await?,
        pharmacy: effects(pool, "demo.pharmacy_orders").await?,
        notification: effects(pool, "demo.notifications").await?,
    })
}

/// Effects whose order does not exist (e.g. from a poison message): must stay zero.
pub async fn orphan_effects(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM demo.pharmacy_orders p WHERE NOT EXISTS (SELECT 1 FROM shop.orders o WHERE o.id = p.order_id)) \
              + (SELECT count(*) FROM demo.notifications n WHERE NOT EXISTS (SELECT 1 FROM shop.orders o WHERE o.id = n.order_id))",
    )
    .fetch_one(pool)
    .await
}

/// End-to-end latency (order commit → effect commit) percentiles in milliseconds, over both groups.
pub async fn latency_ms(pool: &PgPool, percentiles: &[f64]) -> Result<Vec<f64>, sqlx::Error> {
    let mut out = Vec::new();
    for p in percentiles {
        let v: Option<f64> = sqlx::query_scalar(
            "SELECT percentile_cont($1) WITHIN GROUP (ORDER BY ms) FROM ( \
               SELECT extract(epoch FROM p.received_at - o.created_at) * 1000 AS ms \
                 FROM demo.pharmacy_orders p JOIN shop.orders o ON o.id = p.order_id \
               UNION ALL \
               SELECT extract(epoch FROM n.sent_at - o.created_at) * 1000 \
                 FROM demo.notifications n JOIN shop.orders o ON o.id = n.order_id) x",
        )
        .bind(p)
        .fetch_one(pool)
        .await?;
        out.push(v.unwrap_or(f64::NAN));
    }
    Ok(out)
}

/// The orders topic checked against every event the outbox wrote (delivered, pending or dead), in id
/// order: the load's writers post each customer's orders one after another, so a key's ids are its commit
/// order.
pub async fn topic_history(
    pool: &PgPool,
    bootstrap: &str,
) -> anyhow::Result<test_support::history::Report> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT key, event_id::text FROM (SELECT id, key, event_id, topic FROM outbox.archive \
           UNION ALL SELECT id, key, event_id, topic FROM outbox.events \
           UNION ALL SELECT id, key, event_id, topic FROM outbox.dead) t WHERE topic = $1 ORDER BY id",
    )
    .bind(crate::stack::ORDERS_TOPIC)
    .fetch_all(pool)
    .await?;
    let written = test_support::history::Written::from_rows(rows);
    let bootstrap = bootstrap.to_owned();
    let records = tokio::task::spawn_blocking(move || {
        test_support::kafka::read_topic(&bootstrap, crate::stack::ORDERS_TOPIC)
    })
    .await??;
    Ok(test_support::history::check(&records, &written))
}
