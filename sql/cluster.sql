-- Named queries of service/cluster.py and service/locks.py. Each starts with "-- name: <name>".

-- name: beat
INSERT INTO processes (name, sends, mode) VALUES ($1, $2, $3)
ON CONFLICT (name) DO UPDATE SET beat_at = now(), sends = EXCLUDED.sends, mode = EXCLUDED.mode
RETURNING id;

-- name: live_senders
-- In joining order: a process's position is its rank for the remainder of limit ÷ n.
SELECT id FROM processes
 WHERE sends AND beat_at > now() - make_interval(secs => $1)
 ORDER BY id;

-- name: leave
-- A clean stop: the row goes stale $2 seconds early, so the others take over our share only
-- after our last calls have left their window.
UPDATE processes SET beat_at = now() - make_interval(secs => $2) WHERE name = $1;

-- name: forget
DELETE FROM processes WHERE beat_at < now() - make_interval(secs => $1);

-- name: list
SELECT name, sends, mode, started_at, beat_at,
       beat_at > now() - make_interval(secs => $1) AS live
  FROM processes
 WHERE beat_at > now() - interval '1 day'
 ORDER BY id;

-- name: person_locks_held
-- Person locks held (or waited for) anywhere in the cluster, with the holding process: ingest
-- transactions' pg_advisory_xact_lock (migration 010).
SELECT a.application_name AS holder, l.objid::bigint AS key, l.granted,
       extract(epoch FROM now() - a.backend_start) AS connected_s
  FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.classid = $1::int::oid AND l.objsubid = 2
 ORDER BY a.application_name, l.objid;
