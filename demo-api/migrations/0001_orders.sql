-- Runs with search_path set to the shop schema.
CREATE TABLE orders (
    id         uuid        PRIMARY KEY,
    customer   text        NOT NULL,
    items      jsonb       NOT NULL,
    -- The OrderCreated event written in the same transaction (its delivery receipt: GET /events/{id}).
    event_id   uuid        NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
