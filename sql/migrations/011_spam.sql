-- Spam: submissions a form's spam controls caught (honeypot, fill time, CAPTCHA, client rate).
--
-- Kept apart from `submissions` on purpose: a spam row takes no idempotency key, so a person
-- whose first try was caught (an autofill faster than the minimum fill time) and who sends the
-- same form again is not answered "duplicate" of the caught one. A spam row has no job and is
-- never delivered; an operator's release writes it into `submissions` (with its job) under the
-- key it would have had, in the same transaction that marks it released, so it is delivered once.
-- Repeats of the same content (`content_key`, the hash of the normalised lead) are kept once.
CREATE TABLE spam (
    id                      uuid PRIMARY KEY,
    content_key             text NOT NULL UNIQUE,
    idem_key                text NOT NULL,           -- the submission key a release stores it under
    form                    text NOT NULL,
    reason                  text NOT NULL,           -- honeypot | too_fast | no_render_time | captcha_* | rate_limited
    client                  text,                    -- the client address the rate limit counted
    lead                    jsonb NOT NULL,
    identities              text[] NOT NULL DEFAULT '{}',
    received_at             timestamptz NOT NULL,
    released_at             timestamptz,
    released_submission_id  uuid
);
CREATE INDEX spam_received ON spam (received_at);
CREATE INDEX spam_identities ON spam USING gin (identities);

-- Retention (service/ops/retention.py) deletes by age, and deletes jobs and forward jobs by the
-- row they belong to: without these it would read whole tables.
CREATE INDEX IF NOT EXISTS rejected_received ON rejected (received_at);
CREATE INDEX IF NOT EXISTS submissions_received ON submissions (received_at);
CREATE INDEX IF NOT EXISTS webhook_events_received ON webhook_events (received_at);
CREATE INDEX IF NOT EXISTS webhook_deliveries_received ON webhook_deliveries (received_at);
CREATE INDEX IF NOT EXISTS forward_jobs_event ON forward_jobs (event_id);
CREATE INDEX IF NOT EXISTS jobs_submission ON jobs (submission_id);

-- The digits of a raw body as a person wrote them, for finding a phone however it was typed:
-- percent-escapes go first (the "20" of a urlencoded space is not part of the number).
CREATE FUNCTION relay_digits(body text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT regexp_replace(regexp_replace(body, '%[0-9A-Fa-f]{2}', '', 'g'), '[^0-9]', '', 'g') $$;
