-- The idempotent submit finds an invoice by its external_id. As a unique
-- constraint on invoices itself, that index took a new entry on every claim
-- and every completion (neither can be a HOT update), though an invoice's
-- external_id never changes. Kept in a table of its own, written once when
-- the invoice is inserted, it costs the claim path nothing: on a 100,000-
-- invoice burn-down with batches of 100, WAL per invoice fell from about
-- 1,640 to 1,410 bytes and throughput rose by 12-17% (interleaved runs).
CREATE TABLE invoice_external_ids (
    external_id text   PRIMARY KEY,
    invoice_id  bigint NOT NULL
);

-- One statement trigger now fills both lookup tables, the customers' of
-- migration 0005 and this one, so that every insert keeps them: submits,
-- and invoices an operator writes with SQL of their own. A second invoice
-- with a taken external_id fails on this table's primary key, as it failed
-- on the constraint before. External ids go in in order, so that two batches
-- sharing some wait on each other in the same order instead of deadlocking.
CREATE FUNCTION invoice_lookups_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO invoice_customers (customer_id, invoice_id)
    SELECT customer_id, id FROM inserted;
    INSERT INTO invoice_external_ids (external_id, invoice_id)
    SELECT external_id, id FROM inserted ORDER BY external_id;
    RETURN NULL;
END
$$;
DROP TRIGGER invoice_customers_add ON invoices;
DROP FUNCTION invoice_customers_add();
CREATE TRIGGER invoice_lookups_add AFTER INSERT ON invoices
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION invoice_lookups_add();

INSERT INTO invoice_external_ids (external_id, invoice_id) SELECT external_id, id FROM invoices;
ALTER TABLE invoices DROP CONSTRAINT invoices_external_id_key;
