-- The audit trail as one row per statement instead of one per invoice: the
-- claim's or the completion's invoices in arrays, found per invoice through
-- a GIN index, whose pending list takes a whole row's keys in one append.
CREATE TABLE invoice_event_batches (
  at          timestamptz NOT NULL DEFAULT clock_timestamp(),
  kind        invoice_event_kind NOT NULL,
  invoice_ids bigint[] NOT NULL,
  worker_ids  text[] NOT NULL,
  attempts    integer[] NOT NULL,
  epochs      integer[] NOT NULL,
  nonces      bigint[] NOT NULL,
  details     text[]
);
CREATE INDEX invoice_event_batches_by_invoice ON invoice_event_batches USING gin (invoice_ids);
CREATE INDEX invoice_event_batches_at ON invoice_event_batches USING brin (at);
