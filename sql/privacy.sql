-- Named queries for spam review, retention and erasure (service/db/privacy_store.py).

-- name: list_spam
-- $1 form, $2 reason, $3/$4 received between, $5 released (NULL = either), $6 limit.
SELECT id, form, reason, client, lead, received_at, released_at, released_submission_id
  FROM spam
 WHERE ($1::text IS NULL OR form = $1)
   AND ($2::text IS NULL OR reason = $2)
   AND ($3::timestamptz IS NULL OR received_at >= $3)
   AND ($4::timestamptz IS NULL OR received_at < $4)
   AND ($5::boolean IS NULL OR (released_at IS NOT NULL) = $5)
 ORDER BY received_at DESC
 LIMIT $6;

-- name: spam_for_release
SELECT id, idem_key, form, lead, identities, received_at, released_submission_id
  FROM spam WHERE id = $1 FOR UPDATE;

-- name: ingest
SELECT idem_key, submission_id, duplicate FROM relay_ingest($1::jsonb);

-- name: spam_released
UPDATE spam SET released_at = now(), released_submission_id = $2 WHERE id = $1;

-- Retention: $1 seconds of age, $2 rows per statement (a purge is many short transactions,
-- never one long one). Undelivered work is never touched: a submission with a pending, running
-- or undiscarded dead job stays, and so does an event with a forward job not done.

