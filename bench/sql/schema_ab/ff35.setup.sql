ALTER TABLE invoices SET (fillfactor = 35);
