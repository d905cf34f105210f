-- current.claim.sql over the narrow leases table of narrow.setup.sql.
WITH picked AS (
  SELECT invoice_id AS pick_id FROM leases
  WHERE queue = 'default' AND priority = 0 AND state = 'pending' AND available_at <= now()
    AND serialization_key IS NULL
  ORDER BY available_at, invoice_id LIMIT 100 FOR UPDATE SKIP LOCKED),
claimed AS (
  UPDATE leases SET state = 'leased', attempts = attempts + 1, lease_epoch = lease_epoch + 1,
    lease_nonce = (random() * 9007199254740991)::bigint, leased_by = 'worker-' || :client_id,
    leased_at = now(), lease_expires_at = now() + interval '30 seconds', lease_released = false
  FROM picked WHERE invoice_id = pick_id
  RETURNING leases.*),
logged AS (
  INSERT INTO invoice_events (invoice_id, kind, worker_id, attempt, lease_epoch, lease_nonce)
  SELECT invoice_id, 'claimed', leased_by, attempts, lease_epoch, lease_nonce FROM claimed),
answered AS (
  SELECT i.*, c.lease_epoch AS epoch, c.lease_nonce AS nonce
  FROM claimed c JOIN invoices i ON i.id = c.invoice_id)
SELECT coalesce(array_agg(id), '{}') AS ids, coalesce(array_agg(epoch), '{}') AS eps,
       coalesce(array_agg(nonce), '{}') AS nonces,
       max(length(metadata::text) + length(external_id) + length(customer_id)) AS width
FROM answered
\gset
