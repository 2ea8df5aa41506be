-- background duties (pull runner, correction recognition, retention) run by one node at a time:
-- a lease like a job's, renewed by the holder's heartbeat (node/leases.py, docs/scale-out.md)
CREATE TABLE IF NOT EXISTS duties (
    name TEXT PRIMARY KEY,                        -- pull | corrections | retention
    owner TEXT NOT NULL,                          -- node_name of the holder
    expires DOUBLE PRECISION NOT NULL             -- epoch s; another node takes it after this
);