-- name: purge_submissions
WITH old AS (
    SELECT s.id FROM submissions s
     WHERE s.received_at < now() - make_interval(secs => $1)
       AND NOT EXISTS (
            SELECT 1 FROM jobs j
             WHERE j.submission_id = s.id
               AND (j.state IN ('pending', 'running')
                    OR (j.state = 'dead'
                        AND NOT EXISTS (SELECT 1 FROM discarded_jobs d WHERE d.job_id = j.id))))
     LIMIT $2
       FOR UPDATE SKIP LOCKED
), gone_discards AS (
    DELETE FROM discarded_jobs d USING jobs j, old
     WHERE d.job_id = j.id AND j.submission_id = old.id
), gone_jobs AS (
    DELETE FROM jobs j USING old WHERE j.submission_id = old.id RETURNING 1
), gone AS (
    DELETE FROM submissions s USING old WHERE s.id = old.id RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS submissions, (SELECT count(*) FROM gone_jobs) AS jobs;

-- name: purge_rejected
WITH gone AS (
    DELETE FROM rejected WHERE id = ANY(ARRAY(
        SELECT id FROM rejected WHERE received_at < now() - make_interval(secs => $1) LIMIT $2))
    RETURNING 1
)
SELECT count(*) FROM gone;

-- name: purge_events
WITH old AS (
    SELECT e.id FROM webhook_events e
     WHERE e.received_at < now() - make_interval(secs => $1)
       AND NOT EXISTS (SELECT 1 FROM forward_jobs f WHERE f.event_id = e.id AND f.state <> 'done')
     LIMIT $2
       FOR UPDATE SKIP LOCKED
), unlinked AS (
    UPDATE crm_lead_state c SET event_id = NULL FROM old WHERE c.event_id = old.id
), gone_jobs AS (
    DELETE FROM forward_jobs f USING old WHERE f.event_id = old.id
), gone AS (
    DELETE FROM webhook_events e USING old WHERE e.id = old.id RETURNING 1
)
SELECT count(*) FROM gone;

-- name: purge_deliveries
-- A delivery's raw body once none of its events is left (a pure repeat kept no body).
WITH gone AS (
    DELETE FROM webhook_deliveries w WHERE w.id = ANY(ARRAY(
        SELECT d.id FROM webhook_deliveries d
         WHERE d.received_at < now() - make_interval(secs => $1)
           AND NOT EXISTS (SELECT 1 FROM webhook_events e WHERE e.delivery_id = d.id)
         LIMIT $2))
    RETURNING 1
)
SELECT count(*) FROM gone;

-- name: purge_spam_old
WITH gone AS (
    DELETE FROM spam WHERE id = ANY(ARRAY(
        SELECT id FROM spam WHERE received_at < now() - make_interval(secs => $1) LIMIT $2))
    RETURNING 1
)
SELECT count(*) FROM gone;

-- name: purge_spam_over
-- Past $1 rows the oldest spam goes, whatever its age: junk must not fill the disk.
WITH gone AS (
    DELETE FROM spam WHERE id = ANY(ARRAY(
        SELECT id FROM spam ORDER BY received_at DESC OFFSET $1 LIMIT $2))
    RETURNING 1
)
SELECT count(*) FROM gone;

-- Erasure of one person, in one transaction, in this order (foreign keys). Rows are found by the
-- person's identities ('phone:+77011234567', 'email:a@b.kz'); raw bodies and payloads, by
-- text: the phone's national digits among a body's digits (however it was written), the email
-- in lower case, or percent-encoded as a urlencoded body carries it.

-- name: forget_lock
-- The person locks ingest takes (010_person_locks_in_ingest.sql), in key order: a submission
-- of this person being written now either commits before the erasure reads, or waits for it.
SELECT count(pg_advisory_xact_lock(72811978, k.key))
  FROM (SELECT DISTINCT relay_person_lock_key(v) AS key
          FROM unnest($1::text[]) AS v ORDER BY 1) AS k;

-- name: forget_people
SELECT coalesce(array_agg(DISTINCT person_id), '{}')
  FROM identities WHERE identity = ANY($1::text[]);

-- name: forget_submissions
SELECT coalesce(array_agg(id), '{}') FROM submissions WHERE person_id = ANY($1::bigint[]);

-- name: forget_discards
DELETE FROM discarded_jobs d USING jobs j
 WHERE d.job_id = j.id AND j.submission_id = ANY($1::uuid[]);

-- name: forget_jobs
DELETE FROM jobs WHERE submission_id = ANY($1::uuid[]) OR person_id = ANY($2::bigint[]);

-- name: forget_delete_submissions
DELETE FROM submissions WHERE id = ANY($1::uuid[]);

-- name: forget_identities
DELETE FROM identities WHERE person_id = ANY($1::bigint[]) OR identity = ANY($2::text[]);

-- name: forget_person_rows
DELETE FROM people WHERE id = ANY($1::bigint[]);

-- name: forget_spam
DELETE FROM spam WHERE identities && $1::text[];

-- name: forget_identities_of
SELECT coalesce(array_agg(DISTINCT identity), '{}')
  FROM identities WHERE person_id = ANY($1::bigint[]);

-- name: forget_rejected
-- $1 phones' national digits, $2 emails (lower case), $3 the same percent-encoded
DELETE FROM rejected r
 WHERE EXISTS (SELECT 1 FROM unnest($1::text[]) AS d
                WHERE strpos(relay_digits(encode(r.body, 'escape')), d) > 0)
    OR EXISTS (SELECT 1 FROM unnest($2::text[] || $3::text[]) AS m
                WHERE strpos(lower(encode(r.body, 'escape')), m) > 0);

-- name: forget_events
SELECT coalesce(array_agg(e.id), '{}') FROM webhook_events e
  LEFT JOIN webhook_deliveries w ON w.id = e.delivery_id
 WHERE EXISTS (SELECT 1 FROM unnest($1::text[]) AS d
                WHERE strpos(relay_digits(e.payload::text), d) > 0
                   OR strpos(relay_digits(encode(w.raw, 'escape')), d) > 0)
    OR EXISTS (SELECT 1 FROM unnest($2::text[] || $3::text[]) AS m
                WHERE strpos(lower(e.payload::text), m) > 0
                   OR strpos(lower(encode(w.raw, 'escape')), m) > 0);

-- name: forget_event_rows
WITH unlinked AS (
    UPDATE crm_lead_state c SET event_id = NULL WHERE c.event_id = ANY($1::uuid[])
), gone_jobs AS (
    DELETE FROM forward_jobs f WHERE f.event_id = ANY($1::uuid[])
), gone AS (
    DELETE FROM webhook_events e WHERE e.id = ANY($1::uuid[]) RETURNING delivery_id
), bodies AS (
    DELETE FROM webhook_deliveries w
     WHERE w.id IN (SELECT delivery_id FROM gone)
       AND NOT EXISTS (SELECT 1 FROM webhook_events e
                        WHERE e.delivery_id = w.id AND e.id <> ALL($1::uuid[]))
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS events, (SELECT count(*) FROM bodies) AS deliveries;

-- name: forget_contact_index
DELETE FROM contact_index WHERE identity = ANY($1::text[]);
