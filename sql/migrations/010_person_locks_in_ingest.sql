-- The person lock moves into the ingest transaction.
--
-- Intake used to hold a session-level advisory lock per identity on a connection of its own
-- while a submission was written: a round trip to take it, one to release it, and a task and a
-- future per request (~10 µs of a ~200 µs request). The lock guards one thing: two transactions
-- resolving overlapping identities at once (one request with a phone, another with that phone and
-- an email, in two processes) would leave the phone with one person and the email with another.
-- Taken inside the transaction as pg_advisory_xact_lock, the same lock costs no round trip, is
-- held exactly as long as the write it guards, goes with the transaction whatever happens to the
-- process, and also covers spooled submissions re-ingested after an outage (which took none).
--
-- Keys: (72811978, the first 32 bits of md5(identity)) — service.locks.PERSON_LOCK_SPACE and
-- person_lock_key compute the same. All of a batch's keys are taken in one statement, in key
-- order, before anything is read: two batches never wait on each other in a cycle.

CREATE FUNCTION relay_person_lock_key(identity text) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT ('x' || substr(md5(identity), 1, 8))::bit(32)::integer $$;

ALTER FUNCTION relay_ingest(jsonb) RENAME TO relay_ingest_unlocked;

CREATE FUNCTION relay_ingest(items jsonb)
RETURNS TABLE (idem_key text, submission_id uuid, duplicate boolean)
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(72811978, k.key)
       FROM (SELECT DISTINCT relay_person_lock_key(v) AS key
               FROM jsonb_array_elements(items) AS e,
                    jsonb_array_elements_text(e->'identities') AS v
              ORDER BY 1) AS k;
    RETURN QUERY SELECT * FROM relay_ingest_unlocked(items);
END;
$$;
