-- The lease columns in a table of their own. Claims update a leases row and
-- join the invoice for their answer; a completion deletes the leases row and
-- updates the invoice, which no index covers any more beyond its primary
-- key, so that update can be HOT.
DROP INDEX invoices_queue_claim_order, invoices_lease_expiry, invoices_one_lease_per_key,
           invoices_dead_letters;
ALTER TABLE invoices DROP CONSTRAINT leased_iff_lease_expires_at,
  DROP CONSTRAINT leased_has_holder, DROP CONSTRAINT epoch_counts_claims,
  DROP CONSTRAINT attempts_within_budget, DROP CONSTRAINT cancel_requested_only_while_leased;
CREATE TABLE leases (
  invoice_id bigint PRIMARY KEY, queue text NOT NULL, priority smallint NOT NULL,
  available_at timestamptz NOT NULL, state invoice_state NOT NULL DEFAULT 'pending',
  attempts int NOT NULL DEFAULT 0, max_attempts int NOT NULL,
  lease_epoch int NOT NULL DEFAULT 0, lease_nonce bigint, leased_by text,
  leased_at timestamptz, lease_expires_at timestamptz,
  lease_released boolean NOT NULL DEFAULT false,
  cancel_requested boolean NOT NULL DEFAULT false, serialization_key text,
  CONSTRAINT leased_iff_lease_expires_at
    CHECK ((state = 'leased') = (lease_expires_at IS NOT NULL)),
  CONSTRAINT leased_has_holder
    CHECK (state <> 'leased' OR (leased_by IS NOT NULL AND leased_at IS NOT NULL
                                 AND lease_nonce IS NOT NULL AND NOT lease_released)),
  CONSTRAINT attempts_within_budget CHECK (attempts >= 0 AND attempts <= max_attempts),
  CONSTRAINT epoch_counts_claims CHECK (lease_epoch >= attempts)
) WITH (fillfactor = 50);
CREATE INDEX leases_claim_order ON leases (queue, priority, available_at, invoice_id)
  WHERE state = 'pending';
CREATE INDEX leases_expiry ON leases (lease_expires_at) WHERE state = 'leased';
