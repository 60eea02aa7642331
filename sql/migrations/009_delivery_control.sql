-- Pausing delivery is the operator's word for the whole cluster (service/delivery_control.py):
-- one row, changed by the admin API, followed by every process that runs a worker.
CREATE TABLE IF NOT EXISTS delivery_control (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    paused boolean NOT NULL DEFAULT false,
    changed_at timestamptz NOT NULL DEFAULT now(),
    changed_by text NOT NULL DEFAULT ''
);
INSERT INTO delivery_control (id) VALUES (true) ON CONFLICT DO NOTHING;
