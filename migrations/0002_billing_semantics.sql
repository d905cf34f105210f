-- Billing semantics: cancellation, per-customer serialization, per-queue
-- weights for fair claiming, and an append-only audit trail of lease events.

-- A cancelled invoice is never claimed again. A leased one is first marked
-- cancel_requested; its holder learns it from ExtendLease, and the invoice
-- becomes cancelled when the lease ends without a completion.
ALTER TABLE invoices DROP CONSTRAINT state_is_known;
ALTER TABLE invoices ADD CONSTRAINT state_is_known
    CHECK (state IN ('pending', 'leased', 'completed', 'failed', 'cancelled'));
ALTER TABLE invoices
    ADD COLUMN cancel_requested  boolean     NOT NULL DEFAULT false,
    ADD COLUMN finished_at       timestamptz,
    -- Invoices sharing a key are never leased at the same time (the customer
    -- id, when the queue serializes by customer). NULL: no such limit.
    ADD COLUMN serialization_key text;
ALTER TABLE invoices ADD CONSTRAINT cancel_requested_only_while_leased
    CHECK (NOT cancel_requested OR state = 'leased');
ALTER TABLE invoices ADD CONSTRAINT finished_iff_final
    CHECK ((state IN ('completed', 'failed', 'cancelled')) = (finished_at IS NOT NULL));

-- At most one live lease per serialization key, enforced here rather than by
-- a check-then-act in the service. Claims skip busy keys; two claims racing
-- for one key make one of them fail on this index and retry.
CREATE UNIQUE INDEX invoices_one_lease_per_key ON invoices (serialization_key)
    WHERE state = 'leased' AND serialization_key IS NOT NULL;

-- Operators list invoices by customer, and dead letters by when they failed.
CREATE INDEX invoices_customer ON invoices (customer_id, id);
CREATE INDEX invoices_dead_letters ON invoices (queue, finished_at, id)
    WHERE state = 'failed';

-- Per-queue settings. A queue without a row has weight 1 and no
-- serialization.
CREATE TABLE queues (
    name                  text        PRIMARY KEY,
    -- Share of each claim the queue gets when several have work, relative to
    -- the others' weights.
    weight                integer     NOT NULL DEFAULT 1,
    serialize_by_customer boolean     NOT NULL DEFAULT false,
    updated_at            timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT weight_in_range CHECK (weight BETWEEN 1 AND 1000)
);

-- Every lease event, appended in the transaction that caused it. No foreign
-- key: invoices are never deleted, and the check would cost every append.
-- Pruned by age in small batches; the BRIN index on a column that grows with
-- insertion order finds old rows at almost no cost.
CREATE TABLE invoice_events (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    invoice_id  bigint      NOT NULL,
    -- When it happened: clock time, taken after the statement's snapshot, so
    -- a lease granted after another's completion is also stamped after it
    -- (a transaction's now() can predate the commit it waited for).
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind        text        NOT NULL,
    worker_id   text,
    attempt     integer,
    lease_epoch integer,
    lease_nonce bigint,
    detail      text,
    CONSTRAINT kind_is_known CHECK (kind IN (
        'submitted', 'claimed', 'extended', 'released', 'expired', 'completed',
        'lease_lost', 'failed', 'redriven', 'cancel_requested', 'cancelled'))
);
CREATE INDEX invoice_events_by_invoice ON invoice_events (invoice_id, id);
CREATE INDEX invoice_events_at ON invoice_events USING brin (at);

-- Existing finished invoices get a finish time so the new constraint holds.
UPDATE invoices SET finished_at = coalesce(completed_at, updated_at)
    WHERE state IN ('completed', 'failed') AND finished_at IS NULL;
