-- Effects of the demo consumers. No unique constraint on order_id on purpose: a duplicate effect would
-- show up as a second row, and the end-to-end ledger checks there is exactly one per order.
CREATE TABLE pharmacy_orders (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id    uuid        NOT NULL,
    event_id    uuid        NOT NULL,
    customer    text        NOT NULL,
    items       jsonb       NOT NULL,
    received_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX pharmacy_orders_order ON pharmacy_orders (order_id);

CREATE TABLE notifications (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id   uuid        NOT NULL,
    event_id   uuid        NOT NULL,
    recipient  text        NOT NULL,
    message    text        NOT NULL,
    sent_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX notifications_order ON notifications (order_id);
