"""Series and study completion.

A series is complete as soon as the one association that sent it ended with a normal release;
otherwise (aborted, or sent over several associations) after the last association ended and a
quiet period passed, or, while instances keep arriving, after a longer stability timeout. A study
is complete when every series of it is complete and nothing of it arrived for
``study_quiet_period``; then its study-level rules choose the series to process
(node.routing.select_series), with the reasons recorded.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from vesalius.node import kept_headers
from vesalius.node.config import Config
from vesalius.node.kept_headers import HEADER_TAGS
from vesalius.node.routing import SeriesFacts, routes_for, select_series
from vesalius.node.store import Store

log = logging.getLogger("vesalius.series")

# Due, once no association at any listener is storing it (open_associations renewed within
# lease_seconds: a dead listener's do not count): sent in one association that ended with a normal
# release (while no other was sending it), from a calling AE never seen spreading a series over
# several associations, and complete_on_release on; else quiet_period after the last association
# ended. Else, open or not, stability_timeout without instances.
DUE_SERIES = """SELECT * FROM series s WHERE state='receiving' AND (
                   (released_at IS NOT NULL
                    AND NOT EXISTS (SELECT 1 FROM open_associations o
                                    WHERE o.series_instance_uid = s.series_instance_uid AND o.last_seen >= ?)
                    AND ((? = 1 AND released_normally = 1 AND associations = 1
                          AND NOT EXISTS (SELECT 1 FROM series m WHERE m.calling_ae = s.calling_ae
                                          AND m.associations > 1))
                         OR (? - released_at >= ? AND ? - last_received >= ?)))
                   OR ? - last_received >= ?)"""
# Studies whose series are all complete, one of them completed since the study was last selected,
# and nothing of which arrived (or was still being sent) for study_quiet_period. A study a pull job
# is still retrieving (node.pull) waits for the rest of it.
DUE_STUDIES = """SELECT s.study_instance_uid FROM series s LEFT JOIN studies st USING (study_instance_uid)
                 {where} GROUP BY s.study_instance_uid
                 HAVING SUM(CASE WHEN s.state = 'complete' THEN 0 ELSE 1 END) = 0
                    AND MAX(s.completed_at) > COALESCE(MAX(st.selected_at), -1)
                    AND ? - MAX(GREATEST(COALESCE(s.released_at, 0), s.last_received)) >= ?"""
CHANGED_STUDIES = """WHERE s.study_instance_uid IN (SELECT c.study_instance_uid FROM series c
                     LEFT JOIN studies cs USING (study_instance_uid)
                     WHERE c.state='complete' AND c.completed_at > COALESCE(cs.selected_at, -1))
                     AND s.study_instance_uid NOT IN (SELECT study_instance_uid FROM pull_studies
                                                      WHERE state='retrieving')"""


def complete_due_series(store: Store, config: Config, now: float | None = None) -> list[str]:
    """Mark due series complete, record what their headers say, and queue the jobs of the
    series-level rules in the same transaction; returns their UIDs. Every node sharing the database
    runs this: a series is taken by the one whose update finds it still receiving."""
    now = time.time() if now is None else now
    params = (now - config.lease_seconds, int(config.complete_on_release), now, config.quiet_period, now,
              config.quiet_period, now, config.stability_timeout)
    # headers are read before the transaction, so receiving never waits on them
    facts = {row["series_instance_uid"]: read_facts(store.series_paths(row["series_instance_uid"]), dict(row))
             for row in store.query(DUE_SERIES, params)}
    done: list[str] = []
    if not facts:  # the common tick (5 Hz): no write transaction to take while instances arrive
        return done
    with store.transaction() as db:
        for row in db.execute(DUE_SERIES, params).fetchall():
            uid = row["series_instance_uid"]
            if uid not in facts:  # became due while the headers were read: the next call takes it
                continue
            if db.execute("UPDATE series SET state='complete', completed_at=? WHERE series_instance_uid=? "
                          "AND state='receiving'", (now, uid)).rowcount != 1:
                continue  # another node completed it (PostgreSQL: its update committed first)
            store.bump(db, "series_completed")  # a late instance reopens a series; this stays counted
            series = replace(facts[uid], completed_at=now)
            store.save_facts(db, uid, asdict(series))
            routes = routes_for(config, series, trigger="series")
            for route in routes:
                job_id = store.add_job(db, uid, route.rule, route.model, route.destinations)
                log.info("series complete series=%s instances=%d job=%d rule=%s model=%s",
                         uid, series.slices, job_id, route.rule, route.model)
            if not routes:
                log.info("series complete series=%s slices=%d modality=%s", uid, series.slices,
                         series.modality)
            done.append(uid)
    return done


def select_due_studies(store: Store, config: Config, now: float | None = None) -> list[str]:
    """Run the study-level rules on every complete study with a series new since its last
    selection; queue the chosen series' jobs and record why each series was chosen or skipped."""
    now = time.time() if now is None else now
    due = [r[0] for r in store.query(DUE_STUDIES.format(where=CHANGED_STUDIES),
                                     (now, config.study_quiet_period))]
    selected = []
    for study in due:
        missing = store.query("SELECT s.* FROM series s LEFT JOIN series_facts f USING "
                              "(series_instance_uid) WHERE s.study_instance_uid=? AND f.facts IS NULL",
                              (study,))
        facts = {r["series_instance_uid"]: replace(read_facts(store.series_paths(r["series_instance_uid"]),
                                                              dict(r)), completed_at=r["completed_at"] or 0.0)
                 for r in missing}
        with store.transaction() as db:
            if not db.execute(DUE_STUDIES.format(where="WHERE s.study_instance_uid=?"),
                              (study, now, config.study_quiet_period)).fetchone():
                continue  # a series of it arrived meanwhile, or another node selected it
            since = _take_study(db, study, now)
            if since is None:
                continue  # another node selected it (PostgreSQL: its update committed first)
            for uid, series in facts.items():  # series stored before the node recorded facts
                store.save_facts(db, uid, asdict(series))
            _select(store, db, config, study, now, since)
            selected.append(study)
    return selected


