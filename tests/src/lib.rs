//! The whole pipeline on one machine, started as real processes: a throwaway PostgreSQL (or
//! `DATABASE_URL`), an in-process librdkafka mock cluster (or `KAFKA_BOOTSTRAP`), the relay, two pharmacy
//! consumers, one notification consumer and the demo API. `make demo` runs it through `outbox-demo`;
//! the end-to-end tests drive the same [`stack::Stack`].

pub mod bins;
pub mod chaos;
pub mod ledger;
pub mod load;
pub mod proc;
pub mod soak;
pub mod stack;
