//! The relay against tansu, an independent Kafka-protocol implementation (topic created by the admin API).

mod common;

use common::*;
use test_support::kafka::Tansu;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_delivers_in_key_order_to_tansu() {
    let broker = Tansu::start().expect("tansu is installed by `make setup`");
    broker.create_topic(TOPIC, 4).await.unwrap();
    let db = migrated_db().await;
    insert_events(&db.pool, 10, 1_000, 0).await;
    let r = in_process(&db.pool, config(), kafka(broker.bootstrap()));
    assert_eq!(drain(&r.relay).await, 1_000);
    let ledger = check_order(&read(&broker.bootstrap(), TOPIC));
    assert_eq!((ledger.distinct, ledger.duplicates), (1_000, 0));
}
