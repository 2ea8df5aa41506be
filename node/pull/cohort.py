"""Cohort outputs of a pull job (``--evaluate-against``): each processed study's results scored
against a reference segmentation that came with the study, with `vesalius evaluate`'s code
(node.evaluations, inference.evaluation), and the cohort's report when the job ends.

The reference is a SEG series of the same study whose Series Description matches the job's
``evaluate_against`` pattern (DICOM wildcards, case-insensitive): typically the radiologists'
contours the archive already holds. The evaluation code (SimpleITK) is imported on first use.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vesalius.node.paths import inside
from vesalius.node.pull.query import wildcard
from vesalius.node.store import Store, write_durably

log = logging.getLogger("vesalius.pull")
REPORT_DIR = "pulls"  # <data_dir>/pulls/<job>/cohort.json and cohort.html


def references(store: Store, study_uid: str, pattern: str) -> list[str]:
    """The Series Instance UIDs of the study's SEG series whose description matches ``pattern``."""
    rows = store.query("SELECT series_instance_uid, series_description FROM series "
                       "WHERE study_instance_uid=? AND modality='SEG' ORDER BY series_instance_uid",
                       (study_uid,))
    return [r["series_instance_uid"] for r in rows if wildcard(pattern, r["series_description"])]


def evaluate_study(store: Store, study_uid: str, job_ids: list[int], pattern: str) -> str:
    """Evaluate each done job of the study against its reference; a short outcome for the
    study's reason ("" when there was nothing to do)."""
    from vesalius.node.evaluations import NotEvaluable, evaluate_job, spooled_reference

    found = references(store, study_uid, pattern)
    if not found:
        return "evaluation: no reference SEG matches"
    if len(found) > 1:
        return f"evaluation: {len(found)} reference SEGs match; name one more narrowly"
    outcomes = []
    for job_id in job_ids:
        try:
            evaluate_job(store, job_id, spooled_reference(store, found[0]), f"series {found[0]}", via="pull")
            outcomes.append(f"job {job_id} evaluated")
        except NotEvaluable as err:
            outcomes.append(f"job {job_id} not evaluated: {err}")
        except Exception as err:  # a library failing on one case must not stop the job
            log.exception("evaluation of job %d failed", job_id)
            outcomes.append(f"job {job_id} not evaluated ({type(err).__name__})")
    return "evaluation: " + "; ".join(outcomes) if outcomes else "evaluation: no finished job"


def cohort(store: Store, pull_job: int) -> dict[str, Any]:
    """The latest evaluation of each processed study's jobs, as `vesalius evaluate`'s cohort
    result (cases, per-structure summary)."""
    from vesalius.inference.evaluation import Evaluation
    from vesalius.inference.evaluation.cohort import summarise

    rows = store.query(
        "SELECT p.study_instance_uid, j.id AS job_id, e.figures FROM pull_studies p "
        "JOIN series s ON s.study_instance_uid=p.study_instance_uid "
        "JOIN jobs j ON j.series_instance_uid=s.series_instance_uid "
        "JOIN evaluations e ON e.id=(SELECT MAX(x.id) FROM evaluations x WHERE x.job_id=j.id) "
        "WHERE p.job_id=? AND p.state='processed' ORDER BY p.study_date, p.study_instance_uid, j.id",
        (pull_job,))
    cases, evaluations = [], []
    for row in rows:
        figures = json.loads(row["figures"])
        cases.append({"case": f"study {row['study_instance_uid']} job {row['job_id']}", **figures})
        evaluations.append(Evaluation(structures=tuple(figures["structures"]),
                                      resampled=bool(figures.get("resampled"))))
    return {"cases": cases, "structures": summarise(evaluations),
            "resampled": any(e.resampled for e in evaluations), "unpaired_pred": [], "unpaired_ref": []}


def write_report(store: Store, pull_job: int) -> Path:
    """``cohort.json`` and ``cohort.html`` (`vesalius evaluate --report`'s page) of a finished job."""
    from vesalius.inference.evaluation.report import to_html

    result = cohort(store, pull_job)
    folder = inside(store.data_dir, REPORT_DIR, str(int(pull_job)))
    write_durably(folder / "cohort.json", json.dumps(result, indent=1).encode())
    write_durably(folder / "cohort.html", to_html(result, f"Vesalius pull job {pull_job}").encode())
    return folder
