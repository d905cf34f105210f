-- An invoice's trail found through a BRIN index instead of a B-tree: next to
-- nothing per insert, but a read scans whole block ranges.
DROP INDEX invoice_events_by_invoice;
CREATE INDEX invoice_events_by_invoice ON invoice_events
  USING brin (invoice_id int8_minmax_multi_ops) WITH (pages_per_range = 16);
