-- Named queries, loaded by service/store.py into a dict. Each starts with "-- name: <name>".

-- name: ingest
SELECT idem_key, submission_id, duplicate FROM relay_ingest($1::jsonb);

-- name: reap_expired
-- A worker that died (or lost its database) let its leases run out: its jobs are due again.
UPDATE jobs
   SET state = 'pending', lease_owner = NULL, lease_until = NULL, updated_at = now()
 WHERE state = 'running' AND lease_until < now();

-- name: claim
-- Lease up to $2 people that have due jobs and no live lease, and take all their due jobs.
-- FOR UPDATE SKIP LOCKED on the person row makes concurrent claimers pass each other by, and
-- re-checks lease_until on the row's newest version, so one person is never leased twice.
WITH due AS (
    SELECT DISTINCT person_id FROM (
        SELECT person_id FROM jobs
         WHERE state = 'pending' AND run_at <= now()
         ORDER BY run_at
         LIMIT $2 * 4
    ) AS oldest
), free AS (
    SELECT p.id FROM people p JOIN due ON due.person_id = p.id
     WHERE p.lease_until IS NULL OR p.lease_until < now()
     LIMIT $2
       FOR UPDATE OF p SKIP LOCKED
), leased AS (
    UPDATE people p
       SET lease_owner = $1, lease_until = now() + make_interval(secs => $3)
      FROM free WHERE p.id = free.id
    RETURNING p.id, p.crm_contact_id, p.crm_lead_id
)
UPDATE jobs j
   SET state = 'running', lease_owner = $1,
       lease_until = now() + make_interval(secs => $3), updated_at = now()
  FROM leased
 WHERE j.person_id = leased.id AND j.state = 'pending' AND j.run_at <= now()
RETURNING j.id, j.person_id, j.submission_id, j.attempts,
          leased.crm_contact_id, leased.crm_lead_id,
          (SELECT s.lead FROM submissions s WHERE s.id = j.submission_id) AS lead;

-- name: heartbeat_people
UPDATE people SET lease_until = now() + make_interval(secs => $3)
 WHERE id = ANY($2::bigint[]) AND lease_owner = $1;

-- name: heartbeat_jobs
UPDATE jobs SET lease_until = now() + make_interval(secs => $3)
 WHERE id = ANY($2::bigint[]) AND lease_owner = $1 AND state = 'running';

-- name: release_people
UPDATE people SET lease_owner = NULL, lease_until = NULL
 WHERE id = ANY($2::bigint[]) AND lease_owner = $1;

-- name: job_done
UPDATE jobs SET state = 'done', lease_owner = NULL, lease_until = NULL, last_error = NULL,
                attempts = attempts + 1, updated_at = now()
 WHERE id = $1 AND lease_owner = $2 AND state = 'running'
RETURNING submission_id;

-- name: submission_delivered
UPDATE submissions SET state = 'delivered', crm_contact_id = $2, crm_lead_id = $3,
                       delivered_at = now()
 WHERE id = $1;

-- name: person_link
UPDATE people SET crm_contact_id = $2, crm_lead_id = $3, updated_at = now() WHERE id = $1;

-- name: job_retry
-- $3: whether this attempt counts toward the limit (a rate-limit pause does not)
UPDATE jobs SET state = 'pending', lease_owner = NULL, lease_until = NULL,
                attempts = attempts + CASE WHEN $3 THEN 1 ELSE 0 END,
                run_at = now() + make_interval(secs => $4), last_error = $5, updated_at = now()
 WHERE id = $1 AND lease_owner = $2 AND state = 'running';

-- name: job_dead
UPDATE jobs SET state = 'dead', lease_owner = NULL, lease_until = NULL,
                attempts = attempts + 1, last_error = $3, updated_at = now()
 WHERE id = $1 AND lease_owner = $2 AND state = 'running'
RETURNING submission_id;

-- name: submission_dead
UPDATE submissions SET state = 'dead' WHERE id = $1;

-- name: replay
-- Dead jobs (all, or the given ids) are due again with a fresh attempt budget.
WITH revived AS (
    UPDATE jobs SET state = 'pending', attempts = 0, run_at = now(), last_error = NULL,
                    updated_at = now()
     WHERE state = 'dead' AND ($1::bigint[] IS NULL OR id = ANY($1::bigint[]))
    RETURNING id, submission_id
), pending AS (
    UPDATE submissions s SET state = 'pending' FROM revived WHERE s.id = revived.submission_id
)
SELECT count(*) AS n FROM revived;

-- name: notify_jobs
SELECT pg_notify('relay_jobs', 'replay');

-- name: queue_counts
-- A discarded dead letter stays 'dead' in jobs (003_admin.sql) but is counted apart: "dead" is
-- what still waits for an operator's decision.
SELECT CASE WHEN j.state = 'dead' AND d.job_id IS NOT NULL THEN 'discarded' ELSE j.state END
           AS state,
       count(*) AS n
  FROM jobs j LEFT JOIN discarded_jobs d ON d.job_id = j.id
 GROUP BY 1;

-- name: queue_due
SELECT count(*) AS n, min(run_at) AS oldest FROM jobs WHERE state = 'pending' AND run_at <= now();

