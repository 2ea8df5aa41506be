"""Pull jobs in the store: create, pause, resume, cancel, list. The runner (node.pull.runner)
moves them on; everything here is one transaction, so the CLI and the HTTP API can act on a
job while the node runs it."""

from __future__ import annotations

import time
from typing import Any

from vesalius.node import audit
from vesalius.node.pull.query import PullQuery
from vesalius.node.store import Store

JOB_STATES = ("queued", "running", "paused", "done", "cancelled", "failed")
STUDY_STATES = ("queried", "retrieving", "received", "processed", "failed", "cancelled")
ACTIONS = {  # action -> (states it applies to, the state it leaves)
    "pause": (("queued", "running"), "paused"),
    "resume": (("paused",), "running"),
    "cancel": (("queued", "running", "paused"), "cancelled"),
    "retry": (("done", "failed"), "running"),  # its failed studies (or its failed query) once more
}


def create_job(store: Store, source: str, query: PullQuery, requested_by: str) -> int:
    now = time.time()
    with store.transaction() as db:
        return db.insert("INSERT INTO pull_jobs (source, query, requested_by, created_at, updated_at) "
                         "VALUES (?,?,?,?,?)", (source, query.to_json(), requested_by, now, now))


def act(store: Store, job_id: int, action: str) -> tuple[int, dict[str, Any]]:
    """Pause, resume, cancel or retry a job: (HTTP-like status, answer). Cancelling marks the
    studies not yet received cancelled; a retrieval in flight stops after its current exchange.
    Retrying a finished job queues its failed studies again (only what is missing is fetched)."""
    allowed, new_state = ACTIONS[action]
    now = time.time()
    with store.transaction() as db:
        row = db.execute("SELECT state FROM pull_jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            return 404, {"error": f"no pull job {job_id}"}
        if row["state"] not in allowed:
            return 409, {"error": f"pull job {job_id} is {row['state']}; {action} applies to "
                                  f"{' or '.join(allowed)} jobs"}
        if action in ("resume", "retry"):  # a job paused (or failed) before its query ran still needs it
            queried = db.execute("SELECT 1 FROM pull_studies WHERE job_id=? LIMIT 1", (job_id,)).fetchone()
            new_state = "running" if queried else "queued"
        if action == "retry":
            for table in ("pull_studies", "pull_series"):
                db.execute(f"UPDATE {table} SET state='queried', reason=NULL, updated_at=? "
                           "WHERE job_id=? AND state='failed'", (now, job_id))
            db.execute("UPDATE pull_jobs SET error=NULL WHERE id=?", (job_id,))
        db.execute("UPDATE pull_jobs SET state=?, updated_at=? WHERE id=?", (new_state, now, job_id))
        if action == "cancel":
            for table in ("pull_studies", "pull_series"):
                db.execute(f"UPDATE {table} SET state='cancelled', reason='cancelled by operator', "
                           "updated_at=? WHERE job_id=? AND state IN ('queried', 'retrieving')",
                           (now, job_id))
    return 200, {"pull": job_id, "state": new_state}


def record_action(trail: audit.Audit, user: str, via: str, command: str, job: int, status: int,
                  address: str | None = None) -> None:
    """An operator's pull command in the audit trail, like retry and resend."""
    trail.record(audit.OPERATOR_ACTION, outcome=audit.SUCCESS if status == 200 else audit.MINOR_FAILURE,
                 action="E", user=user, address=address, via=via, command=command, pull=job, status=status)


def listing(store: Store, limit: int = 500) -> list[dict[str, Any]]:
    """The newest pull jobs, each with its query (identifying criteria only as "(given)") and
    how many of its studies are in each state."""
    return [_shaped(store, row) for row in store.query("SELECT * FROM pull_jobs ORDER BY id DESC LIMIT ?",
                                                       (limit,))]


def _shaped(store: Store, row: Any) -> dict[str, Any]:
    counts = {r["state"]: r["n"] for r in store.query(
        "SELECT state, COUNT(*) AS n FROM pull_studies WHERE job_id=? GROUP BY state", (row["id"],))}
    report = store.data_dir / "pulls" / str(int(row["id"])) / "cohort.html"  # node.pull.cohort
    return {"id": row["id"], "source": row["source"], "query": PullQuery.from_json(row["query"]).shown(),
            "report": str(report) if report.is_file() else None,
            "state": row["state"], "error": row["error"], "requested_by": row["requested_by"],
            "studies": {s: int(counts.get(s, 0)) for s in STUDY_STATES},
            "created_at": audit.utc_iso(row["created_at"]), "updated_at": audit.utc_iso(row["updated_at"])}


def studies(store: Store, job_id: int) -> list[dict[str, Any]]:
    """One job's studies with their state, reason and series counts."""
    out = []
    for row in store.query("SELECT * FROM pull_studies WHERE job_id=? "
                           "ORDER BY study_date, study_instance_uid", (job_id,)):
        series = store.query("SELECT state, expected FROM pull_series "
                             "WHERE job_id=? AND study_instance_uid=?", (job_id, row["study_instance_uid"]))
        out.append({"study_instance_uid": row["study_instance_uid"], "state": row["state"],
                    "reason": row["reason"], "study_date": row["study_date"],
                    "modalities": row["modalities"].split("\\") if row["modalities"] else [],
                    "series": len(series), "series_received": sum(s["state"] == "received" for s in series),
                    "instances_expected": sum(s["expected"] or 0 for s in series),
                    "updated_at": audit.utc_iso(row["updated_at"])})
    return out


def job(store: Store, job_id: int) -> dict[str, Any] | None:
    """One job as ``listing`` shows it, with its studies."""
    rows = store.query("SELECT * FROM pull_jobs WHERE id=?", (job_id,))
    return {**_shaped(store, rows[0]), "study_list": studies(store, job_id)} if rows else None
