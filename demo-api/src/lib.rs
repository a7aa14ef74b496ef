//! The demo order API (seeds 001–003): `POST /orders` writes an order and its `OrderCreated` event in one
//! transaction; `POST /messages` publishes any event; `GET /events/{event_id}` is its delivery receipt.

pub mod api;
pub mod cli;
pub mod metrics;
pub mod orders;
pub mod receipts;