-- name: next_due
SELECT min(run_at) - now() AS wait FROM jobs WHERE state = 'pending';

-- name: dead_jobs
SELECT j.id, j.submission_id, j.attempts, j.last_error, j.updated_at, s.form,
       (d.job_id IS NOT NULL) AS discarded
  FROM jobs j JOIN submissions s ON s.id = j.submission_id
  LEFT JOIN discarded_jobs d ON d.job_id = j.id
 WHERE j.state = 'dead' ORDER BY j.updated_at DESC LIMIT $1;

-- name: save_rejected
INSERT INTO rejected (id, endpoint, content_type, body, errors) VALUES ($1, $2, $3, $4, $5::jsonb);

-- name: save_spam
-- A repeat of the same content (`content_key`) is kept once: the first one's id answers.
WITH added AS (
    INSERT INTO spam (id, content_key, idem_key, form, reason, client, lead, identities,
                      received_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::text[], $9)
    ON CONFLICT (content_key) DO NOTHING
    RETURNING id
)
SELECT id FROM added
UNION ALL
SELECT id FROM spam WHERE content_key = $2
LIMIT 1;

-- name: submission_lead
SELECT lead FROM submissions WHERE id = $1;
-- name: save_rejected_batch
-- Bad input kept raw; a spooled copy of a row the timed-out write stored anyway is a repeat.
INSERT INTO rejected (id, endpoint, content_type, body, errors)
SELECT r.id, r.endpoint, r.content_type, r.body, r.errors::jsonb
  FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::text[])
       AS r(id, endpoint, content_type, body, errors)
ON CONFLICT (id) DO NOTHING;

-- name: trim_rejected
-- Keep the newest $1 rows and $2 body bytes of `rejected`; delete the older ones.
-- (octet_length of a bytea reads its size from the TOAST header, not the value.)
WITH ranked AS (
    SELECT id,
           row_number() OVER w AS n,
           sum(octet_length(body)) OVER w AS total
      FROM rejected
    WINDOW w AS (ORDER BY received_at DESC, id DESC)
)
DELETE FROM rejected r USING ranked k
 WHERE r.id = k.id AND (k.n > $1 OR k.total > $2);

-- name: token_for_update
SELECT access_token, refresh_token, extract(epoch FROM expires_at) AS expires_at
  FROM oauth_tokens WHERE crm = $1 FOR UPDATE;

-- name: token_get
SELECT access_token, refresh_token, extract(epoch FROM expires_at) AS expires_at
  FROM oauth_tokens WHERE crm = $1;

-- name: token_seed
INSERT INTO oauth_tokens (crm, access_token, refresh_token, expires_at)
VALUES ($1, $2, $3, to_timestamp($4)) ON CONFLICT (crm) DO NOTHING;

-- name: token_save
UPDATE oauth_tokens SET access_token = $2, refresh_token = $3, expires_at = to_timestamp($4),
                        updated_at = now()
 WHERE crm = $1;

-- Contact guard (service/crm/contact_guard.py, 007_contact_writes.sql): one delivery at a time
-- writes to an existing CRM contact, across processes. $1 is the lock space (ours alone), $2 the
-- account ("amocrm:<host>"), the contact ids are bigint arrays.

-- name: contact_write_no
-- Read before a batch reads the CRM: the next number the sequence will hand out, so a stamp
-- drawn after this read is at least this number, and one drawn before it is less.
SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END FROM contact_write_no;

-- name: contact_locks_take
-- Try (never wait for) each contact's session lock: no hold-and-wait, so no deadlock and no
-- stall behind a holder that is waiting for the rate limit.
SELECT t.id AS contact_id,
       pg_try_advisory_lock($1::int, hashtext($2::text || ':' || t.id::text)) AS locked
  FROM unnest($3::bigint[]) WITH ORDINALITY AS t(id, n)
 ORDER BY t.n;

-- name: contact_writes_since
-- Of the contacts just locked ($2), those written since $3 (this batch's contact_write_no). A
-- statement of its own: its snapshot is taken after the lock, so it sees the stamp the previous
-- holder committed before unlocking.
SELECT contact_id FROM contact_writes
 WHERE account = $1 AND contact_id = ANY($2::bigint[]) AND write_no >= $3;

-- name: contact_writes_stamp
-- After the CRM answered our write to these contacts, before unlocking them.
INSERT INTO contact_writes (account, contact_id)
SELECT $1, t.id FROM unnest($2::bigint[]) AS t(id) ORDER BY t.id
ON CONFLICT (account, contact_id) DO UPDATE
   SET write_no = nextval('contact_write_no'), written_at = now();

-- name: contact_writes_prune
-- Stamps a day old mean nothing to a batch reading now. SKIP LOCKED: never wait for a stamper.
DELETE FROM contact_writes
 WHERE ctid = ANY(ARRAY(SELECT ctid FROM contact_writes
                         WHERE written_at < now() - interval '1 day'
                         LIMIT 1000 FOR UPDATE SKIP LOCKED));

-- name: contact_locks_release
SELECT ARRAY(SELECT pg_advisory_unlock($1::int, hashtext($2::text || ':' || t.id::text))
               FROM unnest($3::bigint[]) AS t(id)) AS unlocked;
