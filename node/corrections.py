"""Radiologists' corrections coming back: a SEG received from a PACS, viewer or Slicer that segments
the source series of one of our jobs, written by someone else, is a correction of that job.

Every completed SEG series is looked at once (a ``corrections`` row records the outcome, so a
restart never looks again): ours (our Manufacturer, or our own SEG's series) is ignored; one that
references a series no job of ours finished, or whose structures match none of ours by coded
concept, is kept and flagged; the others are scored with ``vesalius evaluate``'s code (the figures
go to the ``evaluations`` table too) and each structure gets a verdict: accepted (unchanged),
amended (Dice and volume change) or rejected (deleted by the radiologist). A SEG is never input:
routing processes image SOP classes only (node.routing.PROCESSABLE_SOP_CLASSES).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
from prometheus_client.core import Metric
from pydicom.errors import InvalidDicomError

from vesalius.dicom_out.identity import MANUFACTURER
from vesalius.node.evaluations import SEGMENTATION_SOP_CLASSES, NotEvaluable, evaluate_job, job_segmentation
from vesalius.node.store import Store

log = logging.getLogger("vesalius.corrections")

UID = re.compile(r"[0-9]+(\.[0-9]+)*")
UNCHANGED_DICE = 0.9999  # a structure at or above it (and the same volume) is accepted unchanged
_SEG_CLASSES = ", ".join(f"'{c}'" for c in SEGMENTATION_SOP_CLASSES)
PENDING = (f"SELECT s.series_instance_uid FROM series s WHERE s.state='complete' AND s.sop_class_uid IN "
           f"({_SEG_CLASSES}) AND NOT EXISTS (SELECT 1 FROM corrections c WHERE "
           "c.series_instance_uid=s.series_instance_uid) ORDER BY s.completed_at")


def _uid(value: object) -> str | None:
    """A received UID, if it is one (only then may it reach the store or a log line)."""
    text = str(value or "")
    return text if len(text) <= 64 and UID.fullmatch(text) else None


def recognise_pending(store: Store, make_cases: bool = True) -> list[dict[str, Any]]:
    """Look at every completed SEG series not looked at yet; the corrections recorded (ignored
    ones included). ``make_cases``: a recognised correction also becomes a case (node.cases)."""
    done = []
    for row in store.query(PENDING):
        correction = recognise(store, row["series_instance_uid"])
        if correction["state"] == "recognised" and make_cases:
            from vesalius.node.cases import make_case

            try:
                make_case(store, correction)
            except Exception as err:  # a case that cannot be made leaves the correction scored
                log.error("correction series=%s: no case made (%s)", correction["series_instance_uid"],
                          type(err).__name__)
                log.debug("case failed", exc_info=True)
        done.append(correction)
    return done


def recognise(store: Store, series_uid: str) -> dict[str, Any]:
    """Decide what one received SEG series is, record it, and return the row as a dict."""
    paths = store.series_paths(series_uid)
    values: dict[str, Any] = {"series_instance_uid": series_uid, "sop_instance_uid": None,
                              "source_series_uid": None, "job_id": None, "model": None,
                              "model_version": None, "verdict": None, "structures": None,
                              "evaluation_id": None}
    header = _header(paths[0]) if len(paths) == 1 else None
    if header is None:
        return _save(store, values, "flagged", "not one readable DICOM Segmentation instance")
    values["sop_instance_uid"] = _uid(header.get("SOPInstanceUID"))
    referenced = header.get("ReferencedSeriesSequence") or []
    source = _uid(referenced[0].get("SeriesInstanceUID")) if referenced else None
    values["source_series_uid"] = source
    if str(header.get("Manufacturer", "")) == MANUFACTURER:
        return _save(store, values, "ignored", "written by this node")
    if source is None:
        return _save(store, values, "flagged", "references no source series")
    job = store.query("SELECT id, model FROM jobs WHERE series_instance_uid=? AND state='done' "
                      "ORDER BY id DESC LIMIT 1", (source,))
    if not job:
        return _save(store, values, "flagged", "references a series no job of this node finished")
    values["job_id"], values["model"] = job[0]["id"], job[0]["model"]
    try:
        ours = job_segmentation(store, values["job_id"])
    except NotEvaluable as err:
        return _save(store, values, "flagged", str(err))
    values["model_version"] = model_version(ours)
    our_header = _header(ours)
    if our_header is not None and _uid(our_header.get("SeriesInstanceUID")) == series_uid:
        return _save(store, values, "ignored", "written by this node")
    try:
        evaluation = evaluate_job(store, values["job_id"], paths[0], f"correction SEG series {series_uid}",
                                  via="correction")
    except NotEvaluable as err:
        return _save(store, values, "flagged", str(err))
    values["evaluation_id"] = evaluation["id"]
    figures = evaluation["figures"]
    if not figures["structures"]:
        return _save(store, values, "flagged",
                     "matches none of the job's structures by coded concept or name")
    values["structures"] = verdicts(figures)
    values["verdict"] = overall(values["structures"])
    return _save(store, values, "recognised", None)


def verdicts(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Per structure of the job: accepted (unchanged), amended (Dice, volume change) or rejected
    (the correction deleted it); structures only the correction has are 'added'."""
    rows = []
    for row in figures["structures"]:
        ours, theirs = row["volume_pred_ml"], row["volume_ref_ml"]
        dice = row["dice"] if row["dice"] is not None else (1.0 if ours == theirs == 0 else 0.0)
        unchanged = dice >= UNCHANGED_DICE and abs(ours - theirs) < 1e-9
        rows.append({"name": row["name"], "verdict": "accepted" if unchanged else "amended",
                     "dice": round(float(dice), 4), "concept": row.get("concept"),
                     "volume_ml": ours, "corrected_volume_ml": theirs,
                     "volume_change_ml": round(theirs - ours, 4),
                     "volume_change_pct": round(100.0 * (theirs - ours) / ours, 2) if ours else None})
    rows += [{"name": name, "verdict": "rejected", "dice": 0.0} for name in figures["unmatched_pred"]]
    rows += [{"name": name, "verdict": "added", "dice": None} for name in figures["unmatched_ref"]]
    return rows


