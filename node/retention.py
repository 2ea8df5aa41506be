"""Retention: received series and results are removed once they have served their purpose, and
the oldest of them first when free space falls below a high-water mark, so the disk never fills
silently.

Two steps: ``plan`` decides from the database, the file sizes, a clock ``now`` and the free space
what may go (never a series still receiving, a queued or running job, a pending or failed
delivery); ``apply`` removes it, each item in its own transaction that checks the item is still
eligible, removes or marks its rows, and only then deletes its files.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from vesalius.inference.series import decoded
from vesalius.node.config import Retention
from vesalius.node.database import Connection
from vesalius.node.store import Store

log = logging.getLogger("vesalius.retention")

DAY = 86400.0

# Series whose spool may go: complete, no job queued/running, no delivery pending/failed.
# ``done_at``: when the last of its jobs and deliveries settled (its completion if it has none).
SPOOL_CANDIDATES = """
SELECT s.series_instance_uid, s.study_instance_uid, s.completed_at,
       (SELECT COUNT(*) FROM jobs j WHERE j.series_instance_uid=s.series_instance_uid) AS jobs,
       GREATEST(s.completed_at,
           COALESCE((SELECT MAX(j.updated_at) FROM jobs j
                     WHERE j.series_instance_uid=s.series_instance_uid), 0),
           COALESCE((SELECT MAX(d.updated_at) FROM deliveries d JOIN jobs j ON j.id=d.job_id
                     WHERE j.series_instance_uid=s.series_instance_uid), 0)) AS done_at
FROM series s
WHERE s.state='complete' AND s.series_instance_uid IN ({where})
  AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_instance_uid=s.series_instance_uid
                  AND j.state IN ('queued', 'running'))
  AND NOT EXISTS (SELECT 1 FROM deliveries d JOIN jobs j ON j.id=d.job_id
                  WHERE j.series_instance_uid=s.series_instance_uid AND d.state IN ('pending', 'failed'))
"""
# Jobs whose results may go: done, results not yet removed, no delivery pending/failed. A results
# folder is per (series, model), so a series received again writes its new job's results into the
# same folder: the folder is decided by its newest job, and only when no job using it still works.
RESULTS_CANDIDATES = """
SELECT j.id, j.series_instance_uid, j.result_dir,
       GREATEST(j.updated_at, COALESCE((SELECT MAX(d.updated_at) FROM deliveries d WHERE d.job_id=j.id), 0))
           AS done_at
FROM jobs j
WHERE j.state='done' AND j.result_dir IS NOT NULL AND j.id IN ({where})
  AND NOT EXISTS (SELECT 1 FROM removals r WHERE r.kind='results' AND r.job_id=j.id)
  AND NOT EXISTS (SELECT 1 FROM jobs o WHERE o.result_dir=j.result_dir AND o.id>j.id)
  AND NOT EXISTS (SELECT 1 FROM jobs o WHERE o.result_dir=j.result_dir AND o.state IN ('queued', 'running'))
  AND NOT EXISTS (SELECT 1 FROM deliveries d JOIN jobs o ON o.id=d.job_id
                  WHERE o.result_dir=j.result_dir AND d.state IN ('pending', 'failed'))
"""
ALL_SERIES = "SELECT series_instance_uid FROM series"
ALL_JOBS = "SELECT id FROM jobs"


@dataclass(frozen=True)
class Removal:
    """One thing retention removes: a series' spool folder or a job's results folder."""

    kind: str  # spool | results
    series_instance_uid: str
    job_id: int | None
    path: str
    bytes: int  # disk space it occupies (allocated blocks)
    done_at: float  # when its work settled: the age rules and "oldest first" count from here
    reason: str  # age | free_space


@dataclass(frozen=True)
class Plan:
    removals: tuple[Removal, ...]
    free_bytes: int  # before
    high_water_bytes: int

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.removals)


def disk_bytes(path: Path) -> int:
    """Space a file or folder occupies on disk (what removing it frees)."""
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _inside(path: Path, root: Path) -> bool:
    """A folder recorded in the database is removed only if it lies inside the node's own folder."""
    return path.resolve().is_relative_to(root.resolve()) and path.resolve() != root.resolve()


