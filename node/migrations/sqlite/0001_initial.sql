-- The whole schema of the versions before numbered migrations. Every statement is IF NOT EXISTS:
-- a database those versions made is adopted by this migration (store.adopt_earlier_sqlite first
-- adds the columns its tables lack), and keeps its rows.
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_instance_uid);
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    modality TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    series_description TEXT NOT NULL,
    body_part TEXT NOT NULL,
    manufacturer TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'receiving',      -- receiving | complete
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    released_at REAL,                             -- sending association ended, none since
    completed_at REAL,
    -- ended associations that sent instances of the series, and whether the last one ended in a
    -- normal release while no other association was sending it (node/series.py, quiet period)
    associations INTEGER NOT NULL DEFAULT 0,
    released_normally INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_instance_uid TEXT NOT NULL,
    rule TEXT NOT NULL,
    model TEXT NOT NULL,
    destinations TEXT NOT NULL,                   -- JSON list of destination names
    state TEXT NOT NULL DEFAULT 'queued',         -- queued | running | done | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    stages TEXT,                                  -- JSON {stage: seconds}
    result_dir TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    result_key TEXT,                              -- NULL: results per series; 'study/<uid>/<rule>' per study+rule
    progress TEXT,                                -- JSON {stage, n, of, started_at}: the stage a running job is in
    -- leases (issue 17): the node holding the claim now, and until when (its clock's time.time());
    -- both NULL when no claim is held; the holder renews it (node.leases)
    lease_owner TEXT,
    lease_expires DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    destination TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',        -- pending | done | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try_at REAL NOT NULL,
    error TEXT,
    updated_at REAL NOT NULL,
    lease_owner TEXT,                             -- as jobs' lease
    lease_expires DOUBLE PRECISION,
    UNIQUE (job_id, destination)
);
CREATE TABLE IF NOT EXISTS counters (             -- only ever increase: Prometheus counters
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO counters SELECT 'series_completed', COUNT(*) FROM series WHERE completed_at IS NOT NULL
    ON CONFLICT DO NOTHING;

-- pull jobs (issue 19): what `vesalius pull` asked for and how far each study got
CREATE TABLE IF NOT EXISTS pull_jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,                         -- a [[sources]] name
    query TEXT NOT NULL,                          -- JSON of node.pull.query.PullQuery
    state TEXT NOT NULL DEFAULT 'queued',         -- queued | running | paused | done | cancelled | failed
    error TEXT,
    requested_by TEXT NOT NULL,                   -- OS user or token name
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pull_studies (
    job_id INTEGER NOT NULL REFERENCES pull_jobs(id),
    study_instance_uid TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queried',        -- queried | retrieving | received | processed |
                                                  -- failed | cancelled
    reason TEXT,
    study_date TEXT NOT NULL DEFAULT '',
    modalities TEXT NOT NULL DEFAULT '',          -- of the series to pull, e.g. 'CT'
    received_at REAL,                             -- its last instance arrived (processed means after it)
    updated_at REAL NOT NULL,
    PRIMARY KEY (job_id, study_instance_uid)
);
CREATE TABLE IF NOT EXISTS pull_series (
    job_id INTEGER NOT NULL REFERENCES pull_jobs(id),
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queried',        -- queried | retrieving | received | failed
    reason TEXT,
    modality TEXT NOT NULL DEFAULT '',
    expected INTEGER,                             -- instances the source lists
    updated_at REAL NOT NULL,
    PRIMARY KEY (job_id, series_instance_uid)
);

-- longitudinal (issue 16): each structure's volume per pseudonymous patient (node.longitudinal)
CREATE TABLE IF NOT EXISTS volume_history (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    patient TEXT NOT NULL,                        -- pseudonym (deid_map patient_id), never the Patient ID
    study_instance_uid TEXT NOT NULL,
    study_date TEXT NOT NULL,                     -- YYYYMMDD, the study's own date
    structure TEXT NOT NULL,                      -- the model's name for it
    concept TEXT NOT NULL,                        -- its coded concept, scheme:value (what priors match on)
    volume_ml REAL NOT NULL,
    complete INTEGER NOT NULL,                    -- 0: the scan cuts the structure
    recorded_at REAL NOT NULL,
    PRIMARY KEY (job_id, structure)
);
CREATE INDEX IF NOT EXISTS volume_history_patient ON volume_history(patient, concept, study_date);

-- retention and de-identification (issue 9)
CREATE TABLE IF NOT EXISTS removals (             -- what retention removed, so no row lies
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,                           -- spool | results
    series_instance_uid TEXT NOT NULL,
    study_instance_uid TEXT,
    job_id INTEGER,                               -- kind results: the job whose result_dir went
    path TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    reason TEXT NOT NULL,
    removed_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS removals_job ON removals(job_id);
CREATE INDEX IF NOT EXISTS removals_series ON removals(series_instance_uid);
-- a job that runs again has fresh results: its removal mark no longer applies
CREATE TRIGGER IF NOT EXISTS removals_cleared_by_rerun AFTER UPDATE OF result_dir ON jobs
BEGIN DELETE FROM removals WHERE kind='results' AND job_id=NEW.id; END;
CREATE TABLE IF NOT EXISTS deid_map (             -- original <-> pseudonym, for re-identification
    kind TEXT NOT NULL,                           -- uid | patient_id | patient_name | accession | date_offset
    original TEXT NOT NULL,
    pseudonym TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (kind, original),
    UNIQUE (kind, pseudonym)
);

-- evaluations (issue 15): a job's figures against a reference (`vesalius evaluate`)
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    reference TEXT NOT NULL,                      -- what it was compared with: a SEG's UID, a file name
    figures TEXT NOT NULL,                        -- JSON of inference.evaluation.Evaluation.to_json()
    via TEXT NOT NULL,                            -- http | cli
    evaluated_at TEXT NOT NULL                    -- ISO 8601 UTC
);
CREATE INDEX IF NOT EXISTS evaluations_job ON evaluations(job_id);

-- learning (issue 16): corrections received back (node.corrections), the case library (node.cases)
CREATE TABLE IF NOT EXISTS corrections (
    series_instance_uid TEXT PRIMARY KEY,         -- the received SEG series
    sop_instance_uid TEXT,
    source_series_uid TEXT,                       -- the series it segments (ReferencedSeriesSequence)
    job_id INTEGER REFERENCES jobs(id),           -- the job it corrects (NULL: flagged, no job)
    model TEXT,
    model_version TEXT,                           -- the version that wrote the corrected result
    state TEXT NOT NULL,                          -- recognised | flagged | ignored (ours)
    verdict TEXT,                                 -- accepted | amended | rejected
    reason TEXT,                                  -- why it was flagged or ignored
    structures TEXT,                              -- JSON: per structure verdict, Dice, volume change
    evaluation_id INTEGER,
    recognised_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS corrections_job ON corrections(job_id);
CREATE INDEX IF NOT EXISTS series_sop_class ON series(sop_class_uid);  -- the SEG series a correction may be
CREATE TABLE IF NOT EXISTS cases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    correction_series_uid TEXT NOT NULL UNIQUE REFERENCES corrections(series_instance_uid),
    job_id INTEGER NOT NULL,
    patient TEXT NOT NULL,                        -- pseudonym (deid_map), never the Patient ID
    folder TEXT NOT NULL,                         -- under data_dir/cases
    modality TEXT NOT NULL,
    manufacturer TEXT NOT NULL,
    scanner_model TEXT NOT NULL,
    body_part TEXT NOT NULL,
    slice_thickness REAL,
    contrast INTEGER NOT NULL,
    structures TEXT NOT NULL,                     -- JSON list of structure names
    model TEXT NOT NULL,
    model_version TEXT,
    agreement REAL,                               -- mean Dice of ours against the correction
    created_at TEXT NOT NULL                      -- ISO 8601 UTC
);

-- study-level selection (issue 18): what selection read from each completed series' headers
-- (routing.SeriesFacts as JSON), when each study was last selected, and why each of its series
-- was chosen or skipped by each study rule
CREATE TABLE IF NOT EXISTS series_facts (
    series_instance_uid TEXT PRIMARY KEY,
    facts TEXT NOT NULL,                          -- JSON of routing.SeriesFacts
    read_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS series_study ON series(study_instance_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    selected_at REAL NOT NULL                     -- the study rules last chose its series
);
CREATE TABLE IF NOT EXISTS selections (
    study_instance_uid TEXT NOT NULL,
    rule TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    decision TEXT NOT NULL,                       -- chosen | skipped
    reason TEXT NOT NULL,
    decided_at REAL NOT NULL,
    PRIMARY KEY (study_instance_uid, rule, series_instance_uid)
);

-- the audit trail (node/audit.py): append-only, the triggers refuse UPDATE and DELETE
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,            -- ISO 8601, UTC
    event TEXT NOT NULL,           -- EventID, e.g. 'DICOM Instances Transferred'
    event_type TEXT,               -- EventTypeCode, e.g. 'Application Start'
    action TEXT,                   -- EventActionCode: C R U D E
    outcome INTEGER NOT NULL,      -- EventOutcomeIndicator: 0 4 8 12
    user TEXT,                     -- calling AE, token name, OS user, or our AE title
    address TEXT,                  -- the peer's network address
    details TEXT NOT NULL          -- JSON object: UIDs, counts, model, destination
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;

-- the dashboard's filtered, keyset-paginated listings stay fast at 100 000 jobs
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, id);
CREATE INDEX IF NOT EXISTS jobs_series ON jobs(series_instance_uid, id);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at);
CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries(state, id);
CREATE INDEX IF NOT EXISTS series_ae ON series(calling_ae, last_received);
CREATE INDEX IF NOT EXISTS series_last ON series(last_received);

-- several nodes sharing one database (issue 17, docs/scale-out.md): who is alive, and which
-- associations are storing instances of which series right now, on any listener
CREATE TABLE IF NOT EXISTS nodes (
    node_name TEXT PRIMARY KEY,                   -- Config.node_name (or the host name)
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL           -- renewed by its heartbeat every lease_seconds/3
);
CREATE TABLE IF NOT EXISTS open_associations (
    node_name TEXT NOT NULL,                      -- the listener it is open at
    association TEXT NOT NULL,                    -- unique within that listener while open
    series_instance_uid TEXT NOT NULL,            -- a series it has stored instances of
    last_seen DOUBLE PRECISION NOT NULL,          -- renewed by the listener's heartbeat
    PRIMARY KEY (node_name, association, series_instance_uid)
);
CREATE INDEX IF NOT EXISTS open_associations_series ON open_associations(series_instance_uid);
