-- Operations: discarded dead letters, and indexes for the dashboard's and the metrics' reads.

-- A dead letter an operator decided not to deliver. The job stays 'dead' (the jobs state list
-- and every query over it are unchanged); this row is the decision, with who-knows-why.
CREATE TABLE discarded_jobs (
    job_id        bigint PRIMARY KEY REFERENCES jobs (id),
    note          text NOT NULL DEFAULT '',
    discarded_at  timestamptz NOT NULL DEFAULT now()
);

-- A blanket replay (`crm-relay replay` with no ids, or the admin's replay-by-filter) must never
-- resend a lead an operator discarded: a discarded dead job cannot leave 'dead' until its
-- discard row is deleted (which the admin's replay-one does, in the same transaction).
CREATE FUNCTION relay_keep_discarded() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM discarded_jobs d WHERE d.job_id = OLD.id) THEN
        RETURN NULL;  -- skip this row: the UPDATE (and its RETURNING) leaves it out
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER jobs_keep_discarded
    BEFORE UPDATE OF state ON jobs
    FOR EACH ROW
    WHEN (OLD.state = 'dead' AND NEW.state <> 'dead')
    EXECUTE FUNCTION relay_keep_discarded();

-- the dashboard's hour of history and the attempts histogram read finished jobs by time/attempts
CREATE INDEX jobs_finished ON jobs (updated_at) WHERE state IN ('done', 'dead');
CREATE INDEX jobs_finished_attempts ON jobs (state, attempts) WHERE state IN ('done', 'dead');
