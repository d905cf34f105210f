-- current.complete.sql without the audit rows.
WITH completed AS (
  UPDATE invoices SET state = 'completed', completed_at = now(), finished_at = now(),
    completed_by = leased_by, provider_reference = NULL, lease_expires_at = NULL,
    cancel_requested = false, updated_at = now()
  FROM unnest(:ids::bigint[], :eps::integer[], :nonces::bigint[]) AS c(c_id, c_epoch, c_nonce)
  WHERE id = c_id AND lease_epoch = c_epoch AND lease_nonce = c_nonce
    AND NOT lease_released AND state <> 'completed'
  RETURNING *)
SELECT count(*) FROM completed;
