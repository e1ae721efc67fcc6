-- Each worker's secret, hashed (SHA-256, hex): worker calls must present the secret handed
-- out at registration, so one worker cannot act as another. NULL for workers registered
-- before this column existed; they must register again.
ALTER TABLE workers ADD COLUMN secret_hash TEXT;
