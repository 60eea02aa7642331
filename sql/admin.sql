-- Named queries of the admin API, the dashboard, metrics and alerts (service/admin_store.py).

-- name: find_submissions
-- $1 identities ('phone:+7…', 'email:…'; NULL = any person), $2 form, $3/$4 received between,
-- $5 submission state, $6 limit. A person's submissions, newest first, with their latest job.
SELECT s.id, s.form, s.state, s.received_at, s.delivered_at, s.lead, s.person_id,
       s.crm_contact_id, s.crm_lead_id,
       j.id AS job_id, j.state AS job_state, j.attempts, j.last_error, j.run_at,
       (d.job_id IS NOT NULL) AS discarded
  FROM submissions s
  LEFT JOIN LATERAL (
        SELECT * FROM jobs WHERE jobs.submission_id = s.id ORDER BY jobs.id DESC LIMIT 1
  ) j ON true
  LEFT JOIN discarded_jobs d ON d.job_id = j.id
 WHERE ($1::text[] IS NULL OR s.person_id IN (
            SELECT i.person_id FROM identities i WHERE i.identity = ANY($1::text[])))
   AND ($2::text IS NULL OR s.form = $2)
   AND ($3::timestamptz IS NULL OR s.received_at >= $3)
   AND ($4::timestamptz IS NULL OR s.received_at < $4)
   AND ($5::text IS NULL OR s.state = $5)
 ORDER BY s.received_at DESC
 LIMIT $6;

-- name: list_jobs
SELECT j.id, j.submission_id, j.person_id, s.form, j.state, j.attempts, j.run_at, j.last_error,
       j.lease_owner, j.lease_until, j.created_at, j.updated_at
  FROM jobs j JOIN submissions s ON s.id = j.submission_id
 WHERE ($1::text IS NULL OR j.state = $1)
 ORDER BY j.updated_at DESC, j.id DESC
 LIMIT $2;

-- name: dead_letters
-- Undiscarded dead jobs: $1 form, $2 text in the last error, $3/$4 died between, $5 limit.
SELECT j.id, j.submission_id, s.form, j.attempts, j.last_error, j.updated_at AS died_at,
       s.received_at, s.lead
  FROM jobs j JOIN submissions s ON s.id = j.submission_id
 WHERE j.state = 'dead'
   AND NOT EXISTS (SELECT 1 FROM discarded_jobs d WHERE d.job_id = j.id)
   AND ($1::text IS NULL OR s.form = $1)
   AND ($2::text IS NULL OR strpos(lower(coalesce(j.last_error, '')), lower($2)) > 0)
   AND ($3::timestamptz IS NULL OR j.updated_at >= $3)
   AND ($4::timestamptz IS NULL OR j.updated_at < $4)
 ORDER BY j.updated_at DESC
 LIMIT $5;

-- name: dead_letter_count
SELECT count(*) FROM jobs j
 WHERE j.state = 'dead' AND NOT EXISTS (SELECT 1 FROM discarded_jobs d WHERE d.job_id = j.id);

-- name: undiscard
DELETE FROM discarded_jobs WHERE job_id = $1;

-- name: replay
-- Dead jobs matching the filter ($1 one job id, else $2 form, $3 error text, $4/$5 died between)
-- are due again with a fresh attempt budget; discarded ones are kept dead by a trigger.
WITH picked AS (
    SELECT j.id FROM jobs j JOIN submissions s ON s.id = j.submission_id
     WHERE j.state = 'dead'
       AND ($1::bigint IS NULL OR j.id = $1)
       AND ($2::text IS NULL OR s.form = $2)
       AND ($3::text IS NULL OR strpos(lower(coalesce(j.last_error, '')), lower($3)) > 0)
       AND ($4::timestamptz IS NULL OR j.updated_at >= $4)
       AND ($5::timestamptz IS NULL OR j.updated_at < $5)
       FOR UPDATE OF j
), revived AS (
    UPDATE jobs j SET state = 'pending', attempts = 0, run_at = now(), last_error = NULL,
                      updated_at = now()
      FROM picked WHERE j.id = picked.id
    RETURNING j.id, j.submission_id
), pending AS (
    UPDATE submissions s SET state = 'pending' FROM revived WHERE s.id = revived.submission_id
)
SELECT id FROM revived ORDER BY id;

-- name: notify_jobs
SELECT pg_notify('relay_jobs', 'replay');

-- name: discard
INSERT INTO discarded_jobs (job_id, note)
SELECT id, $2 FROM jobs WHERE id = $1 AND state = 'dead'
ON CONFLICT (job_id) DO NOTHING
RETURNING job_id;

-- name: person_leases
SELECT p.id AS person_id, p.lease_owner, p.lease_until,
       extract(epoch FROM p.lease_until - now()) AS expires_in_s,
       (SELECT count(*) FROM jobs j WHERE j.person_id = p.id AND j.state = 'running') AS running
  FROM people p
 WHERE p.lease_until > now()
 ORDER BY p.lease_until
 LIMIT $1;

