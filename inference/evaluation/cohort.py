"""A cohort: two folders of cases paired by Series Instance UID (DICOM) or by file name, every pair
evaluated, and each structure's figures summarised over the cases (mean, median, quartiles)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vesalius.inference.evaluation.compare import FIGURES, Evaluation, evaluate
from vesalius.inference.evaluation.labels import EvaluationError
from vesalius.inference.evaluation.match import StructureMap
from vesalius.inference.evaluation.read import SEGMENTATION_SOP_CLASSES, SUMMARY_FILE, is_results_folder
from vesalius.inference.volume_files import SUFFIXES, is_volume_file


@dataclass(frozen=True)
class Case:
    """One segmentation of a cohort folder: where it is, its source series (if DICOM) and name key."""

    path: Path
    series_uid: str | None
    name: str


def is_cohort(folder: Path) -> bool:
    """A folder of cases, not one results folder."""
    return folder.is_dir() and not is_results_folder(folder)


def cases(folder: Path) -> list[Case]:
    """The cases of a cohort folder: SEG and NIfTI/NRRD files, and results folders, one level deep
    (other DICOM objects, such as the CT slices, and other files are not cases)."""
    import pydicom
    from pydicom.misc import is_dicom

    found = []
    for path in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        if path.is_dir() and is_results_folder(path):
            found.append(Case(path, _summary_series(path), path.name))
        elif path.is_file() and is_volume_file(path):
            found.append(Case(path, None, _stem(path.name)))
        elif path.is_file() and is_dicom(path):
            header = pydicom.dcmread(path, stop_before_pixels=True)
            if str(header.get("SOPClassUID", "")) in SEGMENTATION_SOP_CLASSES:
                referenced = header.get("ReferencedSeriesSequence")
                uid = str(referenced[0].SeriesInstanceUID) if referenced else None
                found.append(Case(path, uid, _stem(path.name)))
    return found


def _stem(name: str) -> str:
    lower = name.lower()
    for suffix in (*SUFFIXES, ".dcm"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _summary_series(folder: Path) -> str | None:
    import json

    uid = json.loads((folder / SUMMARY_FILE).read_text()).get("series_instance_uid")
    return str(uid) if uid else None


def paired(pred: list[Case], ref: list[Case]) -> tuple[list[tuple[Case, Case]], list[Case], list[Case]]:
    """Pairs by source Series Instance UID where both sides know it, then by name; the rest unpaired."""
    found: list[tuple[Case, Case]] = []
    free_pred, free_ref = list(pred), list(ref)
    for key in (lambda c: c.series_uid, lambda c: c.name.lower()):
        by_ref = {key(c): c for c in free_ref if key(c)}
        for case in list(free_pred):
            match = by_ref.pop(key(case), None) if key(case) else None
            if match is not None:
                found.append((case, match))
                free_pred.remove(case)
                free_ref.remove(match)
    return found, free_pred, free_ref


def evaluate_cohort(pred_dir: str | Path, ref_dir: str | Path, mapping: StructureMap | None = None, *,
                    pred_labels: str | Path | None = None,
                    ref_labels: str | Path | None = None) -> dict[str, Any]:
    """Every pair of cases evaluated; a case that cannot be compared is listed with its reason."""
    found, unpaired_pred, unpaired_ref = paired(cases(Path(pred_dir)), cases(Path(ref_dir)))
    if not found:
        raise EvaluationError(f"no case of {pred_dir} pairs with one of {ref_dir} (by Series Instance UID "
                              "or file name)")
    results: list[dict[str, Any]] = []
    evaluations: list[Evaluation] = []
    for p, r in found:
        case = {"case": p.name, "pred_path": p.path.name, "ref_path": r.path.name}
        try:
            evaluation = evaluate(p.path, r.path, mapping, pred_labels=pred_labels, ref_labels=ref_labels)
        except EvaluationError as err:
            results.append({**case, "error": str(err)})
            continue
        evaluations.append(evaluation)
        results.append({**case, **evaluation.to_json()})
    return {"cases": results, "structures": summarise(evaluations),
            "resampled": any(e.resampled for e in evaluations),
            "unpaired_pred": [c.path.name for c in unpaired_pred],
            "unpaired_ref": [c.path.name for c in unpaired_ref]}


def summarise(evaluations: list[Evaluation]) -> list[dict[str, Any]]:
    """Per structure (by coded concept, else by name; in first-seen order, named as first seen) and
    figure: n, mean, median, q1, q3, iqr over the cases where it is not null; ``flagged`` counts the
    cases flagged (empty masks)."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for evaluation in evaluations:
        for row in evaluation.structures:
            key = tuple(row["concept"]) if row["concept"] else row["name"].lower()
            groups.setdefault(key, []).append(row)
    out = []
    for rows in groups.values():
        item: dict[str, Any] = {"name": rows[0]["name"], "concept": rows[0]["concept"], "cases": len(rows),
                                "flagged": sum(1 for r in rows if r["flag"])}
        for figure in FIGURES:
            values = np.array([r[figure] for r in rows if r[figure] is not None], float)
            if values.size == 0:
                item[figure] = None
                continue
            q1, median, q3 = (float(v) for v in np.percentile(values, [25, 50, 75]))
            item[figure] = {"n": int(values.size), "mean": float(values.mean()), "median": median,
                            "q1": q1, "q3": q3, "iqr": q3 - q1}
        out.append(item)
    return out
