-- Intake speed: relay_ingest() set-based, and never a sequential scan of `identities`.
--
-- 001's relay_ingest() ran eight statements per item, and its identity lookup
-- (`identity IN (SELECT jsonb_array_elements_text(...))`) was planned as a hash semi-join over a
-- sequential scan of `identities` while the table still looked small (a fresh table has no
-- statistics until autovacuum analyses it; PL/pgSQL keeps the plan for the connection's life), so
-- every item read the whole table: ~0.7 ms per item at 2,000 people, ~4 ms at 12,000.
--
-- Now a batch is written in three statements whatever its size:
--   1. people for the items' new identities, and the identities (sorted, ON CONFLICT DO NOTHING);
--   2. a new snapshot: each item's person is the lowest person id among its identities (another
--      transaction's claim, committed meanwhile, wins as before), its submission row (ON CONFLICT
--      DO NOTHING on the idempotency key) and its outbox job;
--   3. a key that lost a race to a concurrent transaction is looked up again (new snapshot).
-- A batch in which two items share an idempotency key or an identity (spool drains re-ingest
-- many at once), or an item has no identity, goes through relay_ingest_each(), 001's per-item
-- loop, which gives later items what earlier ones stored. Both functions run with
-- enable_seqscan off: every lookup here is by a unique key.
-- Same inputs, same answers, in the same order: (idem_key, submission id, duplicate).

CREATE OR REPLACE FUNCTION relay_ingest_each(items jsonb)
RETURNS TABLE (idem_key text, submission_id uuid, duplicate boolean)
LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
SET enable_bitmapscan = off
AS $$
#variable_conflict use_column
DECLARE
    it       record;
    existing uuid;
    pid      bigint;
    fresh    integer := 0;
BEGIN
    FOR it IN
        SELECT x.id, x.idem_key, x.form, x.lead, x.identities, x.received_at
          FROM ROWS FROM (jsonb_to_recordset(items)
                   AS (id uuid, idem_key text, form text, lead jsonb, identities text[],
                       received_at timestamptz)) WITH ORDINALITY
               AS x(id, idem_key, form, lead, identities, received_at, ord)
         ORDER BY x.ord
    LOOP
        idem_key := it.idem_key;
        SELECT s.id INTO existing FROM submissions s WHERE s.idem_key = it.idem_key;
        IF existing IS NOT NULL THEN
            submission_id := existing; duplicate := true; RETURN NEXT; CONTINUE;
        END IF;

        SELECT min(i.person_id) INTO pid
          FROM unnest(it.identities) AS v JOIN identities i ON i.identity = v;
        IF pid IS NULL THEN
            INSERT INTO people DEFAULT VALUES RETURNING id INTO pid;
        END IF;
        INSERT INTO identities (identity, person_id)
             SELECT x, pid FROM unnest(it.identities) AS x ORDER BY x
        ON CONFLICT (identity) DO NOTHING;
        -- another transaction may have claimed these identities while we waited: theirs wins
        SELECT min(i.person_id) INTO pid
          FROM unnest(it.identities) AS v JOIN identities i ON i.identity = v;

        INSERT INTO submissions (id, idem_key, form, person_id, lead, received_at)
        VALUES (it.id, it.idem_key, it.form, pid, it.lead, it.received_at)
        ON CONFLICT ON CONSTRAINT submissions_idem_key_key DO NOTHING;
        IF NOT FOUND THEN
            SELECT s.id INTO existing FROM submissions s WHERE s.idem_key = it.idem_key;
            submission_id := existing; duplicate := true; RETURN NEXT; CONTINUE;
        END IF;

        INSERT INTO jobs (submission_id, person_id) VALUES (it.id, pid);
        fresh := fresh + 1;
        submission_id := it.id; duplicate := false; RETURN NEXT;
    END LOOP;
    IF fresh > 0 THEN
        PERFORM pg_notify('relay_jobs', fresh::text);
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION relay_ingest(items jsonb)
RETURNS TABLE (idem_key text, submission_id uuid, duplicate boolean)
LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
SET enable_bitmapscan = off
AS $$
#variable_conflict use_column
DECLARE
    simple   boolean;
    keys     text[];
    ids      uuid[];
    dups     boolean[];
    fresh    integer;
