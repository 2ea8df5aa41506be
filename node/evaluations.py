"""A finished job's segmentation against a reference: the figures computed and kept with the job.

Shared by ``vesalius evaluate --job`` and ``POST /jobs/{id}/evaluate``. The job's side is always
its BINARY SEG (``results/.../seg.dcm``); the reference is a file the operator names (CLI), or over
HTTP a SEG sent in the request or a SEG series the node holds in its spool, never a path a client
names. The evaluation itself (``inference.evaluation``) is imported on first use, so the listener
loads SimpleITK and highdicom only when someone evaluates.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vesalius.node.pipeline import OUTPUT_FILES
from vesalius.node.store import Store, removal_of_results

SEGMENTATION_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")


class NotEvaluable(Exception):
    """The job or the reference cannot be evaluated; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def job_segmentation(store: Store, job_id: int) -> Path:
    """The BINARY SEG a finished job wrote; NotEvaluable (404, 409) when there is none."""
    job = store.job(job_id)
    if job is None:
        raise NotEvaluable(404, f"no job {job_id}")
    if job["state"] != "done" or not job["result_dir"]:
        raise NotEvaluable(409, f"job {job_id} is {job['state']}: only a finished job's results are "
                                "evaluated")
    removed = removal_of_results(store, job_id)
    if removed is not None:
        raise NotEvaluable(409, f"the results of job {job_id} were removed by retention "
                                f"({removed['reason']})")
    seg = Path(job["result_dir"]) / OUTPUT_FILES["seg"]
    if not seg.is_file():
        raise NotEvaluable(409, f"job {job_id} wrote no segmentation (no structure was found)")
    return seg


def spooled_reference(store: Store, series_uid: str) -> Path:
    """The one SEG instance of a series the node received; NotEvaluable (404, 422) otherwise."""
    rows = store.query("SELECT sop_class_uid, path FROM instances WHERE series_instance_uid=?", (series_uid,))
    if not rows:
        raise NotEvaluable(404, f"no series {series_uid} in the spool")
    if any(r["sop_class_uid"] not in SEGMENTATION_SOP_CLASSES for r in rows) or len(rows) != 1:
        raise NotEvaluable(422, f"series {series_uid} is not one DICOM Segmentation instance")
    return Path(rows[0]["path"])


def evaluate_job(store: Store, job_id: int, reference: Path, reference_name: str, *, via: str,
                 mapping: dict[str, tuple[str, ...]] | None = None,
                 ref_labels: Path | None = None) -> dict[str, Any]:
    """Compare the job's SEG with ``reference`` and keep the figures with the job: the stored
    evaluation (``id``, ``reference``, ``evaluated_at``, ``figures``). An EvaluationError (frames
    of reference differ, unreadable reference) becomes NotEvaluable 422."""
    from vesalius.inference.evaluation import EvaluationError, evaluate, read_label_image

    seg = job_segmentation(store, job_id)
    try:  # each side named as the operator knows it (not by a temporary file's name)
        pred = dataclasses.replace(read_label_image(seg), source=f"job {job_id}")
        ref = dataclasses.replace(read_label_image(reference, ref_labels), source=reference_name)
        evaluation = evaluate(pred, ref, mapping)
    except EvaluationError as err:
        raise NotEvaluable(422, str(err)) from err
    return record(store, job_id, reference_name, evaluation.to_json(), via)


def record(store: Store, job_id: int, reference: str, figures: dict[str, Any], via: str) -> dict[str, Any]:
    when = datetime.now(UTC).isoformat(timespec="seconds")
    with store.transaction() as db:
        evaluation_id = db.insert("INSERT INTO evaluations (job_id, reference, figures, via, evaluated_at) "
                                  "VALUES (?,?,?,?,?)", (job_id, reference, json.dumps(figures), via, when))
    return {"id": evaluation_id, "job": job_id, "reference": reference, "evaluated_at": when,
            "figures": figures}


def evaluations(store: Store, job_id: int) -> list[dict[str, Any]]:
    """Every evaluation of a job, oldest first."""
    return [{"id": r["id"], "job": job_id, "reference": r["reference"], "evaluated_at": r["evaluated_at"],
             "via": r["via"], "figures": json.loads(r["figures"])}
            for r in store.query("SELECT * FROM evaluations WHERE job_id=? ORDER BY id", (job_id,))]


def headline(evaluation: dict[str, Any]) -> str:
    """One line for `vesalius status`: each structure's Dice and HD95."""
    figures = evaluation["figures"]
    parts = []
    for row in figures["structures"]:
        if row["dice"] is None:
            parts.append(f"{row['name']} ({row['flag']})")
        else:
            hd95 = f" HD95 {row['hd95_mm']:.1f} mm" if row["hd95_mm"] is not None else ""
            parts.append(f"{row['name']} Dice {row['dice']:.3f}{hd95}")
    return f"evaluated against {evaluation['reference']} at {evaluation['evaluated_at']}: " + \
        (", ".join(parts) or "no structure matched")
