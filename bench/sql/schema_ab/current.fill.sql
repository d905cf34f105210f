-- :rows pending invoices in the service's own schema, settled as every
-- drain of bench/run.sh is (VACUUM ANALYZE, then CHECKPOINT).
TRUNCATE invoices, invoice_events, invoice_customers, invoice_external_ids;
INSERT INTO invoices (external_id, queue, customer_id, amount_minor, currency, priority,
                      available_at, max_attempts)
SELECT 'load-' || g, 'default', 'cus-' || (g % 10000), 1000, 'EUR', 0,
       now() - interval '1 minute', 5
FROM generate_series(1, :rows) g ORDER BY 'load-' || g;
INSERT INTO invoice_events (invoice_id, kind) SELECT id, 'submitted' FROM invoices;
VACUUM ANALYZE invoices;
VACUUM ANALYZE invoice_events;
VACUUM ANALYZE invoice_customers;
VACUUM ANALYZE invoice_external_ids;
CHECKPOINT;
