-- amoCRM contact index (issue 3): who the CRM already knows, kept here so that a new person costs
-- no per-person search. amoCRM's `query` matches one string, so a person with a phone and an
-- email cost two searches; the index answers both in one local lookup.
--
-- It is filled from the contacts list endpoint (oldest change first, from the last change seen),
-- and at once from our own creates. Identities are normalised as intake normalises them
-- (E.164 phone, lower-case email), so "8 (916) 123-45-67" typed by a manager meets
-- +79161234567 from a form. Queries: sql/contact_index.sql.

-- One row per (identity, contact): a CRM may hold several contacts with one phone (managers make
-- duplicates); the oldest (lowest id) wins, as with the search. `account` is the CRM account
-- ("amocrm:<host>"), so switching accounts never links to another account's contacts.
CREATE TABLE contact_index (
    account     text NOT NULL,
    identity    text NOT NULL,          -- +77011234567 or name@example.com
    contact_id  bigint NOT NULL,
    indexed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account, identity, contact_id)
);
-- a contact's rows are replaced when it is read again, and dropped when it turns out deleted
CREATE INDEX contact_index_contact ON contact_index (account, contact_id);

-- Where the sync stands, one row per account. The next list request asks for
-- filter[updated_at][from] = max_updated_at - 1 (one second of overlap: amoCRM's timestamps are
-- seconds, and more changes may land in the second last seen) and this `page`; `page` is above 1
-- only while one stretch of that second-plus holds more than a page of contacts (an import).
-- Lookups are trusted once the full scan is done and the last round reached the end (else a
-- person is searched for, as without the index). Only the process holding the account's advisory
-- lock (sql/contact_index.sql, sync_lock) writes this row.
CREATE TABLE contact_index_sync (
    account         text PRIMARY KEY,
    max_updated_at  bigint NOT NULL DEFAULT 0,     -- the newest contact change seen (unix s)
    page            integer NOT NULL DEFAULT 1 CHECK (page >= 1),
    full_scan_done  boolean NOT NULL DEFAULT false,  -- every contact was read at least once
    caught_up       boolean NOT NULL DEFAULT false,  -- the last page read was the last there was
    contacts_read   bigint NOT NULL DEFAULT 0,
    started_at      timestamptz NOT NULL DEFAULT now(),
    synced_at       timestamptz                     -- the last round that reached the end
);
