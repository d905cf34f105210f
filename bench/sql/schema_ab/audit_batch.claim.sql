-- current.claim.sql with the audit rows of audit_batch.setup.sql: one per
-- statement.
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
  INSERT INTO invoice_event_batches (kind, invoice_ids, worker_ids, attempts, epochs, nonces)
  SELECT 'claimed', array_agg(id), array_agg(leased_by), array_agg(attempts),
         array_agg(lease_epoch), array_agg(lease_nonce)
  FROM claimed HAVING count(*) > 0)
SELECT coalesce(array_agg(id), '{}') AS ids, coalesce(array_agg(lease_epoch), '{}') AS eps,
       coalesce(array_agg(lease_nonce), '{}') AS nonces,
       max(length(metadata::text) + length(external_id) + length(customer_id)) AS width
FROM claimed
\gset
