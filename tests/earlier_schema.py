"""The SQLite schema of the versions before numbered migrations (node/migrations/), as they
created it: jobs without result_key and progress, series without the association counts, no
study selection tables. The migration tests adopt a database made with it."""

EARLIER_SQLITE_SCHEMA = """
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
    completed_at REAL
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
    updated_at REAL NOT NULL
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
    UNIQUE (job_id, destination)
);
CREATE TABLE IF NOT EXISTS counters (             -- only ever increase: Prometheus counters
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters SELECT 'series_completed', COUNT(*) FROM series WHERE completed_at IS NOT NULL;

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
CREATE INDEX IF NOT EXISTS volume_history_patient ON volume_history(patient, concept, study_date);"""
