"""Each structure's volume over time, per pseudonymous patient (issue 16, "longitudinal").

When a job finishes, its volumes are recorded under the patient's pseudonym (the one
node.deidentify gives that Patient ID in ``deid_map``: the history table never holds an
identifier), with the study's date. Before a job runs, the runner looks up, per structure
concept, the latest volume from an EARLIER study of the same patient and hands it to the worker
as plain data; the SR then carries that prior value, its date and the change.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from vesalius.node import database
from vesalius.node.deidentify import patient_pseudonym
from vesalius.node.store import DeidMapping, Store

log = logging.getLogger("vesalius.longitudinal")
_DATE_CHARACTERS = frozenset("0123456789")


@dataclass(frozen=True)
class StudyOfPatient:
    """Who (pseudonym) and when a series was taken: what the history is keyed and ordered by."""

    patient: str
    study_uid: str
    study_date: str  # YYYYMMDD


def study_of(store: Store, series_uid: str) -> StudyOfPatient | None:
    """The series' patient pseudonym, study and date; None without a Patient ID or a valid
    Study Date (nothing to link or to order by), or when the series has no readable file."""
    paths = store.series_paths(series_uid)
    if not paths:
        return None
    try:
        header = pydicom.dcmread(paths[0], stop_before_pixels=True,
                                 specific_tags=["PatientID", "StudyInstanceUID", "StudyDate"])
    except (OSError, InvalidDicomError):
        return None
    patient_id = str(header.get("PatientID", "") or "").strip()
    study_date = str(header.get("StudyDate", "") or "").strip()
    if not patient_id or len(study_date) != 8 or not set(study_date) <= _DATE_CHARACTERS:
        return None
    with store.transaction() as db:
        patient = patient_pseudonym(DeidMapping(db), patient_id)
    return StudyOfPatient(patient, str(header.get("StudyInstanceUID", "")), study_date)


def priors(store: Store, study: StudyOfPatient) -> dict[str, dict[str, Any]]:
    """Per structure concept, the latest volume of an earlier study (earlier date) of the patient."""
    rows = store.query(
        "SELECT concept, volume_ml, study_date FROM volume_history h WHERE patient=? AND study_date<? "
        "AND study_instance_uid<>? AND study_date=(SELECT MAX(study_date) FROM volume_history x "
        "WHERE x.patient=h.patient AND x.concept=h.concept AND x.study_date<?) ORDER BY recorded_at",
        (study.patient, study.study_date, study.study_uid, study.study_date))
    return {row["concept"]: {"volume_ml": row["volume_ml"], "study_date": row["study_date"]} for row in rows}


def record(store: Store, job_id: int, study: StudyOfPatient, structures: Sequence[dict[str, Any]]) -> None:
    """The job's volumes (its summary's structures), replacing those of an earlier run of it."""
    now = time.time()
    with store.transaction() as db:
        db.execute("DELETE FROM volume_history WHERE job_id=?", (job_id,))
        db.executemany("INSERT INTO volume_history VALUES (?,?,?,?,?,?,?,?,?)",
                       [(job_id, study.patient, study.study_uid, study.study_date, s["name"],
                         s["concept"], float(s["volume_ml"]),
                         int(bool(s.get("complete", True))), now) for s in structures])


def history(store: Store, job_id: int) -> list[dict[str, Any]]:
    """The volumes over time of the job's patient, per structure, oldest first (no identifier:
    dates, volumes and job ids only); empty when the job has none recorded."""
    rows = store.query(
        "SELECT h.concept, h.structure, h.study_date, h.volume_ml, h.complete, h.job_id "
        "FROM volume_history h WHERE h.patient=(SELECT patient FROM volume_history WHERE job_id=? LIMIT 1) "
        "ORDER BY h.concept, h.study_date, h.job_id", (job_id,))
    by_concept: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = by_concept.setdefault(row["concept"], {"structure": row["structure"],
                                                       "concept": row["concept"], "points": []})
        entry["points"].append({"study_date": row["study_date"], "volume_ml": row["volume_ml"],
                                "complete": bool(row["complete"]), "job_id": row["job_id"]})
    return list(by_concept.values())


def safely(what: str, call: Any, *args: Any) -> Any:
    """Run a history step; a failure is logged and never the reason a job fails (None back)."""
    try:
        return call(*args)
    except (database.Error, OSError, ValueError, KeyError) as err:
        log.warning("volume history: could not %s: %s", what, type(err).__name__)
        return None
