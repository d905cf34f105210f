-- Every claim and every completion appends an audit row, and each index on
-- invoice_events costs one more B-tree insertion, and its WAL, per event.
-- The trail is read per invoice, through invoice_events_by_invoice, and
-- pruned by age, through the BRIN index on `at`; nothing looks an event up by
-- its id alone, and the identity column keeps ids unique without an index.
-- The pruner finds its rows by ctid instead of by id.
ALTER TABLE invoice_events DROP CONSTRAINT invoice_events_pkey;