def _take_study(db: Any, study: str, now: float) -> float | None:
    """Mark the study selected now, if no other node did since we read it; returns when it was
    selected before (-inf: never), None when another node's selection came first."""
    previous = db.execute("SELECT selected_at FROM studies WHERE study_instance_uid=?", (study,)).fetchone()
    if previous is None:
        taken = db.execute("INSERT INTO studies VALUES (?,?) ON CONFLICT (study_instance_uid) DO NOTHING",
                           (study, now)).rowcount
    else:
        taken = db.execute("UPDATE studies SET selected_at=? WHERE study_instance_uid=? AND selected_at=?",
                           (now, study, previous[0])).rowcount
    if taken != 1:
        return None
    return -math.inf if previous is None else float(previous[0])


def _select(store: Store, db: Any, config: Config, study: str, now: float, since: float) -> None:
    rows = db.execute("SELECT * FROM series WHERE study_instance_uid=?", (study,)).fetchall()
    series = [SeriesFacts.from_mapping({**dict(row), **(store.facts(db, row["series_instance_uid"]) or {}),
                                        "completed_at": row["completed_at"]}) for row in rows]
    completed = {s.series_instance_uid: s.completed_at for s in series}
    # series retention removed still compete (by their recorded facts): a worse late series must
    # not replace results made from a better one; a removed series is never processed again
    removed = [SeriesFacts.from_mapping(facts) for uid, in db.execute(
        "SELECT DISTINCT series_instance_uid FROM selections WHERE study_instance_uid=?", (study,))
        if uid not in completed and (facts := store.facts(db, uid)) is not None]
    series += removed
    for rule in (r for r in config.rules if r.trigger == "study"):
        before = {r[0] for r in db.execute("SELECT series_instance_uid FROM selections WHERE "
                                           "study_instance_uid=? AND rule=? AND decision='chosen'",
                                           (study, rule.name))}
        selection = select_series(rule, series)
        gone = {f.series_instance_uid for f in removed}
        store.record_selection(db, study, rule.name, [
            (uid, decision, reason + ("; its files were removed by retention" if uid in gone else ""))
            for uid, decision, reason in (d.row() for d in selection.decisions)], now)
        for uid in selection.chosen:
            if uid not in completed or (completed[uid] <= since and (uid in before or not before)):
                continue  # processed at an earlier selection and unchanged since
            key = result_key(study, rule.name) if rule.select == "best" else None
            job_id = store.add_job(db, uid, rule.name, rule.model, config.destination_names(rule),
                                   result_key=key)
            log.info("study complete study=%s rule=%s chose series=%s job=%d model=%s%s", study,
                     rule.name, uid, job_id, rule.model,
                     " (replacing earlier results)" if before and key else "")
        if not selection.chosen:
            log.info("study complete study=%s rule=%s: no series chosen", study, rule.name)


