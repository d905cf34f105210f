ALTER TABLE invoices SET (fillfactor = 70);
