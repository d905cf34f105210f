-- current.complete.sql over the narrow leases table of narrow.setup.sql. A
-- lease row lives until its invoice completes, so the completion needs no
-- state test; with one, the generic plan walked the expiry index instead of
-- probing the primary key.
WITH done AS (
  DELETE FROM leases
  USING unnest(:ids::bigint[], :eps::integer[], :nonces::bigint[]) AS c(c_id, c_epoch, c_nonce)
  WHERE invoice_id = c_id AND lease_epoch = c_epoch AND lease_nonce = c_nonce
    AND NOT lease_released
  RETURNING leases.*),
completed AS (
  UPDATE invoices SET state = 'completed', completed_at = now(), finished_at = now(),
    completed_by = d.leased_by, provider_reference = NULL, updated_at = now(),
    lease_epoch = d.lease_epoch, lease_nonce = d.lease_nonce, attempts = d.attempts,
    leased_by = d.leased_by
  FROM done d WHERE id = d.invoice_id
  RETURNING invoices.*),
logged AS (
  INSERT INTO invoice_events (invoice_id, kind, worker_id, attempt, lease_epoch, lease_nonce,
                              detail)
  SELECT id, 'completed', completed_by, attempts, lease_epoch, lease_nonce, provider_reference
  FROM completed)
SELECT count(*) FROM completed;
