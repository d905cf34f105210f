-- One worker's cycle, as pgbench runs it, is a variant's claim followed by
-- its completion (bench/schema_ab.sh puts the two files together): claim 100
-- invoices, then complete them, each in a transaction of its own and each
-- appending its audit rows, as the service's CLAIM and COMPLETE_MANY do
-- (src/store/invoices.rs). This claim reads one lane, without the fair-share CTEs, so that schema variants
-- can be compared on the same statement shape. The tokens go to the
-- completion as text arrays, since \gset carries one row.
WITH picked AS (
  SELECT id AS pick_id FROM invoices
  WHERE queue = 'default' AND priority = 0 AND state = 'pending' AND available_at <= now()
    AND serialization_key IS NULL
  ORDER BY available_at, id LIMIT 100 FOR UPDATE SKIP LOCKED),
claimed AS (
  UPDATE invoices SET state = 'leased', attempts = attempts + 1, lease_epoch = lease_epoch + 1,
    lease_nonce = (random() * 9007199254740991)::bigint, leased_by = 'worker-' || :client_id,
    leased_at = now(), lease_expires_at = now() + interval '30 seconds', lease_released = false,
    updated_at = now()
  FROM picked WHERE id = pick_id
  RETURNING *),
logged AS (
  INSERT INTO invoice_events (invoice_id, kind, worker_id, attempt, lease_epoch, lease_nonce)
  SELECT id, 'claimed', leased_by, attempts, lease_epoch, lease_nonce FROM claimed)
SELECT coalesce(array_agg(id), '{}') AS ids, coalesce(array_agg(lease_epoch), '{}') AS eps,
       coalesce(array_agg(lease_nonce), '{}') AS nonces,
       max(length(metadata::text) + length(external_id) + length(customer_id)) AS width
FROM claimed
\gset
