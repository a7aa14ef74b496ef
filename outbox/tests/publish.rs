//! The writer side against a real PostgreSQL server.

use outbox::{NewEvent, Outbox, SchemaName};
use sqlx::PgPool;

async fn db() -> PgPool {
    let db = test_support::pg::fresh_db().await;
    outbox::migrate(&db.pool, "outbox").await.unwrap();
    db.pool
}

async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn event_commits_and_rolls_back_with_the_business_transaction() {
    let pool = db().await;
    sqlx::query("CREATE TABLE orders (id int PRIMARY KEY)")
        .execute(&pool)
        .await
        .unwrap();

    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO orders VALUES (1)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let id = outbox::publish(
        &mut tx,
        NewEvent::new("orders", "1").payload(b"one".to_vec()),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(id.get_version_num(), 7, "event ids are UUID v7");

    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO orders VALUES (2)")
        .execute(&mut *tx)
        .await
        .unwrap();
    outbox::publish(&mut tx, NewEvent::new("orders", "2"))
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    assert_eq!(count(&pool, "orders").await, 1);
    let stored: (uuid::Uuid, String, Vec<u8>) =
        sqlx::query_as("SELECT event_id, key, payload FROM outbox.events")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(stored, (id, "1".into(), b"one".to_vec()));
}

#[tokio::test]
async fn publish_all_writes_in_order_with_every_field() {
    let pool = db().await;
    let events: Vec<_> = (0..50)
        .map(|i| {
            NewEvent::new("orders", format!("k{}", i % 3))
                .json(&serde_json::json!({ "seq": i }))
                .unwrap()
                .header("x-tenant", "acme")
                .event_type("OrderCreated")
                .aggregate("order", i.to_string())
        })
        .collect();
    let mut tx = pool.begin().await.unwrap();
    let ids = outbox::publish_all(&mut tx, events).await.unwrap();
    tx.commit().await.unwrap();

    type Row = (
        i64,
        uuid::Uuid,
        serde_json::Value,
        serde_json::Value,
        Option<String>,
        Option<String>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, event_id, convert_from(payload, 'UTF8')::jsonb, headers, event_type, aggregate_id FROM outbox.events ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 50);
    for (i, (_, event_id, payload, headers, ty, agg)) in rows.iter().enumerate() {
        assert_eq!(*event_id, ids[i], "id order follows input order");
        assert_eq!(payload["seq"], i);
        assert_eq!(headers["x-tenant"], "acme");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(ty.as_deref(), Some("OrderCreated"));
        assert_eq!(agg.as_deref(), Some(i.to_string().as_str()));
    }
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, ids, "UUID v7 ids are time-ordered");
}

#[tokio::test]
async fn every_invalid_field_is_named_and_nothing_is_inserted() {
    let pool = db().await;
    let outbox = Outbox::default().with_max_payload_bytes(100);
    let good = || NewEvent::new("orders", "k");
    let cases = [
        (NewEvent::new("", "k"), "topic"),
        (NewEvent::new("bad topic", "k"), "topic"),
        (NewEvent::new("t".repeat(250), "k"), "topic"),
        (NewEvent::new("orders", ""), "key"),
        (good().payload(vec![0; 101]), "payload"),
        (good().header("", "v"), "headers"),
        (good().header("bad name", "v"), "headers.bad name"),
        (good().header("x", "nul\0"), "headers.x"),
        (good().event_type(""), "event_type"),
    ];
    for (bad, field) in cases {
        let mut tx = pool.begin().await.unwrap();
        // A valid event first: the whole batch must be refused, not half-written.
        let err = outbox
            .publish_all(&mut tx, vec![good(), bad])
            .await
            .unwrap_err();
        match err {
            outbox::Error::Invalid(v) => assert_eq!(v.field, field, "{v}"),
            other => panic!("expected a validation error for {field}, got {other}"),
        }
        tx.commit().await.unwrap();
    }
    assert_eq!(count(&pool, "outbox.events").await, 0);
}

#[tokio::test]
async fn traceparent_of_the_active_span_is_captured() {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;

    let pool = db().await;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let span = tracing::info_span!("place_order");
    let mut tx = pool.begin().await.unwrap();
    {
        let _entered = span.enter();
        outbox::publish(&mut tx, NewEvent::new("orders", "traced"))
            .await
            .unwrap();
    }
    outbox::publish(&mut tx, NewEvent::new("orders", "untraced"))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let rows: Vec<(String, serde_json::Value)> =
        sqlx::query_as("SELECT key, headers FROM outbox.events ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let tp = rows[0].1["traceparent"]
        .as_str()
        .expect("traceparent captured inside the span");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(
        (parts.len(), parts[0], parts[1].len(), parts[2].len()),
        (4, "00", 32, 16),
        "{tp}"
    );
    assert!(
        rows[1].1.get("traceparent").is_none(),
        "no span, no traceparent"
    );
}

#[tokio::test]
async fn custom_schema_and_idempotent_migrations() {
    let db = test_support::pg::fresh_db().await;
    outbox::migrate(&db.pool, "tenant_a").await.unwrap();
    outbox::migrate(&db.pool, "tenant_a").await.unwrap();
    let schema = SchemaName::new("tenant_a").unwrap();
    outbox::install_notify_trigger(&db.pool, &schema)
        .await
        .unwrap();
    outbox::install_notify_trigger(&db.pool, &schema)
        .await
        .unwrap();
    let outbox = Outbox::new(schema);
    let mut tx = db.pool.begin().await.unwrap();
    outbox
        .publish(&mut tx, NewEvent::new("t", "k"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(count(&db.pool, "tenant_a.events").await, 1);
    let err = outbox::migrate(&db.pool, "Bad-Name").await.unwrap_err();
    assert!(err.to_string().contains("field `schema`"), "{err}");
}

/// Relays of one Deployment start together and each installs the trigger: found by the chaos soak, where the
/// second relay exited with "trigger events_notify already exists".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_starting_together_install_the_notify_trigger_without_conflict() {
    for _ in 0..5 {
        let pool = db().await;
        let schema = SchemaName::new("outbox").unwrap();
        let installs = (0..8).map(|_| {
            let (pool, schema) = (pool.clone(), schema.clone());
            tokio::spawn(async move { outbox::install_notify_trigger(&pool, &schema).await })
        });
        for r in futures::future::join_all(installs).await {
            r.unwrap().expect("a concurrent install succeeds");
        }
        let triggers: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'events_notify' AND tgrelid = 'outbox.events'::regclass",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(triggers, 1);
    }
}

/// A relay restarting while writers are busy must not take a table lock on `events`: the soak saw such an
/// install deadlock with running claims. An installed trigger is left alone, so an open writer transaction
/// does not hold the install up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installed_trigger_is_left_alone_while_writers_hold_the_table() {
    let pool = db().await;
    let schema = SchemaName::new("outbox").unwrap();
    outbox::install_notify_trigger(&pool, &schema)
        .await
        .unwrap();
    let mut writer = pool.begin().await.unwrap();
    Outbox::new(schema.clone())
        .publish(&mut writer, NewEvent::new("t", "k"))
        .await
        .unwrap();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        outbox::install_notify_trigger(&pool, &schema),
    )
    .await
    .expect("the install waits for no writer")
    .unwrap();
    writer.commit().await.unwrap();
}
