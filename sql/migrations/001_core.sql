-- Core tables: submissions and their outbox jobs, people (identity groups) and their CRM links.

CREATE TABLE people (
    id              bigserial PRIMARY KEY,
    -- the CRM link: which contact and which open lead this person has in the CRM
    crm_contact_id  bigint,
    crm_lead_id     bigint,
    -- a person is delivered by at most one worker at a time, across processes
    lease_owner     text,
    lease_until     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE identities (
    identity   text PRIMARY KEY,              -- 'phone:+77011234567' | 'email:a@b.kz'
    person_id  bigint NOT NULL REFERENCES people (id)
);
CREATE INDEX identities_person ON identities (person_id);

CREATE TABLE submissions (
    id              uuid PRIMARY KEY,
    idem_key        text NOT NULL UNIQUE,
    form            text NOT NULL,
    person_id       bigint REFERENCES people (id),
    lead            jsonb NOT NULL,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'dead')),
    crm_contact_id  bigint,
    crm_lead_id     bigint,
    received_at     timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz
);
CREATE INDEX submissions_form ON submissions (form, received_at);
CREATE INDEX submissions_person ON submissions (person_id);

CREATE TABLE jobs (
    id             bigserial PRIMARY KEY,
    kind           text NOT NULL DEFAULT 'deliver',
    submission_id  uuid NOT NULL REFERENCES submissions (id),
    person_id      bigint NOT NULL REFERENCES people (id),
    state          text NOT NULL DEFAULT 'pending'
                   CHECK (state IN ('pending', 'running', 'done', 'dead')),
    attempts       integer NOT NULL DEFAULT 0,
    run_at         timestamptz NOT NULL DEFAULT now(),
    lease_owner    text,
    lease_until    timestamptz,
    last_error     text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX jobs_due ON jobs (run_at) WHERE state = 'pending';
CREATE INDEX jobs_running ON jobs (lease_until) WHERE state = 'running';
CREATE INDEX jobs_person_open ON jobs (person_id) WHERE state IN ('pending', 'running');
CREATE INDEX jobs_dead ON jobs (updated_at) WHERE state = 'dead';

-- Bad input is answered, never lost: what was sent is kept here for inspection.
CREATE TABLE rejected (
    id            uuid PRIMARY KEY,
    endpoint      text NOT NULL,
    content_type  text,
    body          bytea NOT NULL,
    errors        jsonb NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now()
);

-- OAuth pairs: a refresh token is single-use, so the new pair is stored before it is used.
CREATE TABLE oauth_tokens (
    crm            text PRIMARY KEY,
    access_token   text NOT NULL,
    refresh_token  text NOT NULL,
    expires_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Accept a batch of submissions in one transaction (group commit).
-- items: [{id, idem_key, form, lead, identities: [...], received_at}]
-- Returns one row per item: the submission id (the original one for a repeat) and whether it
-- was a repeat. Person resolution: the lowest person id among the item's known identities,
-- else a new person; identities are inserted in sorted order so concurrent batches lock them
-- in one order.
CREATE FUNCTION relay_ingest(items jsonb)
RETURNS TABLE (idem_key text, submission_id uuid, duplicate boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    it      jsonb;
    existing uuid;
    pid     bigint;
    fresh   integer := 0;
BEGIN
    FOR it IN SELECT value FROM jsonb_array_elements(items) LOOP
        idem_key := it->>'idem_key';
        SELECT s.id INTO existing FROM submissions s WHERE s.idem_key = it->>'idem_key';
        IF existing IS NOT NULL THEN
            submission_id := existing; duplicate := true; RETURN NEXT; CONTINUE;
        END IF;

        SELECT min(i.person_id) INTO pid FROM identities i
         WHERE i.identity IN (SELECT jsonb_array_elements_text(it->'identities'));
        IF pid IS NULL THEN
            INSERT INTO people DEFAULT VALUES RETURNING id INTO pid;
        END IF;
        INSERT INTO identities (identity, person_id)
             SELECT x, pid FROM jsonb_array_elements_text(it->'identities') AS x ORDER BY x
        ON CONFLICT (identity) DO NOTHING;
        -- another transaction may have claimed these identities while we waited: theirs wins
        SELECT min(i.person_id) INTO pid FROM identities i
         WHERE i.identity IN (SELECT jsonb_array_elements_text(it->'identities'));

        INSERT INTO submissions (id, idem_key, form, person_id, lead, received_at)
        VALUES ((it->>'id')::uuid, it->>'idem_key', it->>'form', pid, it->'lead',
                (it->>'received_at')::timestamptz)
        ON CONFLICT ON CONSTRAINT submissions_idem_key_key DO NOTHING;
        IF NOT FOUND THEN
            SELECT s.id INTO existing FROM submissions s WHERE s.idem_key = it->>'idem_key';
            submission_id := existing; duplicate := true; RETURN NEXT; CONTINUE;
        END IF;

        INSERT INTO jobs (submission_id, person_id) VALUES ((it->>'id')::uuid, pid);
        fresh := fresh + 1;
        submission_id := (it->>'id')::uuid; duplicate := false; RETURN NEXT;
    END LOOP;
    IF fresh > 0 THEN
        PERFORM pg_notify('relay_jobs', fresh::text);
    END IF;
END;
$$;
