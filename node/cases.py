"""The case library: each recognised correction becomes a de-identified training case.

A case is a folder ``data_dir/cases/case-NNNNNN/`` holding the source volume (``image.nii.gz``),
the corrected label map on the same grid (``label.nii.gz``) and ``case.json`` (labels, scanner,
protocol, the model version that wrote the corrected result, the agreement figures, dates). NIfTI
carries no DICOM header; the JSON names the patient by the pseudonym node.deidentify gives the same
patient everywhere (the ``deid_map`` table), shifts the study date by that patient's offset, and holds
no UID, name, ID, birth date or accession number. Rows in the ``cases`` table make it searchable.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from vesalius.node.deidentify import deidentify
from vesalius.node.store import DeidMapping, Store

CASES_DIR = "cases"
IMAGE_FILE, LABEL_FILE, META_FILE = "image.nii.gz", "label.nii.gz", "case.json"


def make_case(store: Store, correction: dict[str, Any]) -> int:
    """Write the case of a recognised correction and record it; its id."""
    from vesalius.inference.evaluation.geometry import on_grid
    from vesalius.inference.evaluation.labels import LabelImage
    from vesalius.inference.evaluation.read import read_seg
    from vesalius.inference.series import load_series

    source = correction["source_series_uid"]
    volume = load_series(store.series_paths(source))
    seg_path = store.series_paths(correction["series_instance_uid"])[0]
    grid = LabelImage(tuple(int(n) for n in volume.array.shape), volume.affine, (),  # type: ignore[arg-type]
                      frame_of_reference_uid=volume.frame_of_reference_uid)
    corrected, _ = on_grid(grid, read_seg(seg_path))
    masks = [(s.name, s.concept, s.mask()) for s in corrected.structures]
    masks.sort(key=lambda m: -int(m[2].sum()))  # larger first: one holding others (body) stays under them
    label_map = np.zeros(volume.array.shape, np.uint8)
    labels = {}
    for value, (name, concept, mask) in enumerate(masks, start=1):
        label_map[mask] = value
        labels[str(value)] = {"name": name, "concept": list(concept) if concept else None}
    header = pydicom.dcmread(store.series_paths(source)[0], stop_before_pixels=True)
    facts = _facts(store, source)
    # the volumes first, outside the transaction (seconds of writing must not hold the database)
    tmp = store.data_dir / CASES_DIR / f".incoming-{secrets.token_hex(8)}"
    tmp.mkdir(parents=True)
    try:
        write_nifti(volume.array.astype(np.int16 if volume.modality == "CT" else np.float32), volume.affine,
                    tmp / IMAGE_FILE)
        write_nifti(label_map, volume.affine, tmp / LABEL_FILE)
        with store.transaction() as db:
            anonymous = deidentify([header], DeidMapping(db), ("retain_longitudinal_dates",))[0]
            case_id = db.insert("INSERT INTO cases (correction_series_uid, job_id, patient, folder, "
                                "modality, manufacturer, scanner_model, body_part, slice_thickness, "
                                "contrast, structures, model, model_version, agreement, created_at) "
                                "VALUES (?,?,?,'',?,?,?,?,?,?,?,?,?,?,?)",
                                (correction["series_instance_uid"], correction["job_id"],
                                 str(anonymous.PatientID), _text(header.get("Modality")),
                                 _text(header.get("Manufacturer")),
                                 _text(header.get("ManufacturerModelName")),
                                 _text(header.get("BodyPartExamined")), facts.get("slice_thickness") or None,
                                 int(bool(facts.get("contrast"))), json.dumps([m[0] for m in masks]),
                                 correction["model"], correction["model_version"],
                                 agreement(correction["structures"]),
                                 datetime.now(UTC).isoformat(timespec="seconds")))
            folder = store.data_dir / CASES_DIR / f"case-{case_id:06d}"
            db.execute("UPDATE cases SET folder=? WHERE id=?", (str(folder), case_id))
            row = dict(db.execute("SELECT * FROM cases WHERE id=?", (case_id,)).fetchone())
            meta = {**_public(row), "study_date": str(anonymous.get("StudyDate", "")), "labels": labels,
                    "corrections": correction["structures"], "deidentification": "PS3.15 basic profile, "
                    "retain longitudinal temporal information (modified dates)"}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
            shutil.rmtree(folder, ignore_errors=True)  # a case of a rolled-back attempt
            tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return case_id


def agreement(structures: Sequence[dict[str, Any]] | None) -> float | None:
    """Mean Dice of our structures against the correction (a rejected structure counts 0)."""
    dice = [s["dice"] for s in structures or () if s["verdict"] != "added" and s["dice"] is not None]
    return round(float(np.mean(dice)), 4) if dice else None


def write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """An array on a (slice, row, col) -> LPS grid as NIfTI (SimpleITK converts to RAS on writing)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))  # SimpleITK x, y, z = col, row, slice
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing([float(spacing[2]), float(spacing[1]), float(spacing[0])])  # type: ignore[no-untyped-call]
    image.SetOrigin([float(v) for v in affine[:3, 3]])  # type: ignore[no-untyped-call]
    direction = np.stack([affine[:3, 2] / spacing[2], affine[:3, 1] / spacing[1], affine[:3, 0] / spacing[0]],
                         axis=1)
    image.SetDirection([float(v) for v in direction.ravel()])  # type: ignore[no-untyped-call]
    sitk.WriteImage(image, str(path), useCompression=True)