def _candidates(store: Store) -> list[tuple[str, Removal]]:
    """Everything that may be removed at all, each with the age rule that applies to it
    (spool_days, unrouted_days or results_days)."""
    found: list[tuple[str, Removal]] = []
    for row in store.query(SPOOL_CANDIDATES.format(where=ALL_SERIES)):
        uid = row["series_instance_uid"]
        folder = store.spool_series_dir(row["study_instance_uid"], uid)
        size = sum(disk_bytes(Path(r["path"])) for r in store.query(
            "SELECT path FROM instances WHERE series_instance_uid=?", (uid,)))
        rule = "spool_days" if row["jobs"] else "unrouted_days"
        found.append((rule, Removal("spool", uid, None, str(folder), size, float(row["done_at"]), "")))
    for row in store.query(RESULTS_CANDIDATES.format(where=ALL_JOBS)):
        folder = Path(row["result_dir"])
        if not _inside(folder, store.results_dir):
            log.warning("job %d: result_dir outside %s, left alone", row["id"], store.results_dir)
            continue
        found.append(("results_days", Removal("results", row["series_instance_uid"], int(row["id"]),
                                              str(folder), disk_bytes(folder), float(row["done_at"]), "")))
    return found


def plan(store: Store, rules: Retention, now: float, free_bytes: int) -> Plan:
    """What to remove at ``now`` with ``free_bytes`` free: everything past its age, then, while the
    projected free space is below the high-water mark, the oldest remaining eligible items."""
    chosen: list[Removal] = []
    rest: list[Removal] = []
    for rule, item in sorted(_candidates(store), key=lambda c: (c[1].done_at, c[1].kind, c[1].path)):
        limit = float(getattr(rules, rule))
        if limit > 0 and now - item.done_at >= limit * DAY:
            chosen.append(replace(item, reason="age"))
        else:
            rest.append(item)
    mark = rules.free_space_high_water_mb * 2**20
    projected = free_bytes + sum(r.bytes for r in chosen)
    for item in rest:  # oldest first
        if projected >= mark:
            break
        chosen.append(replace(item, reason="free_space"))
        projected += item.bytes
    return Plan(tuple(chosen), free_bytes, mark)


def free_bytes(store: Store) -> int:
    return shutil.disk_usage(store.data_dir).free


def apply(store: Store, chosen: Plan, now: float) -> list[Removal]:
    """Remove what the plan chose and is still eligible; returns what was removed."""
    done: list[Removal] = []
    for item in chosen.removals:
        try:
            remove = _remove_spool if item.kind == "spool" else _remove_results
            removed = remove(store, item, now)
        except OSError as err:  # the rows stay marked; the next cleanup retries the files
            log.warning("cleanup could not remove %s: %s", item.path, err)
            continue
        if removed:
            done.append(item)
    return done


def _still_eligible(db: Connection, sql: str, key: Any) -> bool:
    return db.execute(sql.format(where="?"), (key,)).fetchone() is not None


def _remove_spool(store: Store, item: Removal, now: float) -> bool:
    """Rows first (one transaction, re-checked), then exactly the files those rows named: a file
    that a new association writes meanwhile has no deleted row and stays."""
    with store.transaction() as db:
        if not _still_eligible(db, SPOOL_CANDIDATES, item.series_instance_uid):
            return False
        series = db.execute("SELECT study_instance_uid FROM series WHERE series_instance_uid=?",
                            (item.series_instance_uid,)).fetchone()
        paths = [r[0] for r in db.execute("SELECT path FROM instances WHERE series_instance_uid=?",
                                          (item.series_instance_uid,))]
        db.execute("DELETE FROM instances WHERE series_instance_uid=?", (item.series_instance_uid,))
        db.execute("DELETE FROM series WHERE series_instance_uid=?", (item.series_instance_uid,))
        _record(db, item, series["study_instance_uid"], now)
    for path in paths:
        file = Path(path)
        if _inside(file, store.spool_dir):
            file.unlink(missing_ok=True)
    for folder_of_files in {Path(path).parent for path in paths}:
        if _inside(folder_of_files, store.spool_dir):
            decoded.remove_folder(folder_of_files)  # the pixels decoded while they arrived, if any
    folder = Path(item.path)
    for empty in (folder, folder.parent):  # the series folder, then the study folder, if empty
        if _inside(empty, store.spool_dir):
            try:
                empty.rmdir()
            except OSError:
                break  # not empty (another series of the study, or a file arriving): keep it
    return True


