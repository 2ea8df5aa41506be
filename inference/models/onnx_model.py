"""An ONNX network run with onnxruntime: the CUDA execution provider when present, else the CPU.

Settings (labels, spacing, intensity, ROI) come from the model config or ``model.json`` beside
``model.onnx``, as for TorchScript; pre-processing, sliding window and inversion are MONAI's.
"""

from __future__ import annotations

from typing import Any

from vesalius.inference.device import Device
from vesalius.inference.models.spec import ModelSpec
from vesalius.inference.models.torchscript import NetworkFileBackend


class OnnxRunner:
    """Calls an onnxruntime session on torch patches, as the sliding-window inferer expects."""

    def __init__(self, path: str, device: Any) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = device.threads
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.kind == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index}))
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.input = self.session.get_inputs()[0].name
        self.providers = self.session.get_providers()

    def __call__(self, patches: Any) -> Any:
        import torch

        array = patches.detach().to("cpu", torch.float32).numpy()
        return torch.from_numpy(self.session.run(None, {self.input: array})[0])


class OnnxBackend(NetworkFileBackend):
    """``onnx``: one ``.onnx`` file, run by onnxruntime (float32)."""

    kind = "onnx"
    requires = ("onnxruntime", "monai", "torch")
    runner_on_device = False

    def runner(self, spec: ModelSpec, device: Device) -> Any:
        return OnnxRunner(str(self.path(spec)), device)

    def precision(self, spec: ModelSpec) -> str:
        return "fp32"


backend = OnnxBackend()