def _facts(store: Store, series_uid: str) -> dict[str, Any]:
    rows = store.query("SELECT facts FROM series_facts WHERE series_instance_uid=?", (series_uid,))
    return dict(json.loads(rows[0]["facts"])) if rows else {}


def _text(value: Any) -> str:
    return "".join(c if c.isalnum() or c in " ._-" else "?" for c in str(value or "").strip())[:64]


_PUBLIC = ("id", "patient", "modality", "manufacturer", "scanner_model", "body_part", "slice_thickness",
           "contrast", "structures", "model", "model_version", "agreement", "created_at")


def _public(row: dict[str, Any]) -> dict[str, Any]:
    """A case row without the UIDs that link it back to the patient's study (kept in the database)."""
    out = {k: row[k] for k in _PUBLIC}
    if isinstance(out["structures"], str):
        out["structures"] = json.loads(out["structures"])
    out["contrast"] = bool(out["contrast"])
    return out


# --- finding and exporting cases --------------------------------------------------------------------


@dataclass(frozen=True)
class CaseFilter:
    """What `vesalius cases` and `vesalius train --cases` select; empty fields select everything."""

    structure: str = ""  # a structure name, case-insensitive
    scanner: str = ""  # a substring of manufacturer or scanner model, case-insensitive
    since: str = ""  # ISO date: created on or after
    until: str = ""  # ISO date: created on or before
    min_agreement: float | None = None
    max_agreement: float | None = None

    def keeps(self, case: dict[str, Any]) -> bool:
        if self.structure and self.structure.lower() not in {s.lower() for s in case["structures"]}:
            return False
        scanner = f"{case['manufacturer']} {case['scanner_model']}".lower()
        if self.scanner and self.scanner.lower() not in scanner:
            return False
        day = case["created_at"][:10]
        if (self.since and day < self.since) or (self.until and day > self.until[:10]):
            return False
        score = case["agreement"]
        if self.min_agreement is not None and (score is None or score < self.min_agreement):
            return False
        return not (self.max_agreement is not None and (score is None or score > self.max_agreement))


def cases(store: Store, where: CaseFilter = CaseFilter()) -> list[dict[str, Any]]:
    """The cases the filter keeps, oldest first, as their public metadata plus ``folder``."""
    rows = [{**_public(dict(r)), "folder": r["folder"]}
            for r in store.query("SELECT * FROM cases ORDER BY id")]
    return [r for r in rows if where.keeps(r)]


def case(store: Store, case_id: int) -> dict[str, Any] | None:
    rows = store.query("SELECT folder FROM cases WHERE id=?", (case_id,))
    if not rows:
        return None
    meta: dict[str, Any] = json.loads((Path(rows[0]["folder"]) / META_FILE).read_text())
    return {**meta, "folder": rows[0]["folder"]}


def export_monai(selected: Sequence[dict[str, Any]], out: Path) -> Path:
    """A MONAI datalist (``datalist.json``: training image/label pairs, paths relative to it) with
    the files copied beside it; labels made consistent across cases (``label_names``)."""
    names = _label_names(selected)
    out.mkdir(parents=True, exist_ok=True)
    training = []
    for item in selected:
        name = f"case-{item['id']:06d}"
        (out / name).mkdir(exist_ok=True)
        shutil.copyfile(Path(item["folder"]) / IMAGE_FILE, out / name / IMAGE_FILE)
        _relabelled(Path(item["folder"]), names, out / name / LABEL_FILE)
        training.append({"image": f"{name}/{IMAGE_FILE}", "label": f"{name}/{LABEL_FILE}",
                         "structures": item["structures"]})
    datalist = out / "datalist.json"
    label_names = {str(v): n for n, v in names.items()}
    datalist.write_text(json.dumps({"label_names": label_names, "training": training}, indent=1))
    return datalist


def export_nnunet(selected: Sequence[dict[str, Any]], out: Path, dataset_id: int = 501,
                  name: str = "Vesalius") -> Path:
    """An nnU-Net v2 raw dataset folder ``DatasetNNN_NAME`` (imagesTr, labelsTr, dataset.json)."""
    names = _label_names(selected)
    folder = out / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for item in selected:
        stem = f"{name}_{item['id']:06d}"
        shutil.copyfile(Path(item["folder"]) / IMAGE_FILE, folder / "imagesTr" / f"{stem}_0000.nii.gz")
        _relabelled(Path(item["folder"]), names, folder / "labelsTr" / f"{stem}.nii.gz")
    modality = selected[0]["modality"] if selected else "CT"
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": modality}, "labels": {"background": 0, **names},
        "numTraining": len(selected), "file_ending": ".nii.gz"}, indent=1))
    return folder


def _label_names(selected: Sequence[dict[str, Any]]) -> dict[str, int]:
    """One value per structure name over all the cases, in order of first appearance."""
    names: dict[str, int] = {}
    for item in selected:
        for structure in item["structures"]:
            names.setdefault(structure, len(names) + 1)
    return names


def _relabelled(folder: Path, names: dict[str, int], target: Path) -> None:
    import SimpleITK as sitk

    labels = json.loads((folder / META_FILE).read_text())["labels"]
    image = sitk.ReadImage(str(folder / LABEL_FILE))
    array = sitk.GetArrayFromImage(image)
    out = np.zeros_like(array)
    for value, label in labels.items():
        out[array == int(value)] = names[label["name"]]
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(image)  # type: ignore[no-untyped-call]
    sitk.WriteImage(result, str(target), useCompression=True)
