"""What every model kind declares (``Backend``) and how a kind finds its backend (``backend_for``).

A backend says four things about a spec of its kind: which modules it runs on and which extra
installs them (``requires``, ``extra``; checked with ``find_spec``, nothing imported), what its
weights need (checked at start-up
without importing torch), which structures it will produce (read from its metadata files), and
how to load it. The kinds themselves are listed once, in ``kinds.BACKEND_MODULES``.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from vesalius.inference.models import Label, Model
from vesalius.inference.models.kinds import BACKEND_MODULES
from vesalius.inference.models.spec import ModelSpec, ModelSpecError
from vesalius.inference.models.structures import Structures, coded_structures


class Backend:
    """One model kind. Subclasses set ``kind`` and override ``load`` (and what else differs)."""

    kind: str = ""
    requires: tuple[str, ...] = ()  # top-level modules the kind imports to run, e.g. ("monai", "torch")
    extra: str = ""  # the vesalius extra that installs them, e.g. "ai"

    def runtime_problems(self) -> list[str]:
        """What is missing to run this kind (empty when its modules are installed); imports nothing."""
        missing = [name for name in self.requires if _missing(name)]
        if not missing:
            return []
        names = " and ".join(_PRETTY.get(n, n) for n in missing)
        return [f"needs {names}: pip install 'vesalius[{self.extra}]'"]

    def weight_problems(self, spec: ModelSpec) -> list[str]:
        """What is missing for ``spec`` to load (empty when its files are in place); never imports torch.

        The default: one weights file at ``spec.path``.
        """
        path = self.path(spec)
        return [] if path.is_file() else [f"weights file {path} does not exist"]

    def structures(self, spec: ModelSpec) -> Structures:
        """The labels the model will produce, from its metadata (no weights loaded).

        The default: the spec's own ``labels`` table, coded.
        """
        return coded_structures(spec.labels, spec.label_map, spec.name)

    def revision(self, spec: ModelSpec) -> str:
        """What, besides the spec, decides which weights load (a bundle's resolved version folder);
        part of the loaded-model cache key."""
        return ""

    def load(self, spec: ModelSpec) -> Model:
        """The model, ready to predict (weights read, moved to its device)."""
        raise NotImplementedError

    def device(self, spec: ModelSpec) -> str:
        """The device ``vesalius models`` reports for the spec."""
        from vesalius.inference.device import cuda_available

        if spec.device == "auto":
            return "cuda" if cuda_available() else "cpu"
        return spec.device

    @staticmethod
    def path(spec: ModelSpec) -> Path:
        if spec.path is None:  # ModelSpec refuses this for every kind that has a path
            raise ModelSpecError(f"model {spec.name!r}: no path for kind {spec.kind!r}")
        return spec.path


_PRETTY = {"monai": "MONAI", "torch": "torch", "onnxruntime": "onnxruntime", "nnunetv2": "nnU-Net (nnunetv2)",
           "totalsegmentator": "TotalSegmentator"}


def _missing(module: str) -> bool:
    """Not importable: not installed, or blocked (``sys.modules[name] = None``)."""
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def backend_for(kind: str) -> Backend:
    """The backend of ``kind`` (its module imported on first use); ModelSpecError for other kinds."""
    if kind not in BACKEND_MODULES:
        raise ModelSpecError(f"kind {kind!r} cannot be loaded on its own")
    backend = importlib.import_module(BACKEND_MODULES[kind]).backend
    if not isinstance(backend, Backend) or backend.kind != kind:
        raise TypeError(f"{BACKEND_MODULES[kind]}.backend is not the {kind!r} Backend")
    return backend


def declared_labels(spec: ModelSpec) -> tuple[Label, ...]:
    """The labels a spec's model will produce, read from its metadata files (no weights loaded)."""
    return backend_for(spec.kind).structures(spec)[0]
