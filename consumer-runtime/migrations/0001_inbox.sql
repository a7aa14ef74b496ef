-- Runs with search_path set to the inbox schema (see inbox.rs).
-- One row per (consumer group, event): written in the handler's transaction, so it is both the
-- deduplication key and the delivery receipt.
CREATE TABLE inbox (
    group_id     text        NOT NULL,
    event_id     uuid        NOT NULL,
    topic        text        NOT NULL,
    "partition"  integer     NOT NULL,
    "offset"     bigint      NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, event_id)
);
-- Retention deletes oldest first; receipts look up by event.
CREATE INDEX inbox_processed_at_idx ON inbox (processed_at);
CREATE INDEX inbox_event_id_idx ON inbox (event_id);
