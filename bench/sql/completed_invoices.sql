-- :n completed invoices, as a long-lived deployment accumulates them: billed
-- once by one worker over the past 30 days, spread over 10,000 customers.
-- Written in one statement straight into the table for the scale benchmark
-- (bench/run.sh); their audit events are left out, since the pruner keeps
-- that table to its retention window anyway. The insert trigger enters them
-- in the customer and external-id tables too. Ends with the VACUUM ANALYZE
-- that tables of that age would long have had: the side tables included,
-- or autovacuum reads their 10 million rows each while the drains run.
INSERT INTO invoices (external_id, queue, customer_id, amount_minor, currency, priority,
                      state, available_at, attempts, max_attempts, lease_epoch, lease_nonce,
                      leased_by, leased_at, completed_at, completed_by, finished_at,
                      created_at, updated_at)
SELECT 'scale-' || i, 'default', 'cus-' || (i % 10000), 1000, 'EUR', 0,
       'completed', at, 1, 5, 1, i, 'worker-' || (i % 32), at, at, 'worker-' || (i % 32), at,
       at, at
FROM generate_series(1, :n) AS i,
     LATERAL (SELECT now() - interval '30 days' + (i * interval '30 days') / :n AS at) t;
VACUUM ANALYZE invoices, invoice_customers, invoice_external_ids;
CHECKPOINT;
