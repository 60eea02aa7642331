-- Named queries for webhook events and their outbox, loaded by service/event_store.py.

-- name: events_ingest
SELECT delivery_id, event_key, event_id, duplicate FROM relay_events($1::jsonb);

-- name: forward_reap
-- A forwarder that died (or lost its database) let its leases run out: its jobs are due again.
UPDATE forward_jobs
   SET state = 'pending', lease_owner = NULL, lease_until = NULL, updated_at = now()
 WHERE state = 'running' AND lease_until < now();

-- name: forward_claim
-- Lease up to $2 due jobs; SKIP LOCKED lets concurrent claimers (other processes) pass by.
WITH due AS (
    SELECT id FROM forward_jobs
     WHERE state = 'pending' AND run_at <= now()
     ORDER BY run_at, id
     LIMIT $2
       FOR UPDATE SKIP LOCKED
)
UPDATE forward_jobs j
   SET state = 'running', lease_owner = $1,
       lease_until = now() + make_interval(secs => $3), updated_at = now()
  FROM due, webhook_events e
 WHERE j.id = due.id AND e.id = j.event_id
RETURNING j.id, j.event_id, j.kind, j.destination, j.attempts,
          e.source, e.event_key, e.kind AS event_kind, e.entity_id, e.payload, e.received_at;

-- name: forward_heartbeat
UPDATE forward_jobs SET lease_until = now() + make_interval(secs => $3)
 WHERE id = ANY($2::bigint[]) AND lease_owner = $1 AND state = 'running';

-- name: forward_done
UPDATE forward_jobs SET state = 'done', lease_owner = NULL, lease_until = NULL, last_error = NULL,
                        attempts = attempts + 1, updated_at = now()
 WHERE id = $1 AND lease_owner = $2 AND state = 'running'
RETURNING id;

-- name: forward_retry
-- $3: whether this attempt counts toward the limit (waiting for our own echo does not)
UPDATE forward_jobs SET state = 'pending', lease_owner = NULL, lease_until = NULL,
                        attempts = attempts + CASE WHEN $3 THEN 1 ELSE 0 END,
                        run_at = now() + make_interval(secs => $4), last_error = $5,
                        updated_at = now()
 WHERE id = $1 AND lease_owner = $2 AND state = 'running';

-- name: forward_dead
UPDATE forward_jobs SET state = 'dead', lease_owner = NULL, lease_until = NULL,
                        attempts = attempts + 1, last_error = $3, updated_at = now()
 WHERE id = $1 AND lease_owner = $2 AND state = 'running';

-- name: forward_replay
-- Dead jobs (all, or the given ids) are due again with a fresh attempt budget.
WITH revived AS (
    UPDATE forward_jobs SET state = 'pending', attempts = 0, run_at = now(), last_error = NULL,
                            updated_at = now()
     WHERE state = 'dead' AND ($1::bigint[] IS NULL OR id = ANY($1::bigint[]))
    RETURNING id
)
SELECT count(*) AS n FROM revived;

-- name: notify_events
SELECT pg_notify('relay_events', $1);

-- name: forward_next_due
SELECT min(run_at) - now() AS wait FROM forward_jobs WHERE state = 'pending';

-- name: forward_counts
SELECT kind, state, count(*) AS n FROM forward_jobs GROUP BY kind, state;

-- name: forward_dead_list
SELECT j.id, j.event_id, j.destination, j.attempts, j.last_error, j.updated_at, e.source, e.kind
  FROM forward_jobs j JOIN webhook_events e ON e.id = j.event_id
 WHERE j.state = 'dead' ORDER BY j.updated_at DESC LIMIT $1;

-- name: event_processed
UPDATE webhook_events SET outcome = $2, processed_at = now(), payload = coalesce($3::jsonb, payload)
 WHERE id = $1;

-- name: lead_state_upsert
-- Only a newer change moves the record: events can be processed out of order.
INSERT INTO crm_lead_state (crm, lead_id, pipeline_id, status_id, updated_at, event_id)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (crm, lead_id) DO UPDATE
   SET pipeline_id = coalesce(EXCLUDED.pipeline_id, crm_lead_state.pipeline_id),
       status_id = coalesce(EXCLUDED.status_id, crm_lead_state.status_id),
       updated_at = EXCLUDED.updated_at, event_id = EXCLUDED.event_id, recorded_at = now()
 WHERE crm_lead_state.updated_at <= EXCLUDED.updated_at;

-- name: forward_fanout
INSERT INTO forward_jobs (event_id, kind, destination)
SELECT $1, 'forward', d FROM unnest($2::text[]) AS d
ON CONFLICT (event_id, kind, destination) DO NOTHING;

-- name: our_writes
-- Our deliveries to this lead near the time of the change (the echo rule in service/events.py).
SELECT s.form, s.delivered_at FROM submissions s
 WHERE s.crm_lead_id = $1
   AND s.delivered_at BETWEEN $2::timestamptz - make_interval(secs => $3)
                          AND $2::timestamptz + make_interval(secs => $3);

-- name: deliveries_in_flight
-- A delivery in flight may be about to record the lead an incoming event is about.
SELECT EXISTS (SELECT 1 FROM jobs WHERE state = 'running');

-- name: submitted_lead_states
-- For the operator: where each lead we delivered stands in the CRM, newest change first.
SELECT s.id AS submission_id, s.form, s.crm_lead_id AS lead_id, l.pipeline_id, l.status_id,
       l.updated_at
  FROM submissions s JOIN crm_lead_state l ON l.crm = $1 AND l.lead_id = s.crm_lead_id
 ORDER BY l.updated_at DESC LIMIT $2;
