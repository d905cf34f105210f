\ir current.fill.sql
TRUNCATE invoice_event_batches;
VACUUM ANALYZE invoice_event_batches;
CHECKPOINT;
