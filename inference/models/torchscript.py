"""A TorchScript file with its settings (labels, spacing, intensity, ROI) from the model config.

``torchscript:model.ts`` reads the settings from ``model.json`` beside the file (the same keys as
a ``[[models]]`` table), since a TorchScript file carries weights but no pre-processing.
"""

from __future__ import annotations

from typing import Any

from vesalius.inference.device import Device
from vesalius.inference.models import Model
from vesalius.inference.models.backend import Backend
from vesalius.inference.models.spec import ModelSpec, ModelSpecError

DEFAULT_OVERLAP = 0.25


def network_settings(spec: ModelSpec) -> tuple[Any, Any]:
    """Pre-processing Compose and Window from a spec's plain keys (TorchScript and ONNX)."""
    from vesalius.inference.models.network import Window, preprocessing_from_settings

    if not spec.roi_size:
        raise ModelSpecError(f"model {spec.name!r}: roi_size is required for a {spec.kind} model "
                             "(the patch size it was trained on)")
    preprocessing = preprocessing_from_settings(spec.spacing, spec.orientation, spec.intensity)
    window = Window(roi_size=spec.roi_size,
                    overlap=DEFAULT_OVERLAP if spec.overlap is None else spec.overlap,
                    sw_batch_size=spec.sw_batch_size or 1)
    return preprocessing, window


class NetworkFileBackend(Backend):
    """A network in one weights file, its labels and pre-processing from the spec (TorchScript, ONNX)."""

    runner_on_device = True  # False: the runner moves data itself
    requires: tuple[str, ...] = ("monai", "torch")  # the sliding-window inferer and its tensors
    extra = "ai"

    def runner(self, spec: ModelSpec, device: Device) -> Any:
        """What maps a batch of patches to logits."""
        raise NotImplementedError

    def precision(self, spec: ModelSpec) -> str:
        return spec.precision

    def load(self, spec: ModelSpec) -> Model:
        from vesalius.inference.device import select_device
        from vesalius.inference.models.network import NetworkModel

        device = select_device(spec.device)
        labels, channels = self.structures(spec)
        preprocessing, window = network_settings(spec)
        return NetworkModel(name=spec.name, version=spec.version or "1", structures=labels,
                            channels=channels, preprocessing=preprocessing, window=window,
                            runner=self.runner(spec, device), device=device,
                            precision=self.precision(spec), runner_on_device=self.runner_on_device)


class TorchScriptBackend(NetworkFileBackend):
    """``torchscript``: one ``.ts`` file, run by torch on the spec's device."""

    kind = "torchscript"

    def runner(self, spec: ModelSpec, device: Device) -> Any:
        import torch

        return torch.jit.load(str(self.path(spec)), map_location=device.torch_name).eval()


backend = TorchScriptBackend()
