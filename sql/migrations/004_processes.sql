-- Live crm-relay processes, one row each, beaten every few seconds. Without Redis (or while it
-- is down) every process that sends to the CRM takes limit ÷ live senders; a row not beaten for
-- ~3 beats is a dead process.
CREATE TABLE processes (
    id          bigserial PRIMARY KEY,          -- order of joining: the rank for the shares
    name        text NOT NULL UNIQUE,           -- host:pid:random (also application_name)
    sends       boolean NOT NULL,               -- runs a delivery worker: counts for the shares
    mode        text NOT NULL,                  -- 'redis' | 'local-share' | 'single'
    started_at  timestamptz NOT NULL DEFAULT now(),
    beat_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX processes_beat ON processes (beat_at);
