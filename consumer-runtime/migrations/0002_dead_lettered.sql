-- A record sent to the DLQ leaves its inbox row too, so a later copy of the event (a relay duplicate, a
-- replay) is skipped like any processed one: one event id reaches a group's handler at most once.
ALTER TABLE inbox ADD COLUMN outcome text NOT NULL DEFAULT 'handled'
    CHECK (outcome IN ('handled', 'dead_lettered'));
