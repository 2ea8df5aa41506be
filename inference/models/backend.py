"""What every model kind declares (``Backend``) and how a kind finds its backend (``backend_for``).

A backend says three things about a spec of its kind: what its weights need (checked at start-up
without importing torch), which structures it will produce (read from its metadata files), and
how to load it. The kinds themselves are listed once, in ``kinds.BACKEND_MODULES``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from vesalius.inference.models import Label, Model
from vesalius.inference.models.kinds import BACKEND_MODULES
from vesalius.inference.models.spec import ModelSpec, ModelSpecError
from vesalius.inference.models.structures import Structures, coded_structures


class Backend:
    """One model kind. Subclasses set ``kind`` and override ``load`` (and what else differs)."""

    kind: str = ""

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
