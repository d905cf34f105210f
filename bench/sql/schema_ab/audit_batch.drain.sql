-- current.drain.sql with the audit rows of audit_batch.setup.sql: one per
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
WITH completed AS (
  UPDATE invoices SET state = 'completed', completed_at = now(), finished_at = now(),
    completed_by = leased_by, provider_reference = NULL, lease_expires_at = NULL,
    cancel_requested = false, updated_at = now()
  FROM unnest(:ids::bigint[], :eps::integer[], :nonces::bigint[]) AS c(c_id, c_epoch, c_nonce)
  WHERE id = c_id AND lease_epoch = c_epoch AND lease_nonce = c_nonce
    AND NOT lease_released AND state <> 'completed'
  RETURNING *),
logged AS (
  INSERT INTO invoice_event_batches (kind, invoice_ids, worker_ids, attempts, epochs, nonces,
                                     details)
  SELECT 'completed', array_agg(id), array_agg(completed_by), array_agg(attempts),
         array_agg(lease_epoch), array_agg(lease_nonce), array_agg(provider_reference)
  FROM completed HAVING count(*) > 0)
SELECT count(*) FROM completed;
