"""TotalSegmentator run in-process on the volume (optional extra ``vesalius[totalsegmentator]``).

Weights come from a local folder, never from the internet: ``path`` is TotalSegmentator's home
folder (``TOTALSEG_HOME_DIR``, holding ``nnunet/results/Dataset*``; ``totalseg_import_weights``
fills it) or the ``nnunet/results`` folder itself. The volume goes in as a NIfTI image with its
RAS affine (TotalSegmentator reorients and resamples internally and returns the labels on the
input grid); its class values map to our labels through its class map, coded by
``inference.terminology`` (SNOMED CT, after TotalSegmentator's own mapping table). Classes that
are absent from a series produce no segment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from vesalius.inference.models import Model
from vesalius.inference.models.backend import Backend
from vesalius.inference.models.output import to_label_map
from vesalius.inference.models.spec import ModelSpec, ModelSpecError
from vesalius.inference.models.structures import Structures, coded_structures
from vesalius.inference.volume import Volume

# nnU-Net dataset ids of the "total" task's weights: 5 parts at 1.5 mm, or one 3 mm model (--fast)
TASK_DATASETS = {("total", False): (291, 292, 293, 294, 295), ("total", True): (297,)}


def results_dir(path: Path) -> Path:
    """The folder holding the Dataset* weight folders, given the home or the results folder."""
    nested = path / "nnunet" / "results"
    return nested if nested.is_dir() else path


def weights_problems(path: Path, task: str = "total", fast: bool = False) -> list[str]:
    """What is missing in a weights folder for ``task`` (empty when the weights are there)."""
    if not path.is_dir():
        return [f"TotalSegmentator weights folder {path} does not exist"]
    results = results_dir(path)
    present = {int(p.name[7:10]) for p in results.glob("Dataset[0-9][0-9][0-9]_*") if p.is_dir()}
    needed = TASK_DATASETS.get((task, fast))
    if needed is None:
        return [] if present else [f"no Dataset* weight folders in {results}"]
    missing = [n for n in needed if n not in present]
    if missing:
        return [f"TotalSegmentator task {task!r}{' --fast' if fast else ''} needs weights Dataset"
                f"{', Dataset'.join(str(n) for n in missing)} in {results} (see docs/models.md)"]
    return []


def class_map(task: str) -> dict[int, str]:
    """Class value -> TotalSegmentator name: from the installed package, else our copy of "total"."""
    try:
        from totalsegmentator.map_to_binary import class_map as classes
    except ImportError:
        if task != "total":
            raise ModelSpecError(f"TotalSegmentator task {task!r}: install vesalius[totalsegmentator] "
                                 "for its class map") from None
        from vesalius.inference.terminology import TOTAL_CLASSES

        return dict(enumerate(TOTAL_CLASSES, start=1))
    return {int(k): str(v) for k, v in classes[task].items()}


def totalseg_labels(spec: ModelSpec) -> Structures:
    classes = dict(spec.labels) or class_map(spec.task)
    if spec.roi_subset:
        unknown = sorted(set(spec.roi_subset) - set(classes.values()))
        if unknown:
            raise ModelSpecError(f"model {spec.name!r}: roi_subset names unknown classes {unknown}")
        classes = {v: n for v, n in classes.items() if n in spec.roi_subset}
    return coded_structures(classes, spec.label_map, spec.name)


def totalseg_input(volume: Volume) -> Any:
    """The volume as the NIfTI image TotalSegmentator takes: our array with its voxel -> RAS affine."""
    import nibabel as nib

    from vesalius.inference.models.network import LPS_TO_RAS

    return nib.Nifti1Image(np.ascontiguousarray(volume.array, dtype=np.float32),
                           LPS_TO_RAS @ volume.affine)


class TotalSegmentatorModel:
    family = "ai"

    def __init__(self, spec: ModelSpec, device: Any) -> None:
        self.spec = spec
        self.name = spec.name
        self.version = spec.version or _package_version()
        self.structures, self.channels = totalseg_labels(spec)
        self.device = device

    def predict(self, volume: Volume) -> np.ndarray:
        from totalsegmentator.python_api import totalsegmentator

        from vesalius.inference.device import device_slot

        with device_slot(self.device):
            result = totalsegmentator(
                totalseg_input(volume), None, ml=True, task=self.spec.task, fast=self.spec.fast,
                roi_subset=list(self.spec.roi_subset) or None, quiet=True,
                device="gpu" if self.device.kind == "cuda" else "cpu",
                nr_thr_resamp=self.device.threads, nr_thr_saving=1)
        return to_label_map("TotalSegmentator", np.asanyarray(result.dataobj), self.channels,
                            volume.array.shape)


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("TotalSegmentator")
    except PackageNotFoundError:
        return "2"


def load_totalsegmentator(spec: ModelSpec) -> Model:
    try:
        import totalsegmentator  # noqa: F401
    except ImportError as err:
        raise ModelSpecError(f"model {spec.name!r}: TotalSegmentator is not installed "
                             "(pip install 'vesalius[totalsegmentator]')") from err
    from vesalius.inference.device import select_device

    path = Backend.path(spec)
    results = results_dir(path)
    # Point TotalSegmentator at the local weights before it looks anywhere else, and keep it
    # offline: no usage statistics sent from a hospital network.
    home = results.parent.parent if results.parent.name == "nnunet" else None
    if home is not None:
        os.environ["TOTALSEG_HOME_DIR"] = str(home)
        offline_config(home)
    os.environ["TOTALSEG_WEIGHTS_PATH"] = str(results)
    return TotalSegmentatorModel(spec, select_device(spec.device))


def offline_config(home: Path) -> Path:
    """TotalSegmentator's config.json in ``home`` with usage statistics switched off."""
    config = home / "config.json"
    values: dict[str, Any] = {"totalseg_id": "vesalius", "prediction_counter": 0}
    if config.is_file():
        try:
            values = json.loads(config.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    if values.get("send_usage_stats") is not False:
        values["send_usage_stats"] = False
        config.write_text(json.dumps(values, indent=2))
    return config


class TotalSegmentatorBackend(Backend):
    """``totalsegmentator``: its weights folder, its class map (or ``roi_subset`` of it)."""

    kind = "totalsegmentator"
    requires = ("totalsegmentator", "monai", "torch")
    extra = "totalsegmentator"

    def weight_problems(self, spec: ModelSpec) -> list[str]:
        return weights_problems(self.path(spec), spec.task, spec.fast)

    def structures(self, spec: ModelSpec) -> Structures:
        return totalseg_labels(spec)

    def load(self, spec: ModelSpec) -> Model:
        return load_totalsegmentator(spec)


backend = TotalSegmentatorBackend()
