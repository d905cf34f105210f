TRUNCATE invoices, invoice_events, invoice_customers, invoice_external_ids, leases;
INSERT INTO invoices (external_id, queue, customer_id, amount_minor, currency, priority,
                      available_at, max_attempts)
SELECT 'load-' || g, 'default', 'cus-' || (g % 10000), 1000, 'EUR', 0,
       now() - interval '1 minute', 5
FROM generate_series(1, :rows) g ORDER BY 'load-' || g;
INSERT INTO leases (invoice_id, queue, priority, available_at, max_attempts)
SELECT id, queue, priority, available_at, max_attempts FROM invoices ORDER BY id;
INSERT INTO invoice_events (invoice_id, kind) SELECT id, 'submitted' FROM invoices;
VACUUM ANALYZE invoices;
VACUUM ANALYZE leases;
VACUUM ANALYZE invoice_events;
VACUUM ANALYZE invoice_customers;
VACUUM ANALYZE invoice_external_ids;
CHECKPOINT;
