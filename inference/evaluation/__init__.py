"""How well one segmentation agrees with another: Dice, IoU, HD95, Hausdorff, surface distance and
volume difference per structure, for one case or a cohort (``vesalius evaluate``, docs/evaluate.md).

``evaluate(pred, ref, mapping)`` takes label images in memory (``LabelImage.from_label_map``) or
files (a DICOM-SEG, a NIfTI/NRRD label map, a results folder): `labels` holds what is compared,
`read` the readers, `geometry` the grids, `match` which structure is which, `metrics` the figures
(SimpleITK), `compare` one case, `cohort` many, `report` the table, CSV and HTML page.
"""

from __future__ import annotations

from vesalius.inference.evaluation.cohort import evaluate_cohort, is_cohort
from vesalius.inference.evaluation.compare import FIGURES, Evaluation, evaluate
from vesalius.inference.evaluation.labels import EvaluationError, LabelImage, Structure
from vesalius.inference.evaluation.match import read_map
from vesalius.inference.evaluation.read import read_label_image

__all__ = ["FIGURES", "Evaluation", "EvaluationError", "LabelImage", "Structure", "evaluate",
           "evaluate_cohort", "is_cohort", "read_label_image", "read_map"]