BEGIN
    SELECT count(DISTINCT x.idem_key) = count(*)
           AND bool_and(coalesce(cardinality(x.identities), 0) > 0)
           AND (SELECT count(DISTINCT v) = count(*)
                  FROM jsonb_array_elements(items) AS e, jsonb_array_elements_text(e->'identities') AS v)
      INTO simple
      FROM jsonb_to_recordset(items) AS x(idem_key text, identities text[]);
    IF NOT coalesce(simple, true) THEN
        RETURN QUERY SELECT * FROM relay_ingest_each(items);
        RETURN;
    END IF;

    -- 1. a person for every new item whose identities are all unknown; the identities
    WITH input AS (
        SELECT x.idem_key, x.identities
          FROM jsonb_to_recordset(items) AS x(idem_key text, identities text[])
         WHERE NOT EXISTS (SELECT 1 FROM submissions s WHERE s.idem_key = x.idem_key)
    ), known AS (
        SELECT i.identities,
               (SELECT min(d.person_id)
                  FROM unnest(i.identities) AS v JOIN identities d ON d.identity = v)
                   AS pid
          FROM input i
    ), assigned AS MATERIALIZED (
        SELECT k.identities, coalesce(k.pid, nextval('people_id_seq')) AS pid, k.pid IS NULL AS new
          FROM known k
    ), new_people AS (
        INSERT INTO people (id) SELECT a.pid FROM assigned a WHERE a.new
    )
    INSERT INTO identities (identity, person_id)
    SELECT v, a.pid FROM assigned a, unnest(a.identities) AS v ORDER BY v
    ON CONFLICT (identity) DO NOTHING;

    -- 2. a new snapshot: persons as committed by anyone, then submissions and their jobs
    WITH input AS (
        SELECT x.*
          FROM ROWS FROM (jsonb_to_recordset(items)
                   AS (id uuid, idem_key text, form text, lead jsonb, identities text[],
                       received_at timestamptz)) WITH ORDINALITY
               AS x(id, idem_key, form, lead, identities, received_at, ord)
    ), stored AS (
        SELECT i.ord, s.id FROM input i JOIN submissions s ON s.idem_key = i.idem_key
    ), added AS (
        INSERT INTO submissions (id, idem_key, form, person_id, lead, received_at)
        SELECT i.id, i.idem_key, i.form,
               (SELECT min(d.person_id)
                  FROM unnest(i.identities) AS v JOIN identities d ON d.identity = v),
               i.lead, i.received_at
          FROM input i
         WHERE NOT EXISTS (SELECT 1 FROM stored WHERE stored.ord = i.ord)
         ORDER BY i.idem_key
        ON CONFLICT ON CONSTRAINT submissions_idem_key_key DO NOTHING
        RETURNING id, person_id
    ), queued AS (
        INSERT INTO jobs (submission_id, person_id) SELECT a.id, a.person_id FROM added a
    )
    SELECT array_agg(i.idem_key ORDER BY i.ord),
           array_agg(coalesce(a.id, s.id) ORDER BY i.ord),
           array_agg(a.id IS NULL ORDER BY i.ord),
           count(a.id)
      INTO keys, ids, dups, fresh
      FROM input i
      LEFT JOIN added a ON a.id = i.id
      LEFT JOIN stored s ON s.ord = i.ord;

    -- 3. lost a race for its key to a transaction committed after step 2 began: the winner's id
    FOR n IN 1 .. coalesce(cardinality(keys), 0) LOOP
        IF ids[n] IS NULL THEN
            SELECT s.id INTO STRICT submission_id FROM submissions s WHERE s.idem_key = keys[n];
        ELSE
            submission_id := ids[n];
        END IF;
        idem_key := keys[n];
        duplicate := dups[n];
        RETURN NEXT;
    END LOOP;
    IF fresh > 0 THEN
        PERFORM pg_notify('relay_jobs', fresh::text);
    END IF;
END;
$$;
