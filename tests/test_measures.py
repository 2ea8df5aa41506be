"""measure: volumes, areas and HU statistics per structure on a phantom with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from tests.phantoms import Sphere, write_phantom_series
from vesalius.inference.measures import Measurement, measure
from vesalius.inference.models import Label
from vesalius.inference.series import load_series
from vesalius.inference.surfaces import build_meshes

SMALL = Sphere(center=(-14.0, 0.0, 0.0), radius=9.0, hu=100.0)
LARGE = Sphere(center=(12.0, 2.0, 1.0), radius=13.0, hu=300.0)
BOTH = Label(1, "body", (2,))
DENSE = Label(2, "bone")
NOTHING = Label(3, "airways")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory):
    series = write_phantom_series(tmp_path_factory.mktemp("measures"), shape=(28, 48, 64),
                                  spacing=(1.6, 1.2, 1.0), orientation="oblique",
                                  objects=[SMALL, LARGE])
    volume = load_series(series.paths)
    label_map = np.zeros(volume.array.shape, np.uint8)
    label_map[volume.array == SMALL.hu] = 1
    label_map[volume.array == LARGE.hu] = 2
    return volume, label_map


def test_measurements_match_analytic(phantom) -> None:
    volume, label_map = phantom
    meshes = build_meshes(label_map, volume.affine, [BOTH, DENSE])
    results = measure(volume, label_map, [BOTH, DENSE, NOTHING], meshes)
    assert [m.label for m in results] == [BOTH, DENSE]  # no measurement for an empty label
    both, dense = results
    assert isinstance(both, Measurement)
    assert both.volume_ml == pytest.approx((SMALL.volume_mm3 + LARGE.volume_mm3) / 1000, rel=0.02)
    assert dense.volume_ml == pytest.approx(LARGE.volume_mm3 / 1000, rel=0.02)
    assert both.surface_area_cm2 == pytest.approx((SMALL.area_mm2 + LARGE.area_mm2) / 100,
                                                  rel=0.04)
    assert dense.surface_area_cm2 == pytest.approx(LARGE.area_mm2 / 100, rel=0.03)
    assert dense.mean == pytest.approx(300.0)
    assert dense.std == pytest.approx(0.0, abs=1e-6)
    weights = np.array([SMALL.volume_mm3, LARGE.volume_mm3])
    expected_mean = float(np.average([100.0, 300.0], weights=weights))
    assert both.mean == pytest.approx(expected_mean, abs=5.0)
    assert 80.0 < both.std < 100.0  # two values 200 HU apart, roughly 1:3 by volume
    voxel_mm3 = abs(np.linalg.det(volume.affine[:3, :3]))
    assert dense.voxel_count == np.count_nonzero(label_map == 2)
    assert dense.volume_ml == pytest.approx(dense.voxel_count * voxel_mm3 / 1000)


def test_area_is_none_without_a_mesh(phantom) -> None:
    volume, label_map = phantom
    (result,) = measure(volume, label_map, [DENSE], [])
    assert result.surface_area_cm2 is None
    assert result.voxel_count == np.count_nonzero(label_map == 2)


def test_empty_labels_give_no_measurements(phantom) -> None:
    volume, label_map = phantom
    assert measure(volume, np.zeros_like(label_map), [BOTH, DENSE], []) == []
