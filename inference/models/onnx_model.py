"""An ONNX network run with onnxruntime: the CUDA execution provider when present, else the CPU.

Settings (labels, spacing, intensity, ROI) come from the model config or ``model.json`` beside
``model.onnx``, as for TorchScript; pre-processing, sliding window and inversion are MONAI's.
"""

from __future__ import annotations

from typing import Any

from vesalius.inference.models import Model
from vesalius.inference.models.backend import Backend
from vesalius.inference.models.spec import ModelSpec


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


class OnnxBackend(Backend):
    """``onnx``: one ``.onnx`` file; labels and pre-processing from the spec."""

    kind = "onnx"

    def load(self, spec: ModelSpec) -> Model:
        from vesalius.inference.device import select_device
        from vesalius.inference.models.network import NetworkModel
        from vesalius.inference.models.torchscript import network_settings

        device = select_device(spec.device)
        labels, channels = self.structures(spec)
        preprocessing, window = network_settings(spec)
        return NetworkModel(name=spec.name, version=spec.version or "1", labels=labels,
                            channels=channels, preprocessing=preprocessing, window=window,
                            runner=OnnxRunner(str(self.path(spec)), device), device=device,
                            precision="fp32", runner_on_device=False)


backend = OnnxBackend()
