"""Run a trained network on a volume the way it was trained, and put its labels back on the source grid.

Shared by every network backend (MONAI bundle, TorchScript, ONNX): the volume becomes a MONAI
``MetaTensor`` in RAS world space, goes through the model's pre-processing (orientation, spacing,
intensity: the bundle's own transforms, or ones built from the model's settings), is segmented
with ``monai.inferers.SlidingWindowInferer``, and the class probabilities are mapped back through
the inverse of that pre-processing (``monai.transforms.Invertd``) so the label map lands exactly on
the source voxels. torch and MONAI are imported only here, inside the backends, so the node and the
built-in model run without them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vesalius.inference.device import Device, device_slot
from vesalius.inference.models import Label
from vesalius.inference.models.output import to_label_map
from vesalius.inference.volume import Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Above this many output channels, labels are inverted (nearest) instead of probabilities: 100+
# channels of float32 on a 512x512x300 grid would not fit in memory.
MAX_CHANNELS_INVERTED_AS_PROBABILITIES = 8


@dataclass(frozen=True)
class Window:
    """Sliding-window settings: patch size (voxels, in the pre-processed grid) and overlap."""

    roi_size: tuple[int, ...]
    overlap: float = 0.25
    sw_batch_size: int = 1
    mode: str = "gaussian"


def to_metatensor(volume: Volume) -> Any:
    """The volume as a channel-less MONAI MetaTensor with its voxel -> RAS affine.

    Exactly what MONAI's ``LoadImage`` yields for the series, so a bundle's own transforms after
    its loader apply unchanged; the array keeps our (slice, row, col) order, the affine says where
    each axis points.
    """
    import torch
    from monai.data import MetaTensor

    affine = LPS_TO_RAS @ volume.affine
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32)),
                      affine=torch.as_tensor(affine, dtype=torch.float64),
                      meta={"original_channel_dim": "no_channel", "space": "RAS",
                            "filename_or_obj": volume.series_uid})


def preprocessing_from_settings(spacing: Sequence[float] | None, orientation: str | None,
                                intensity: Mapping[str, Any] | None) -> Any:
    """The MONAI transforms a bundle would list, from a model's plain settings.

    ``spacing`` is MONAI's ``pixdim`` (mm along the axes after ``orientation``, e.g. RAS);
    ``intensity`` is ``{"a_min", "a_max", "b_min", "b_max", "clip"}`` for ScaleIntensityRanged or
    ``{"normalize": "zscore"}`` for NormalizeIntensityd.
    """
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        NormalizeIntensityd,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    transforms: list[Any] = [EnsureChannelFirstd(keys="image")]
    if orientation:
        transforms.append(Orientationd(keys="image", axcodes=orientation))
    if spacing:
        transforms.append(Spacingd(keys="image", pixdim=tuple(float(s) for s in spacing),
                                   mode="bilinear"))
    if intensity:
        if intensity.get("normalize") == "zscore":
            transforms.append(NormalizeIntensityd(keys="image"))
        else:
            transforms.append(ScaleIntensityRanged(
                keys="image", a_min=float(intensity["a_min"]), a_max=float(intensity["a_max"]),
                b_min=float(intensity.get("b_min", 0.0)), b_max=float(intensity.get("b_max", 1.0)),
                clip=bool(intensity.get("clip", True))))
    return Compose(transforms)


def without_loader(preprocessing: Any) -> Any:
    """A bundle's pre-processing minus its file loader (we hand it the volume in memory)."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImage, LoadImaged

    transforms = [t for t in preprocessing.transforms if not isinstance(t, LoadImage | LoadImaged)]
    if not any(isinstance(t, EnsureChannelFirstd) for t in transforms):
        transforms.insert(0, EnsureChannelFirstd(keys="image"))
    return Compose(transforms)


class NetworkModel:
    """A segmentation network behind the ``Model`` interface.

    ``runner`` maps a batch of pre-processed patches (N, C_in, ...) to logits (N, C_out, ...);
    ``channels`` maps an output channel to the label value it becomes (channel 0 = background).
    """

    family = "ai"

    def __init__(self, *, name: str, version: str, structures: Sequence[Label],
                 channels: Mapping[int, int], preprocessing: Any, window: Window,
                 runner: Callable[[Any], Any], device: Device, precision: str = "auto",
                 runner_on_device: bool = True) -> None:
        self.name = name
        self.version = version
        self.structures = tuple(structures)
        self.channels = dict(channels)
        self.preprocessing = preprocessing
        self.window = window
        self.runner = runner
        self.device = device
        self.precision = precision
        self.runner_on_device = runner_on_device  # False: the runner moves data itself (ONNX)

    def predict(self, volume: Volume) -> np.ndarray:
        """The label map on the volume's grid (values per ``structures``)."""
        import torch
        from monai.data import MetaTensor
        from monai.inferers import SlidingWindowInferer
        from monai.transforms import Invertd

        data = self.preprocessing({"image": to_metatensor(volume)})
        image = data["image"]
        sw_device = self.device.torch_name if self.runner_on_device else "cpu"
        inferer = SlidingWindowInferer(roi_size=self.window.roi_size,
                                       sw_batch_size=self.window.sw_batch_size,
                                       overlap=self.window.overlap, mode=self.window.mode,
                                       sw_device=sw_device, device="cpu")
        dtype = self.device.autocast_dtype(self.precision) if self.runner_on_device else None
        autocast = (torch.autocast(self.device.kind, dtype=getattr(torch, dtype)) if dtype
                    else contextlib.nullcontext())
        with device_slot(self.device), torch.inference_mode(), autocast:
            logits = inferer(image.as_tensor()[None].float(), self.runner)
        logits = logits[0].float()
        channels = int(logits.shape[0])
        if channels == 1:
            scores = torch.sigmoid(logits)
        else:
            scores = torch.softmax(logits, dim=0)
        nearest = channels > MAX_CHANNELS_INVERTED_AS_PROBABILITIES
        if nearest:
            scores = torch.argmax(scores, dim=0, keepdim=True).float()
        data["pred"] = MetaTensor(scores, meta=dict(image.meta))  # meta carries the affine
        inverted = Invertd(keys="pred", transform=self.preprocessing, orig_keys="image",
                           nearest_interp=nearest)(data)["pred"]
        scores = np.asarray(inverted.detach().cpu().numpy())
        if scores.shape[1:] != volume.array.shape:
            raise RuntimeError(f"{self.name}: inverted prediction has shape {scores.shape[1:]}, "
                               f"the volume {volume.array.shape}")
        if nearest:
            winner = np.rint(scores[0]).astype(np.int64)
        elif channels == 1:
            winner = (scores[0] > 0.5).astype(np.int64)
        else:
            winner = np.argmax(scores, axis=0)
        return to_label_map(self.name, winner, self.channels, volume.array.shape)
