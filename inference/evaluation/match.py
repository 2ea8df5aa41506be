"""Which prediction structure is which reference structure.

First by coded concept (Segmented Property Type + laterality) where that concept names one
structure on each side, then by name, case-insensitively. A mapping (``--map``) first groups or
renames structures: ``{"bone": ["vertebrae_*", "rib_*"], "lung_left": "left lung"}`` unites every
structure whose name matches a pattern (fnmatch, case-insensitive) into one named ``bone``, coded
as our terminology codes that name. Whatever stays unpaired is reported, never dropped silently.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from vesalius.inference.evaluation.labels import EvaluationError, LabelImage, Structure, concept_of_name

# target name -> name patterns of the structures it unites
StructureMap = Mapping[str, Sequence[str]]


def read_map(path: str | Path) -> dict[str, tuple[str, ...]]:
    """A map file: JSON ``{"target": ["pattern", ...] | "pattern"}``."""
    try:
        table = json.loads(Path(path).read_text())
        if not isinstance(table, dict):
            raise ValueError("not an object")
        return {str(k): (v,) if isinstance(v, str) else tuple(str(p) for p in v) for k, v in table.items()}
    except (OSError, ValueError, TypeError) as err:
        raise EvaluationError(f"{Path(path).name}: a map file is JSON {{\"target\": [\"pattern\", ...]}}: "
                              f"{err}") from err


def mapped(image: LabelImage, mapping: StructureMap | None) -> LabelImage:
    """The image with each mapping target uniting the structures its patterns match; the
    structures no pattern matches stay as they are."""
    if not mapping:
        return image
    claimed: set[int] = set()
    groups = []
    for target, patterns in mapping.items():
        members = [i for i, s in enumerate(image.structures)
                   if any(fnmatch.fnmatch(s.name.lower(), p.lower()) for p in patterns)]
        if not members:
            continue
        claimed.update(members)
        parts = [image.structures[i] for i in members]
        if len(parts) == 1 and parts[0].name == target:
            groups.append(parts[0])
            continue
        concept = concept_of_name(target) or (parts[0].concept if len(parts) == 1 else None)
        groups.append(Structure(target, _union(parts), concept))
    kept = [s for i, s in enumerate(image.structures) if i not in claimed]
    return image.with_structures([*kept, *groups])


def _union(parts: Sequence[Structure]):
    def mask() -> np.ndarray:
        out = parts[0].mask().copy()
        for part in parts[1:]:
            out |= part.mask()
        return out
    return mask


def pairs(pred: Sequence[Structure], ref: Sequence[Structure]) -> tuple[
        list[tuple[Structure, Structure, str]], list[str], list[str]]:
    """(pred, ref, "concept" | "name") pairs, then the unmatched prediction and reference names."""
    found: list[tuple[Structure, Structure, str]] = []
    free_pred, free_ref = list(pred), list(ref)

    def unique(structures: list[Structure], key) -> dict:
        counts: dict = {}
        for s in structures:
            counts.setdefault(key(s), []).append(s)
        return {k: v[0] for k, v in counts.items() if k is not None and len(v) == 1}

    for how, key in (("concept", lambda s: s.concept), ("name", lambda s: s.name.strip().lower())):
        by_ref = unique(free_ref, key)
        for p, k in unique(free_pred, key).items():
            if p in by_ref:
                found.append((k, by_ref[p], how))
                free_pred.remove(k)
                free_ref.remove(by_ref[p])
    order = {id(s): i for i, s in enumerate(pred)}
    found.sort(key=lambda f: order[id(f[0])])
    return found, [s.name for s in free_pred], [s.name for s in free_ref]