-- name: release_person
-- Force-release: the person can be claimed again at once (its running jobs come back when
-- their own lease runs out, so a worker still delivering them is not raced).
UPDATE people SET lease_owner = NULL, lease_until = NULL
 WHERE id = $1 AND lease_owner IS NOT NULL
RETURNING id;

-- name: timeline
-- Per minute over the last $1 minutes: jobs waiting at the minute's end, and jobs delivered in it.
WITH minutes AS (
    SELECT generate_series(date_trunc('minute', now()) - make_interval(mins => $1 - 1),
                           date_trunc('minute', now()), interval '1 minute') AS m
), recent AS (
    SELECT created_at, state, updated_at FROM jobs
     WHERE state IN ('pending', 'running')
        OR (state IN ('done', 'dead') AND updated_at >= now() - make_interval(mins => $1 + 1))
)
SELECT m.m AS minute,
       (SELECT count(*) FROM recent r
         WHERE r.created_at < m.m + interval '1 minute'
           AND (r.state IN ('pending', 'running') OR r.updated_at >= m.m + interval '1 minute')
       ) AS queued,
       (SELECT count(*) FROM recent r
         WHERE r.state = 'done' AND r.updated_at >= m.m AND r.updated_at < m.m + interval '1 minute'
       ) AS delivered
  FROM minutes m
 ORDER BY m.m;

-- name: claim_alert
INSERT INTO alert_claims AS a (condition, kind, sent_at, sent_by)
VALUES ($1, $2, now(), $4)
ON CONFLICT (condition, kind) DO UPDATE SET sent_at = now(), sent_by = EXCLUDED.sent_by
 WHERE a.sent_at <= now() - make_interval(secs => $3)
RETURNING a.sent_by;

-- name: delivery_control_get
SELECT paused, changed_at, changed_by FROM delivery_control WHERE id;

-- name: delivery_control_set
WITH changed AS (
    UPDATE delivery_control SET paused = $1, changed_at = now(), changed_by = $2
     WHERE id RETURNING paused, changed_at, changed_by
)
SELECT paused, changed_at, changed_by, pg_notify('crm_relay_delivery', paused::text) AS notified
  FROM changed;

-- name: rejected
-- Bad input kept for inspection, newest first: $1 limit. The body's first 300 bytes only.
SELECT id, endpoint, content_type, errors, received_at, octet_length(body) AS body_bytes,
       substring(body FROM 1 FOR 300) AS body_start
  FROM rejected
 ORDER BY received_at DESC
 LIMIT $1;

-- name: webhook_events
-- Webhook events in, newest first ($1 limit), with the state of their outbox jobs: the
-- process job, and the forward jobs as {destination, state, attempts, last_error}.
SELECT e.id, e.source, e.kind, e.entity_id, e.received_at, e.outcome, e.processed_at,
       (SELECT f.state FROM forward_jobs f
         WHERE f.event_id = e.id AND f.kind = 'process' LIMIT 1) AS process_state,
       coalesce((SELECT jsonb_agg(jsonb_build_object(
                    'id', f.id, 'destination', f.destination, 'state', f.state,
                    'attempts', f.attempts, 'last_error', f.last_error) ORDER BY f.id)
                   FROM forward_jobs f WHERE f.event_id = e.id AND f.kind = 'forward'),
                '[]'::jsonb) AS forwards
  FROM webhook_events e
 ORDER BY e.received_at DESC, e.id
 LIMIT $1;

-- name: forwards
-- Forwards out, newest first (by id: the primary key's index, never a sort of the whole
-- table): $1 state (NULL = any), $2 limit.
SELECT f.id, f.event_id, e.source, e.kind, f.destination, f.state, f.attempts, f.run_at,
       f.last_error, f.created_at, f.updated_at
  FROM forward_jobs f JOIN webhook_events e ON e.id = f.event_id
 WHERE f.kind = 'forward' AND ($1::text IS NULL OR f.state = $1)
 ORDER BY f.id DESC
 LIMIT $2;

-- name: form_counts
-- Per form since $1 (the start of the day): submissions by state, and spam caught; $2 limit
-- (forms with the most submissions first).
WITH subs AS (
    SELECT form, count(*) AS received,
           count(*) FILTER (WHERE state = 'delivered') AS delivered,
           count(*) FILTER (WHERE state = 'pending') AS pending,
           count(*) FILTER (WHERE state = 'dead') AS dead
      FROM submissions WHERE received_at >= $1 GROUP BY form
), caught AS (
    SELECT form, count(*) AS spam FROM spam WHERE received_at >= $1 GROUP BY form
)
SELECT coalesce(s.form, c.form) AS form, coalesce(s.received, 0) AS received,
       coalesce(s.delivered, 0) AS delivered, coalesce(s.pending, 0) AS pending,
       coalesce(s.dead, 0) AS dead, coalesce(c.spam, 0) AS spam
  FROM subs s FULL JOIN caught c ON c.form = s.form
 ORDER BY coalesce(s.received, 0) + coalesce(c.spam, 0) DESC, form
 LIMIT $2;