def overall(structures: list[dict[str, Any]]) -> str:
    """accepted when every structure is, rejected when every one of ours was deleted, else amended."""
    ours = [s["verdict"] for s in structures if s["verdict"] != "added"]
    if ours and all(v == "accepted" for v in ours) and len(ours) == len(structures):
        return "accepted"
    if ours and all(v == "rejected" for v in ours):
        return "rejected"
    return "amended"


def model_version(seg: Path) -> str | None:
    """The algorithm version our SEG carries (Segment Algorithm Identification)."""
    header = _header(seg)
    for segment in (header.get("SegmentSequence") or []) if header else []:
        for algorithm in segment.get("SegmentationAlgorithmIdentificationSequence") or []:
            if algorithm.get("AlgorithmVersion"):
                return str(algorithm.AlgorithmVersion)[:64]
    return None


def _header(path: Path) -> pydicom.Dataset | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError):
        return None
    return ds if str(ds.get("SOPClassUID", "")) in SEGMENTATION_SOP_CLASSES else None


# a SEG series received again replaces its row (the case library's row refers to it)
_REPLACED = ", ".join(f"{c}=excluded.{c}" for c in (
    "sop_instance_uid", "source_series_uid", "job_id", "model", "model_version", "state", "verdict", "reason",
    "structures", "evaluation_id", "recognised_at"))


def _save(store: Store, values: dict[str, Any], state: str, reason: str | None) -> dict[str, Any]:
    row = {**values, "state": state, "reason": reason, "recognised_at": time.time()}
    with store.transaction() as db:
        db.execute("INSERT INTO corrections (series_instance_uid, sop_instance_uid, "
                   "source_series_uid, job_id, model, model_version, state, verdict, reason, structures, "
                   "evaluation_id, recognised_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) "
                   f"ON CONFLICT (series_instance_uid) DO UPDATE SET {_REPLACED}",
                   (row["series_instance_uid"], row["sop_instance_uid"], row["source_series_uid"],
                    row["job_id"], row["model"], row["model_version"], state, row["verdict"], reason,
                    json.dumps(row["structures"]) if row["structures"] is not None else None,
                    row["evaluation_id"], row["recognised_at"]))
    if state == "recognised":
        log.info("correction series=%s of job=%s: %s (%s)", row["series_instance_uid"], row["job_id"],
                 row["verdict"], ", ".join(f"{s['name']} {s['verdict']}" for s in row["structures"]))
    elif state == "flagged":
        log.warning("SEG series=%s kept and flagged: %s", row["series_instance_uid"], reason)
    return row


def corrections(store: Store, job_id: int | None = None) -> list[dict[str, Any]]:
    """Recorded corrections (flagged ones included, ignored ones not), newest first."""
    where = "state != 'ignored'" + (" AND job_id=?" if job_id is not None else "")
    rows = store.query(f"SELECT * FROM corrections WHERE {where} ORDER BY recognised_at DESC",
                       (job_id,) if job_id is not None else ())
    return [{**dict(r), "structures": json.loads(r["structures"]) if r["structures"] else None}
            for r in rows]


def headline(correction: dict[str, Any]) -> str:
    """One line for `vesalius status`."""
    parts = []
    for s in correction.get("structures") or []:
        if s["verdict"] == "amended":
            change = s.get("volume_change_pct")
            parts.append(f"{s['name']} amended (Dice {s['dice']:.3f}"
                         + (f", volume {change:+.1f}%)" if change is not None else ")"))
        else:
            parts.append(f"{s['name']} {s['verdict']}")
    return f"corrected ({correction['verdict']}): " + ", ".join(parts)


def agreement_metrics(store: Store) -> Iterator[Metric]:
    """Prometheus families: corrections by verdict, and structures' Dice against the corrections,
    per model and model version (a scrape series over time shows whether a version does better)."""
    from prometheus_client.core import CounterMetricFamily, SummaryMetricFamily

    verdicts = CounterMetricFamily("vesalius_corrections", "Corrections received, by outcome",
                                   labels=["model", "version", "state", "verdict"])
    dice = SummaryMetricFamily("vesalius_correction_dice", "Dice of our structures against radiologists' "
                               "corrections (a rejected structure counts 0)", labels=["model", "version"])
    structures = CounterMetricFamily("vesalius_correction_structures", "Corrected structures by verdict",
                                     labels=["model", "version", "verdict"])
    counts: Counter[tuple[str, ...]] = Counter()
    sums: dict[tuple[str, ...], list[float]] = {}
    for row in corrections(store):
        key: tuple[str, ...] = (str(row["model"] or ""), str(row["model_version"] or ""))
        counts[(*key, row["state"], str(row["verdict"] or ""))] += 1
        for s in row["structures"] or []:
            counts[("structure", *key, s["verdict"])] += 1
            if s["dice"] is not None:
                sums.setdefault(key, []).append(float(s["dice"]))
    for key, n in sorted(counts.items()):
        if key[0] == "structure":
            structures.add_metric(list(key[1:]), n)
        else:
            verdicts.add_metric(list(key), n)
    for (model, version), values in sorted(sums.items()):
        dice.add_metric([model, version], count_value=len(values), sum_value=sum(values))
    yield verdicts
    yield structures
    yield dice
