-- Webhooks in: every delivery we accepted, one row per event in it (unique per source and event
-- key, so a re-delivery is a duplicate), the outbox that processes and forwards them, and the
-- local record of where each CRM lead stands.

-- The raw body of a delivery that brought at least one new event (bodies of pure repeats are not
-- kept twice). Selected headers are kept too: they are part of what was sent.
CREATE TABLE webhook_deliveries (
    id            uuid PRIMARY KEY,
    source        text NOT NULL,
    content_type  text,
    headers       jsonb NOT NULL DEFAULT '{}',
    raw           bytea NOT NULL,
    received_at   timestamptz NOT NULL
);

CREATE TABLE webhook_events (
    id            uuid PRIMARY KEY,
    delivery_id   uuid NOT NULL REFERENCES webhook_deliveries (id),
    source        text NOT NULL,               -- 'amocrm' | 'bitrix24' | 'generic/<name>'
    event_key     text NOT NULL,
    kind          text NOT NULL,               -- 'leads.status', 'oncrmdealupdate', 'message'
    entity_id     text,
    payload       jsonb NOT NULL,
    received_at   timestamptz NOT NULL,
    -- set once by the process job: 'applied' | 'echo' | 'forwarded-only'
    outcome       text,
    processed_at  timestamptz,
    UNIQUE (source, event_key)
);
CREATE INDEX webhook_events_entity ON webhook_events (source, entity_id);

-- The outbox. A 'process' job (destination '') applies the event to crm_lead_state, recognises
-- our own echoes and fans out one 'forward' job per destination; a forward job POSTs the event.
CREATE TABLE forward_jobs (
    id           bigserial PRIMARY KEY,
    event_id     uuid NOT NULL REFERENCES webhook_events (id),
    kind         text NOT NULL CHECK (kind IN ('process', 'forward')),
    destination  text NOT NULL DEFAULT '',
    state        text NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'running', 'done', 'dead')),
    attempts     integer NOT NULL DEFAULT 0,
    run_at       timestamptz NOT NULL DEFAULT now(),
    lease_owner  text,
    lease_until  timestamptz,
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (event_id, kind, destination)
);
CREATE INDEX forward_jobs_due ON forward_jobs (run_at) WHERE state = 'pending';
CREATE INDEX forward_jobs_running ON forward_jobs (lease_until) WHERE state = 'running';
CREATE INDEX forward_jobs_dead ON forward_jobs (updated_at) WHERE state = 'dead';

-- Where each CRM lead (amoCRM lead, Bitrix24 deal) stands, as the CRM last told us. Ids are
-- text: Bitrix24 stages are strings such as 'C1:NEW'.
CREATE TABLE crm_lead_state (
    crm          text NOT NULL,
    lead_id      bigint NOT NULL,
    pipeline_id  text,
    status_id    text,
    updated_at   timestamptz NOT NULL,          -- the CRM's change time (or the event's ts)
    event_id     uuid REFERENCES webhook_events (id),
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (crm, lead_id)
);
CREATE INDEX submissions_crm_lead ON submissions (crm_lead_id) WHERE crm_lead_id IS NOT NULL;

-- Accept a batch of webhook deliveries in one transaction (group commit).
-- items: [{id, source, content_type, headers, raw (base64), received_at,
--          rejected: null | {endpoint, errors},
--          events: [{id, key, kind, entity_id, payload}]}]
-- Returns one row per event: its id (the original one for a repeat) and whether it was a repeat;
-- a rejected delivery (kept in `rejected`) returns one row with a NULL key.
CREATE FUNCTION relay_events(items jsonb)
RETURNS TABLE (delivery_id uuid, event_key text, event_id uuid, duplicate boolean)
LANGUAGE plpgsql
-- every lookup here is by a unique key; a fresh table has no statistics and PL/pgSQL keeps the
-- first plan for the connection's life, so a sequential scan must never be chosen
SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    it        jsonb;
    ev        jsonb;
    kept      boolean;
    fresh     integer := 0;
BEGIN
    FOR it IN SELECT value FROM jsonb_array_elements(items) LOOP
        delivery_id := (it->>'id')::uuid;
        IF jsonb_typeof(it->'rejected') = 'object' THEN
            INSERT INTO rejected (id, endpoint, content_type, body, errors)
            VALUES (delivery_id, it->'rejected'->>'endpoint', it->>'content_type',
                    decode(it->>'raw', 'base64'), it->'rejected'->'errors')
            ON CONFLICT (id) DO NOTHING;
            event_key := NULL; event_id := NULL; duplicate := false; RETURN NEXT; CONTINUE;
        END IF;
        kept := false;
        FOR ev IN SELECT value FROM jsonb_array_elements(it->'events') LOOP
            event_key := ev->>'key';
            SELECT e.id INTO event_id FROM webhook_events e
             WHERE e.source = it->>'source' AND e.event_key = ev->>'key';
            IF event_id IS NOT NULL THEN
                duplicate := true; RETURN NEXT; CONTINUE;
            END IF;
            IF NOT kept THEN
                INSERT INTO webhook_deliveries (id, source, content_type, headers, raw, received_at)
                VALUES (delivery_id, it->>'source', it->>'content_type',
                        coalesce(it->'headers', '{}'), decode(it->>'raw', 'base64'),
                        (it->>'received_at')::timestamptz)
                ON CONFLICT (id) DO NOTHING;
                kept := true;
            END IF;
            INSERT INTO webhook_events (id, delivery_id, source, event_key, kind, entity_id,
                                        payload, received_at)
            VALUES ((ev->>'id')::uuid, delivery_id, it->>'source', ev->>'key', ev->>'kind',
                    ev->>'entity_id', ev->'payload', (it->>'received_at')::timestamptz)
            ON CONFLICT (source, event_key) DO NOTHING;
            IF NOT FOUND THEN
                -- a concurrent transaction stored it first: theirs is the original
                SELECT e.id INTO event_id FROM webhook_events e
                 WHERE e.source = it->>'source' AND e.event_key = ev->>'key';
                duplicate := true; RETURN NEXT; CONTINUE;
            END IF;
            INSERT INTO forward_jobs (event_id, kind) VALUES ((ev->>'id')::uuid, 'process');
            fresh := fresh + 1;
            event_id := (ev->>'id')::uuid; duplicate := false; RETURN NEXT;
        END LOOP;
    END LOOP;
    IF fresh > 0 THEN
        PERFORM pg_notify('relay_events', fresh::text);
    END IF;
END;
$$;
