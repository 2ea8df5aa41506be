"""An nnU-Net v2 trained-model folder, run in-process (optional extra ``vesalius[nnunet]``).

Layout (what ``nnUNetv2_train`` leaves in ``nnUNet_results``)::

    FOLDER/dataset.json        labels {"background": 0, "liver": 1, ...}, channel_names
    FOLDER/plans.json          spacing, patch size, normalisation (nnU-Net reads it itself)
    FOLDER/fold_N/checkpoint_final.pth

nnU-Net works in the array layout SimpleITK gives an image (z, y, x) with spacing reversed to
match, ignoring the direction cosines; our (slice, row, col) volume is exactly SimpleITK's array
of the series, so it goes in as-is and the prediction comes back on the source grid.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vesalius.inference.models import Model
from vesalius.inference.models.backend import Backend
from vesalius.inference.models.output import to_label_map
from vesalius.inference.models.spec import ModelSpec, ModelSpecError
from vesalius.inference.models.structures import Structures, coded_structures
from vesalius.inference.volume import Volume


def available_folds(folder: Path) -> tuple[int, ...]:
    return tuple(sorted(int(p.name[5:]) for p in folder.glob("fold_*")
                        if p.is_dir() and p.name[5:].isdigit()))


def folder_problems(folder: Path, folds: tuple[int, ...] = (),
                    checkpoint: str = "checkpoint_final.pth") -> list[str]:
    """What a trained-model folder lacks (empty when complete)."""
    if not folder.is_dir():
        return [f"nnU-Net model folder {folder} does not exist"]
    problems = [f"{folder}/{name} is missing" for name in ("dataset.json", "plans.json")
                if not (folder / name).is_file()]
    use = folds or available_folds(folder)
    if not use:
        problems.append(f"{folder} has no fold_N folders")
    for fold in use:
        if not (folder / f"fold_{fold}" / checkpoint).is_file():
            problems.append(f"{folder}/fold_{fold}/{checkpoint} is missing")
    return problems


def dataset_classes(folder: Path) -> dict[int, str]:
    """dataset.json's labels as {value: name}; region-based (list-valued) labels are refused."""
    dataset = json.loads((folder / "dataset.json").read_text())
    channels = dataset.get("channel_names") or dataset.get("modality") or {}
    if len(channels) != 1:
        raise ModelSpecError(f"nnU-Net model {folder}: {len(channels)} input channels; only "
                             "single-channel (one series) models are supported")
    classes = {}
    for name, value in dataset.get("labels", {}).items():
        if not isinstance(value, int):
            raise ModelSpecError(f"nnU-Net model {folder}: label {name!r} is region-based "
                                 f"({value!r}); only plain label values are supported")
        classes[value] = name
    return classes


def nnunet_labels(spec: ModelSpec) -> Structures:
    names = dict(spec.labels) or dataset_classes(Backend.path(spec))
    return coded_structures(names, spec.label_map, spec.name)


def nnunet_input(volume: Volume) -> tuple[np.ndarray, dict[str, Any]]:
    """The (channels, z, y, x) image and properties nnU-Net's ``predict_single_npy_array`` takes."""
    image = np.ascontiguousarray(volume.array, dtype=np.float32)[None]
    return image, {"spacing": [float(s) for s in volume.spacing]}


class NnUNetModel:
    family = "ai"

    def __init__(self, spec: ModelSpec, predictor: Any, device: Any) -> None:
        self.name = spec.name
        self.version = spec.version or "1"
        self.structures, self.channels = nnunet_labels(spec)
        self.predictor = predictor
        self.device = device

    def predict(self, volume: Volume) -> np.ndarray:
        import torch

        from vesalius.inference.device import device_slot

        image, properties = nnunet_input(volume)
        with device_slot(self.device), torch.inference_mode():
            segmentation = self.predictor.predict_single_npy_array(image, properties, None, None, False)
        return to_label_map("nnU-Net", segmentation, self.channels, volume.array.shape)


def load_nnunet(spec: ModelSpec) -> Model:
    try:
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    except ImportError as err:
        raise ModelSpecError(f"model {spec.name!r}: nnU-Net is not installed "
                             "(pip install 'vesalius[nnunet]')") from err
    from vesalius.inference.device import select_device

    device = select_device(spec.device)
    folder = Backend.path(spec)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=device.kind == "cuda",
                                device=torch.device(device.torch_name), verbose=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(
        str(folder), use_folds=spec.folds or available_folds(folder), checkpoint_name=spec.checkpoint)
    return NnUNetModel(spec, predictor, device)


class NnUNetBackend(Backend):
    """``nnunet``: a trained-model folder, its labels from ``dataset.json``."""

    kind = "nnunet"
    requires = ("nnunetv2", "monai", "torch")
    extra = "nnunet"

    def weight_problems(self, spec: ModelSpec) -> list[str]:
        return folder_problems(self.path(spec), spec.folds, spec.checkpoint)

    def structures(self, spec: ModelSpec) -> Structures:
        return nnunet_labels(spec)

    def load(self, spec: ModelSpec) -> Model:
        return load_nnunet(spec)


backend = NnUNetBackend()