def _remove_results(store: Store, item: Removal, now: float) -> bool:
    """Mark the job's results removed (so resend says why), then delete the folder."""
    with store.transaction() as db:
        if not _still_eligible(db, RESULTS_CANDIDATES, item.job_id):
            return False
        sharing = db.execute("SELECT id FROM jobs j WHERE result_dir=? AND NOT EXISTS (SELECT 1 FROM "
                             "removals r WHERE r.kind='results' AND r.job_id=j.id)", (item.path,))
        for (job_id,) in sharing.fetchall():  # the earlier jobs that wrote this folder lose it too
            _record(db, replace(item, job_id=job_id), None, now)
    if Path(item.path).exists():
        shutil.rmtree(item.path)
    try:
        Path(item.path).parent.rmdir()  # results/<series>/ once its last model's folder is gone
    except OSError:
        pass
    return True


def _record(db: Connection, item: Removal, study_uid: str | None, now: float) -> None:
    db.execute("INSERT INTO removals (kind, series_instance_uid, study_instance_uid, job_id, path, bytes, "
               "reason, removed_at) VALUES (?,?,?,?,?,?,?,?)",
               (item.kind, item.series_instance_uid, study_uid, item.job_id, item.path, item.bytes,
                item.reason, now))


def cleanup(store: Store, rules: Retention, *, dry_run: bool = False, now: float | None = None,
            free: int | None = None) -> dict[str, Any]:
    """Plan and (unless ``dry_run``) remove; the report lists each item and the bytes freed."""
    now = time.time() if now is None else now
    chosen = plan(store, rules, now, free_bytes(store) if free is None else free)
    removed = list(chosen.removals) if dry_run else apply(store, chosen, now)
    if not dry_run:
        _sweep_stale_copies(store)
    for item in removed if not dry_run else ():
        log.info("cleanup removed %s series=%s job=%s bytes=%d reason=%s", item.kind,
                 item.series_instance_uid, item.job_id if item.job_id is not None else "-", item.bytes,
                 item.reason)
    left = chosen.free_bytes + sum(r.bytes for r in removed)
    if left < chosen.high_water_bytes:  # said out loud: the disk must not fill silently
        log.warning("free space %d MB stays below the high-water mark of %d MB: nothing more may be "
                    "removed (series receiving, jobs queued/running, deliveries pending/failed)",
                    left // 2**20, chosen.high_water_bytes // 2**20)
    return {"dry_run": dry_run, "free_bytes": chosen.free_bytes, "high_water_bytes": chosen.high_water_bytes,
            "removed": [asdict(r) for r in removed], "bytes_freed": sum(r.bytes for r in removed)}



def _sweep_stale_copies(store: Store) -> None:
    """De-identified copies a crashed delivery left behind (node.deidentify.deidentified_files);
    a delivery lasts minutes, so an hour-old one is no delivery's any more. The same for pixels
    decoded while a series arrived (inference.series.decoded) that no job read within the hour."""
    hour_ago = time.time() - 3600
    for folder in store.data_dir.glob(".deid-*"):
        if folder.is_dir() and not folder.is_symlink() and folder.stat().st_mtime < hour_ago:
            shutil.rmtree(folder, ignore_errors=True)
    for series in store.series_folders():
        decoded.sweep(series, hour_ago)
