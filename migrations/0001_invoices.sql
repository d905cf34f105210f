-- The invoice table: one row per invoice, and the lease on it lives in the row.
--
-- A lease is granted by bumping lease_epoch and drawing a fresh lease_nonce;
-- the token a worker holds is (id, lease_epoch, lease_nonce). Every write a
-- worker makes is fenced by that triple, so a worker whose lease was taken
-- back can no longer change the invoice. The row can only hold one lease at a
-- time, which is how the database enforces "at most one live lease per
-- invoice"; the CHECK constraints below keep the lease columns coherent with
-- the state.
CREATE TABLE invoices (
    id                 bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    external_id        text        NOT NULL,
    queue              text        NOT NULL,
    customer_id        text        NOT NULL,
    amount_minor       bigint      NOT NULL,
    currency           text        NOT NULL,
    priority           smallint    NOT NULL,
    metadata           jsonb       NOT NULL DEFAULT '{}',
    -- Handed to the billing provider on every attempt, so a charge made by an
    -- attempt whose lease was lost is absorbed by the provider, not repeated.
    idempotency_key    uuid        NOT NULL DEFAULT gen_random_uuid(),
    state              text        NOT NULL DEFAULT 'pending',
    available_at       timestamptz NOT NULL,
    attempts           integer     NOT NULL DEFAULT 0,
    max_attempts       integer     NOT NULL,
    -- The latest lease: kept after it ends, because a holder whose lease
    -- expired may still complete as long as nobody has claimed since.
    lease_epoch        integer     NOT NULL DEFAULT 0,
    lease_nonce        bigint,
    leased_by          text,
    leased_at          timestamptz,
    lease_expires_at   timestamptz,
    -- The holder gave the lease back: its token may no longer complete.
    lease_released     boolean     NOT NULL DEFAULT false,
    last_error         text,
    provider_reference text,
    completed_at       timestamptz,
    completed_by       text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT invoices_external_id_key UNIQUE (external_id),
    CONSTRAINT state_is_known
        CHECK (state IN ('pending', 'leased', 'completed', 'failed')),
    CONSTRAINT leased_iff_lease_expires_at
        CHECK ((state = 'leased') = (lease_expires_at IS NOT NULL)),
    CONSTRAINT leased_has_holder
        CHECK (state <> 'leased'
               OR (leased_by IS NOT NULL AND leased_at IS NOT NULL
                   AND lease_nonce IS NOT NULL AND NOT lease_released)),
    CONSTRAINT completed_iff_completed_at
        CHECK ((state = 'completed') = (completed_at IS NOT NULL)),
    CONSTRAINT attempts_within_budget
        CHECK (attempts >= 0 AND attempts <= max_attempts),
    CONSTRAINT epoch_counts_claims
        CHECK (lease_epoch >= attempts),
    CONSTRAINT amount_not_negative CHECK (amount_minor >= 0),
    CONSTRAINT priority_in_range CHECK (priority BETWEEN 0 AND 9)
);

-- The claim path reads only this index: it holds pending rows alone, in claim
-- order, so completed and failed invoices (the vast majority of a long-lived
-- table) never slow a claim down.
CREATE INDEX invoices_claim_order ON invoices (priority, available_at, id)
    WHERE state = 'pending';

-- The same order within one queue, for workers that claim from chosen queues.
CREATE INDEX invoices_queue_claim_order ON invoices (queue, priority, available_at, id)
    WHERE state = 'pending';

-- The rescuer looks for leases past their expiry.
CREATE INDEX invoices_lease_expiry ON invoices (lease_expires_at)
    WHERE state = 'leased';
