"""Series completion: a series is complete after its association ended and a quiet period passed,
or, when instances arrive over several associations, after a longer stability timeout."""

from __future__ import annotations

import logging
import time

from vesalius.node.config import Config
from vesalius.node.routing import routes_for
from vesalius.node.store import Store

log = logging.getLogger("vesalius.series")


def complete_due_series(store: Store, config: Config, now: float | None = None) -> list[str]:
    """Mark due series complete and queue their jobs in the same transaction; returns their UIDs."""
    now = time.time() if now is None else now
    done: list[str] = []
    with store.transaction() as db:
        rows = db.execute(
            """SELECT * FROM series WHERE state='receiving' AND (
                   (released_at IS NOT NULL AND ? - released_at >= ? AND ? - last_received >= ?)
                   OR ? - last_received >= ?)""",
            (now, config.quiet_period, now, config.quiet_period, now, config.stability_timeout),
        ).fetchall()
        for row in rows:
            uid = row["series_instance_uid"]
            db.execute("UPDATE series SET state='complete', completed_at=? WHERE series_instance_uid=?",
                       (now, uid))
            store.bump(db, "series_completed")  # a late instance reopens a series; this stays counted
            count = db.execute("SELECT COUNT(*) FROM instances WHERE series_instance_uid=?",
                               (uid,)).fetchone()[0]
            routes = routes_for(config, dict(row))
            for route in routes:
                job_id = store.add_job(db, uid, route.rule, route.model, route.destinations)
                log.info("series complete series=%s instances=%d job=%d rule=%s model=%s",
                         uid, count, job_id, route.rule, route.model)
            if not routes:
                log.info("series complete series=%s instances=%d modality=%s: no rule matches, stored only",
                         uid, count, row["modality"])
            done.append(uid)
    return done
