-- Writes to existing CRM contacts, so that a delivery that read a contact before another process
-- wrote to it does not act on what it read (service/crm/contact_guard.py).
--
-- Two of our people (a phone-only and an email-only submission) can be one CRM contact. A
-- delivery decides "update the open lead" or "create one" from a read of the contact; a second
-- delivery that read the contact before the first created its lead would create another. So:
-- a delivery takes a per-contact advisory lock (try, never wait) before it writes, and whoever
-- creates a lead for, or updates, an existing contact stamps it here *after* the CRM answered and
-- before unlocking. A delivery that took the lock and finds a stamp newer than the moment it
-- started reading waits for the next round (and then reads again) instead of writing.
--
-- `write_no` comes from a sequence, not a clock: a number drawn after another session read the
-- number the sequence will hand out next is never smaller than that (CACHE 1, so no session
-- holds a block of numbers reserved earlier), whatever the server's clock does.
CREATE SEQUENCE contact_write_no CACHE 1;

CREATE TABLE contact_writes (
    account     text NOT NULL,          -- "amocrm:<host>" | "bitrix24:<host>"
    contact_id  bigint NOT NULL,
    write_no    bigint NOT NULL DEFAULT nextval('contact_write_no'),
    written_at  timestamptz NOT NULL DEFAULT now(),  -- for pruning only
    PRIMARY KEY (account, contact_id)
);
-- stamps older than any delivery still reading are useless: dropped as new ones come in
CREATE INDEX contact_writes_age ON contact_writes (written_at);
