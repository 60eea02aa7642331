-- Alerts said once per cluster: a process about to announce a cluster-wide condition (dead
-- letters, delivery lag, CRM circuit) claims it here first; the claim is refused while another
-- process said the same thing (firing, or resolved) less than ALERT_INTERVAL_S ago.
CREATE TABLE IF NOT EXISTS alert_claims (
    condition text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('firing', 'resolved')),
    sent_at timestamptz NOT NULL,
    sent_by text NOT NULL,
    PRIMARY KEY (condition, kind)
);
