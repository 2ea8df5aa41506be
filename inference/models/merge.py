"""Several models as one (``a+b``, kind ``merge``): their labels in one label map, each its own value."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vesalius.inference.models import Label, Model
from vesalius.inference.volume import Volume


class MergedModel:
    """Several models as one: their labels in one map, each with its own value.

    Models paint in order (a later model's voxels win where two disagree); a label that encloses
    others (``includes``, like the body) also includes every later model's labels, so the body
    still contains the liver a bundle painted over it. A name produced twice keeps the later one.
    """

    def __init__(self, models: Sequence[Model]) -> None:
        if len(models) < 2:
            raise ValueError("a merge needs at least two models")
        self.models = tuple(models)
        self.name = "+".join(m.name for m in models)[:64]  # DICOM Algorithm Name is an LO
        self.version = "+".join(m.version for m in models)[:64]
        self.family = "ai" if any(getattr(m, "family", "ai") == "ai" for m in models) else "morphology"
        self._luts: list[np.ndarray] = []
        later_names = {}
        for i, model in enumerate(models):
            for label in model.structures:
                later_names[label.name] = i  # last model producing a name wins
        next_value = 1
        plans: list[list[tuple[Label, int]]] = []
        for i, model in enumerate(models):
            lut = np.zeros(256, dtype=np.uint8)
            plan = []
            for label in model.structures:
                if later_names[label.name] != i:
                    continue
                if next_value > 255:
                    raise ValueError(f"merged model {self.name}: more than 255 labels")
                lut[label.value] = next_value
                plan.append((label, next_value))
                next_value += 1
            self._luts.append(lut)
            plans.append(plan)
        structures: list[Label] = []
        for i, plan in enumerate(plans):
            later_values = tuple(v for p in plans[i + 1:] for _, v in p)
            for label, value in plan:
                includes = tuple(int(self._luts[i][v]) for v in label.includes if self._luts[i][v])
                if label.includes:
                    includes += later_values
                structures.append(Label(value, label.name, includes))
        self.structures = tuple(structures)

    def predict(self, volume: Volume) -> np.ndarray:
        out = np.zeros(volume.array.shape, dtype=np.uint8)
        for model, lut in zip(self.models, self._luts, strict=True):
            painted = lut[model.predict(volume)]
            np.copyto(out, painted, where=painted > 0)
        return out