def result_key(study_uid: str, rule: str) -> str:
    """The result set of a study-level rule: its output UIDs and folder, whichever series it chose."""
    return f"study/{study_uid}/{rule}"


# --- what the headers say ---------------------------------------------------------------------------


def _text(value: Any, limit: int = 64) -> str:
    """A received string fit for reasons and logs: printable ASCII without separators, capped."""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = "\\".join(str(v) for v in value)
    return re.sub(r"[^A-Za-z0-9 ._+\-\\]", "?", str(value or "").strip())[:limit]


def _number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) and number > 0 else 0.0


def _frames(ds: Dataset) -> list[tuple[tuple[float, ...], tuple[float, ...], Dataset]]:
    """(orientation, position, the dataset holding thickness/spacing) per frame or slice."""
    if "PerFrameFunctionalGroupsSequence" not in ds:
        try:
            return [(tuple(float(v) for v in ds.ImageOrientationPatient),
                     tuple(float(v) for v in ds.ImagePositionPatient), ds)]
        except (AttributeError, TypeError, ValueError):
            return []
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    frames = []

    def group(frame: Dataset, name: str) -> Dataset:
        item: Dataset = (frame.get(name) or shared.get(name) or [Dataset()])[0]
        return item

    for frame in ds.PerFrameFunctionalGroupsSequence:
        try:
            orientation = group(frame, "PlaneOrientationSequence").ImageOrientationPatient
            position = group(frame, "PlanePositionSequence").ImagePositionPatient
            frames.append((tuple(float(v) for v in orientation), tuple(float(v) for v in position),
                           group(frame, "PixelMeasuresSequence")))
        except (AttributeError, TypeError, ValueError):
            continue
    return frames


def orientation_name(iop: Sequence[float]) -> str:
    """axial / coronal / sagittal when the slice normal is within 20 degrees of an axis."""
    normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:6], float))
    length = float(np.linalg.norm(normal))
    if length == 0:
        return ""
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) / length < math.cos(math.radians(20)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def read_facts(paths: Sequence[Path], row: Mapping[str, Any]) -> SeriesFacts:
    """The facts of a series from its series row and its instances' headers (no pixel data):
    the most common ImageType and orientation, slices counted in that orientation only."""
    image_types: Counter[tuple[str, ...]] = Counter()
    kernels: Counter[str] = Counter()
    contrast = False
    frames = []
    for path in paths:
        ds = kept_headers.take(path)  # kept from ingest's parse, else read again
        if ds is None:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
            except (OSError, pydicom.errors.InvalidDicomError, ValueError):
                continue
        image_types[tuple(_text(v, 16).upper() for v in ds.get("ImageType") or ())] += 1
        kernel = ds.get("ConvolutionKernel")
        if kernel is None and "SharedFunctionalGroupsSequence" in ds:
            recon = ds.SharedFunctionalGroupsSequence[0].get("CTReconstructionSequence") or [Dataset()]
            kernel = recon[0].get("ConvolutionKernel")
        kernels[_text(kernel, 32)] += 1
        contrast = contrast or bool(str(ds.get("ContrastBolusAgent", "") or "").strip())
        frames.extend(_frames(ds))
    values: dict[str, Any] = {k: _text(row[k]) for k in ("modality", "sop_class_uid", "series_description",
                                                          "body_part", "manufacturer", "calling_ae")}
    values["series_description"] = str(row["series_description"])  # matched, never shown
    values["manufacturer"] = str(row["manufacturer"])
    values["image_type"] = image_types.most_common(1)[0][0] if image_types else ()
    values["kernel"] = kernels.most_common(1)[0][0] if kernels else ""
    values["contrast"] = contrast
    if frames:
        iop = Counter(tuple(round(v, 3) for v in f[0]) for f in frames).most_common(1)[0][0]
        main = [f for f in frames if tuple(round(v, 3) for v in f[0]) == iop]
        normal = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:6]))
        positions = sorted({round(float(np.dot(normal, f[1])), 3) for f in main})
        thickness = Counter(_number(f[2].get("SliceThickness")) for f in main).most_common(1)[0][0]
        if not thickness and len(positions) > 1:
            thickness = float(np.median(np.diff(positions)))
        spacing = [_number(v) for v in (main[0][2].get("PixelSpacing") or ())]
        values.update(orientation=orientation_name(iop), slices=len(positions),
                      coverage_mm=round(positions[-1] - positions[0], 2),
                      slice_thickness=round(thickness, 3), pixel_spacing=max(spacing, default=0.0))
    return SeriesFacts(series_instance_uid=str(row["series_instance_uid"]), **values)
