-- Completes the invoices current.claim.sql (or a variant's claim) leased.
WITH completed AS (
  UPDATE invoices SET state = 'completed', completed_at = now(), finished_at = now(),
    completed_by = leased_by, provider_reference = NULL, lease_expires_at = NULL,
    cancel_requested = false, updated_at = now()
  FROM unnest(:ids::bigint[], :eps::integer[], :nonces::bigint[]) AS c(c_id, c_epoch, c_nonce)
  WHERE id = c_id AND lease_epoch = c_epoch AND lease_nonce = c_nonce
    AND NOT lease_released AND state <> 'completed'
  RETURNING *),
logged AS (
  INSERT INTO invoice_events (invoice_id, kind, worker_id, attempt, lease_epoch, lease_nonce,
                              detail)
  SELECT id, 'completed', completed_by, attempts, lease_epoch, lease_nonce, provider_reference
  FROM completed)
SELECT count(*) FROM completed;
