-- Operators list and select invoices by customer. The index on invoices
-- itself took a new entry on every claim and every completion (neither can
-- be a HOT update), each at the tail of that customer's range: beside
-- millions of finished invoices spread over many customers, a drain touched
-- a leaf page per customer, scattered over the index. An invoice's customer
-- never changes, so it is indexed once, when the invoice is inserted, in a
-- table of its own that claims and completions never touch.
CREATE TABLE invoice_customers (
    customer_id text   NOT NULL,
    invoice_id  bigint NOT NULL,
    PRIMARY KEY (customer_id, invoice_id)
);

-- Filled by a statement trigger, so that every insert keeps it: submits,
-- and invoices an operator writes with SQL of their own.
CREATE FUNCTION invoice_customers_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO invoice_customers (customer_id, invoice_id)
    SELECT customer_id, id FROM inserted;
    RETURN NULL;
END
$$;
CREATE TRIGGER invoice_customers_add AFTER INSERT ON invoices
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION invoice_customers_add();

INSERT INTO invoice_customers (customer_id, invoice_id) SELECT customer_id, id FROM invoices;
DROP INDEX invoices_customer;
