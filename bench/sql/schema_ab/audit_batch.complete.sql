-- current.complete.sql with the audit rows of audit_batch.setup.sql: one per
-- statement.
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
