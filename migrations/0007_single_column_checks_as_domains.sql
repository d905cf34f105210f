-- PostgreSQL reads every CHECK constraint of a table from its catalog text,
-- and prepares it, once per statement that writes the table, and it checks
-- them all on every UPDATE, whichever columns change. Claims and completions
-- are thousands of small statements a second: with single-invoice calls,
-- turning the constraints of `invoices` and `invoice_events` back into
-- expressions took about a tenth of the database's time. A domain's check
-- is instead kept ready in the type cache, and runs only when a value is
-- written to a column of that type: for the state, on the writes that set
-- it; for the priority, the amount and an event's kind, when the row is
-- inserted, and never on a claim or a completion.
--
-- The domains start without their checks, so that changing the columns'
-- types does not rewrite the tables (the types are binary-coercible; only
-- the partial indexes, which hold the pending, leased and failed invoices
-- alone, are rebuilt). Each check is then added NOT VALID, which enforces it
-- on every new value at once, and validated with a read of the table.
CREATE DOMAIN invoice_state AS text;
CREATE DOMAIN invoice_priority AS smallint;
CREATE DOMAIN amount_minor_units AS bigint;
CREATE DOMAIN invoice_event_kind AS text;

ALTER TABLE invoices
    DROP CONSTRAINT state_is_known,
    DROP CONSTRAINT priority_in_range,
    DROP CONSTRAINT amount_not_negative,
    ALTER COLUMN state TYPE invoice_state,
    ALTER COLUMN priority TYPE invoice_priority,
    ALTER COLUMN amount_minor TYPE amount_minor_units;
ALTER TABLE invoice_events
    DROP CONSTRAINT kind_is_known,
    ALTER COLUMN kind TYPE invoice_event_kind;

ALTER DOMAIN invoice_state ADD CONSTRAINT state_is_known
    CHECK (VALUE IN ('pending', 'leased', 'completed', 'failed', 'cancelled')) NOT VALID;
ALTER DOMAIN invoice_priority ADD CONSTRAINT priority_in_range
    CHECK (VALUE BETWEEN 0 AND 9) NOT VALID;
ALTER DOMAIN amount_minor_units ADD CONSTRAINT amount_not_negative
    CHECK (VALUE >= 0) NOT VALID;
ALTER DOMAIN invoice_event_kind ADD CONSTRAINT kind_is_known CHECK (VALUE IN (
    'submitted', 'claimed', 'extended', 'released', 'expired', 'completed',
    'lease_lost', 'failed', 'redriven', 'cancel_requested', 'cancelled')) NOT VALID;

ALTER DOMAIN invoice_state VALIDATE CONSTRAINT state_is_known;
ALTER DOMAIN invoice_priority VALIDATE CONSTRAINT priority_in_range;
ALTER DOMAIN amount_minor_units VALIDATE CONSTRAINT amount_not_negative;
ALTER DOMAIN invoice_event_kind VALIDATE CONSTRAINT kind_is_known;
