-- Head-of-key check of the claim: any earlier pending row of a key can hold it back (late commits,
-- redriven rows, rows in flight, rows in backoff), whatever its attempts, so the index covers every row.
CREATE INDEX events_key_idx ON events (topic, key, id);
DROP INDEX events_retrying_key_idx;

-- The dead row is the record of truth and commits with its batch; its copy to `<topic>.dlq` is sent
-- afterwards, outside the claim transaction, and this flag clears once the broker acknowledged it.
ALTER TABLE dead ADD COLUMN dlq_due boolean NOT NULL DEFAULT false;
CREATE INDEX dead_dlq_due_idx ON dead (id) WHERE dlq_due;
