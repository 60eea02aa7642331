-- Named queries for the amoCRM contact index (006_contact_index.sql), loaded by
-- service/crm/amocrm_index_store.py. $1 is always the account ("amocrm:<host>").

-- name: sync_lock_wait
-- How long sync_lock may wait for another process's round (in the same transaction).
SELECT set_config('lock_timeout', $1::text, true);

-- name: sync_lock
-- One syncing process per account: a session lock, so a holder that dies frees it with its
-- connection (no lease to time out). Waits for a round under way (up to sync_lock_wait; then
-- 55P03 lock_not_available). $2: the lock space (ours alone).
SELECT pg_advisory_lock($2::int, hashtext($1));

-- name: sync_unlock
SELECT pg_advisory_unlock($2::int, hashtext($1));

-- name: sync_state
-- The account's row, made on first use; one row either way (the SELECT does not see the INSERT).
WITH made AS (
    INSERT INTO contact_index_sync (account) VALUES ($1)
    ON CONFLICT (account) DO NOTHING
    RETURNING max_updated_at, page, full_scan_done, caught_up
)
SELECT max_updated_at, page, full_scan_done, caught_up FROM made
UNION ALL
SELECT max_updated_at, page, full_scan_done, caught_up FROM contact_index_sync WHERE account = $1;

-- name: sync_page_contacts
-- The contacts of one list page, as they are now: their identities ($2, $3 pairs) replace the
-- rows of those contacts ($4, all the page's ids: a contact without any identity left loses
-- its rows). Inserted in key order, like every other writer here, so writers never deadlock.
WITH incoming AS (
    SELECT DISTINCT t.identity, t.contact_id
      FROM unnest($2::text[], $3::bigint[]) AS t(identity, contact_id)
), gone AS (
    DELETE FROM contact_index c
     WHERE c.account = $1 AND c.contact_id = ANY($4::bigint[])
       AND NOT EXISTS (SELECT 1 FROM incoming i
                        WHERE i.identity = c.identity AND i.contact_id = c.contact_id)
)
INSERT INTO contact_index (account, identity, contact_id)
SELECT $1, identity, contact_id FROM incoming ORDER BY identity, contact_id
ON CONFLICT (account, identity, contact_id) DO NOTHING;

-- name: sync_page_state
-- $2 max_updated_at, $3 page (of the next request), $4 whether this page was the last one,
-- $5 contacts read.
UPDATE contact_index_sync
   SET max_updated_at = $2, page = $3, caught_up = $4,
       full_scan_done = full_scan_done OR $4,
       contacts_read = contacts_read + $5,
       synced_at = CASE WHEN $4 THEN now() ELSE synced_at END
 WHERE account = $1;

-- name: remember
-- Our own creates (and identities we added to a contact), indexed at once.
INSERT INTO contact_index (account, identity, contact_id)
SELECT $1, t.identity, t.contact_id
  FROM unnest($2::text[], $3::bigint[]) AS t(identity, contact_id)
 ORDER BY 2, 3
ON CONFLICT (account, identity, contact_id) DO NOTHING;

-- name: lookup
SELECT identity, contact_id FROM contact_index
 WHERE account = $1 AND identity = ANY($2::text[])
 ORDER BY contact_id;

-- name: forget_contact
-- The contact is gone from the CRM (deleted): none of its identities lead to it any more.
DELETE FROM contact_index WHERE account = $1 AND contact_id = $2;

-- name: forget_identities
-- The contact no longer holds these identities (a manager changed them since we read it).
DELETE FROM contact_index WHERE account = $1 AND contact_id = $2 AND identity = ANY($3::text[]);
