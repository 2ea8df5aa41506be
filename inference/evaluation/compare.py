"""One prediction against one reference: every matched structure's figures, and what did not match."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vesalius.inference.evaluation.geometry import on_grid
from vesalius.inference.evaluation.labels import LabelImage, reordered
from vesalius.inference.evaluation.match import StructureMap, mapped, pairs
from vesalius.inference.evaluation.metrics import figures
from vesalius.inference.evaluation.read import read_label_image

FIGURES = ("dice", "iou", "sensitivity", "precision", "hd95_mm", "hausdorff_mm", "assd_mm",
           "volume_pred_ml", "volume_ref_ml", "volume_diff_ml")


@dataclass(frozen=True)
class Evaluation:
    """The figures of one case: one row per matched structure (``FIGURES``, ``flag``, how it was
    matched, its coded ``concept`` [scheme, type, laterality] when known), the names left unmatched
    on either side, and whether REF was resampled."""

    structures: tuple[dict[str, Any], ...]
    resampled: bool
    unmatched_pred: tuple[str, ...] = ()
    unmatched_ref: tuple[str, ...] = ()
    pred: str = ""
    ref: str = ""
    notes: tuple[str, ...] = field(default=())

    def structure(self, name: str) -> dict[str, Any]:
        """The row of one structure, by its prediction's (else its reference's) name, case-insensitively."""
        for key in ("name", "reference_name"):  # the prediction's name first, then the reference's
            for row in self.structures:
                if row[key].lower() == name.lower():
                    return row
        raise KeyError(f"no structure {name!r} was compared (compared: "
                       f"{', '.join(r['name'] for r in self.structures) or 'none'})")

    def to_json(self) -> dict[str, Any]:
        return {"pred": self.pred, "ref": self.ref, "structures": [dict(r) for r in self.structures],
                "resampled": self.resampled, "unmatched_pred": list(self.unmatched_pred),
                "unmatched_ref": list(self.unmatched_ref), "notes": list(self.notes)}


def evaluate(pred: LabelImage | str | Path, ref: LabelImage | str | Path, mapping: StructureMap | None = None,
             *, pred_labels: str | Path | None = None, ref_labels: str | Path | None = None) -> Evaluation:
    """Compare a prediction with a reference, structure by structure.

    Either side is a ``LabelImage`` (built in memory, e.g. from a model's label map) or a path read
    by ``read_label_image`` (a SEG, a NIfTI/NRRD label map with its labels file, a results folder).
    ``mapping`` groups or renames structures on both sides before they are matched. REF is put on
    PRED's grid (resampled, nearest neighbour, when the lattices differ); different frames of
    reference raise ``EvaluationError``.
    """
    pred_image = reordered(pred) if isinstance(pred, LabelImage) else read_label_image(pred, pred_labels)
    ref_image = reordered(ref) if isinstance(ref, LabelImage) else read_label_image(ref, ref_labels)
    ref_image, resampled = on_grid(pred_image, ref_image)
    pred_structures = mapped(pred_image, mapping).structures
    ref_structures = mapped(ref_image, mapping).structures
    matched, unmatched_pred, unmatched_ref = pairs(pred_structures, ref_structures)
    present = {s.name for s in (*pred_structures, *ref_structures)}
    unused = tuple(f"map target {target!r} matches no structure on either side"
                   for target in (mapping or {}) if target not in present)
    rows = []
    for p, r, how in matched:
        concept = p.concept or r.concept
        row = {"name": p.name, "reference_name": r.name, "matched_by": how,
               "concept": list(concept) if concept else None}
        row.update(figures(p.mask(), r.mask(), pred_image.spacing, pred_image.voxel_ml))
        rows.append(row)
    return Evaluation(tuple(rows), resampled, tuple(unmatched_pred), tuple(unmatched_ref),
                      pred_image.source, ref_image.source, pred_image.notes + ref_image.notes + unused)
