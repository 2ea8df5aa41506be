"""Per-structure quantities the SR reports: volume, surface area, intensity statistics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vesalius.inference.models import Label
from vesalius.inference.surfaces import Mesh
from vesalius.inference.volume import Volume


@dataclass(frozen=True)
class Measurement:
    label: Label
    voxel_count: int
    volume_ml: float
    surface_area_cm2: float | None
    mean: float
    std: float


def measure(
    volume: Volume,
    label_map: np.ndarray,
    structures: Sequence[Label],
    meshes: Sequence[Mesh],
) -> list[Measurement]:
    """One Measurement per non-empty label: voxel volume, mesh area and value statistics.

    Counts and sums are taken once per label value (gathering the voxels of one value is the
    fastest way numpy has), and a structure that includes other labels adds theirs up.
    """
    voxel_ml = abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
    areas = {mesh.label.value: mesh.area_mm2 / 100.0 for mesh in meshes}
    wanted = {v for label in structures for v in (label.value, *label.includes)}
    stats: dict[int, tuple[int, float, float]] = {}  # value -> (count, mean, squared deviations)
    for value in wanted:
        inside = volume.array[label_map == value].astype(np.float64)
        mean = float(inside.mean()) if inside.size else 0.0
        inside -= mean
        stats[value] = (inside.size, mean, float(np.dot(inside, inside)))
    results = []
    for label in structures:
        count, mean, deviations = _combined([stats[v] for v in (label.value, *label.includes)])
        if count == 0:
            continue
        results.append(
            Measurement(
                label=label,
                voxel_count=count,
                volume_ml=count * voxel_ml,
                surface_area_cm2=areas.get(label.value),
                mean=mean,
                std=float(np.sqrt(deviations / count)),
            )
        )
    return results


def _combined(parts: list[tuple[int, float, float]]) -> tuple[int, float, float]:
    """Pooled (count, mean, sum of squared deviations) of groups (Chan et al.), stable in float."""
    count, mean, deviations = 0, 0.0, 0.0
    for n, part_mean, part_deviations in parts:
        if n == 0:
            continue
        total = count + n
        delta = part_mean - mean
        deviations += part_deviations + delta * delta * count * n / total
        mean += delta * n / total
        count = total
    return count, mean, deviations
