"""measure: volumes, areas and HU statistics per structure on a phantom with known answers."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest

from tests.dicom_checks import assert_dciodvfy_clean
from tests.phantoms import Sphere, write_phantom_series
from vesalius.dicom_out.identity import Algorithm
from vesalius.dicom_out.seg import build_seg, segment_numbers
from vesalius.dicom_out.sr import build_sr
from vesalius.inference.measures import Measurement, measure, not_found
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
    # the key slice: the one with the most of the structure's voxels (its own and included values)
    assert dense.key_slice == int(np.argmax((label_map == 2).sum(axis=(1, 2))))
    assert both.key_slice == int(np.argmax((label_map > 0).sum(axis=(1, 2))))
    assert both.key_slice != dense.key_slice  # the small sphere's slices count for the body
    assert dense.volume_ml == pytest.approx(dense.voxel_count * voxel_mm3 / 1000)


def test_statistics_over_many_slabs_on_one_core_and_on_two(monkeypatch: pytest.MonkeyPatch) -> None:
    """Value statistics are gathered slab by slab, two slabs at once where two cores may be used:
    pooled in slice order they equal the whole-volume answer, whichever way they ran."""
    from vesalius.inference import device, measures

    rng = np.random.default_rng(7)
    values = rng.integers(-1024, 3000, size=(3 * measures.SLAB_SLICES + 5, 20, 24)).astype(np.int16)
    label_map = rng.integers(0, 4, size=values.shape).astype(np.uint8)
    label_map[: measures.SLAB_SLICES][label_map[: measures.SLAB_SLICES] == 3] = 1  # 3 not in slab 1
    results, per_slice = {}, {}
    for cores in (2, 1):
        monkeypatch.setattr(device, "usable_cores", lambda cores=cores: cores)
        results[cores], per_slice[cores] = measures._value_stats(values, label_map)
    assert results[2] == results[1]
    assert np.array_equal(per_slice[2], per_slice[1])
    for value in (0, 1, 2, 3):  # voxels per slice, in slice order across the slabs
        np.testing.assert_array_equal(per_slice[2][:, value], (label_map == value).sum(axis=(1, 2)))
    for value in (1, 2, 3):
        inside = values[label_map == value].astype(np.float64)
        count, mean, deviations = results[2][value]
        assert count == inside.size
        assert mean == pytest.approx(inside.mean(), rel=1e-12)
        assert deviations == pytest.approx(((inside - inside.mean()) ** 2).sum(), rel=1e-12)


def test_area_is_none_without_a_mesh(phantom) -> None:
    volume, label_map = phantom
    (result,) = measure(volume, label_map, [DENSE], [])
    assert result.surface_area_cm2 is None
    assert result.voxel_count == np.count_nonzero(label_map == 2)


def test_empty_labels_give_no_measurements(phantom) -> None:
    volume, label_map = phantom
    assert measure(volume, np.zeros_like(label_map), [BOTH, DENSE], []) == []


# A slab of 12 slices (z from -9 to 9 mm at its voxel edges): one structure cut by the first slice,
# one cut by the edge of the field of view, one wholly inside, and one declared but absent.
SLAB_SHAPE, SLAB_SPACING = (12, 48, 48), (1.5, 1.0, 1.0)
SLAB_BOTTOM = -SLAB_SHAPE[0] * SLAB_SPACING[0] / 2  # the outer face of the first slice
CUT = Sphere(center=(-10.0, 0.0, SLAB_BOTTOM), radius=7.0, hu=60.0)  # upper half in the scan
EDGE = Sphere(center=(0.0, 22.0, 0.0), radius=5.0, hu=40.0)  # past the last row (y > 24)
INSIDE = Sphere(center=(10.0, 0.0, 0.0), radius=6.0, hu=300.0)
SLAB_LABELS = (Label(1, "liver"), Label(2, "bone"), Label(3, "airways"), Label(4, "heart"))
LIVER, BONE, AIRWAYS, HEART = SLAB_LABELS


@pytest.fixture(scope="module")
def slab(tmp_path_factory: pytest.TempPathFactory):
    series = write_phantom_series(tmp_path_factory.mktemp("slab"), shape=SLAB_SHAPE,
                                  spacing=SLAB_SPACING, objects=[CUT, EDGE, INSIDE])
    volume = load_series(series.paths)
    labels = np.zeros(volume.array.shape, np.uint8)
    for label, sphere in ((LIVER, CUT), (BONE, INSIDE), (HEART, EDGE)):
        labels[volume.array == sphere.hu] = label.value
    meshes = build_meshes(labels, volume.affine, SLAB_LABELS)
    return volume, labels, meshes, measure(volume, labels, SLAB_LABELS, meshes)


def test_structures_cut_by_the_scan_are_incomplete(slab) -> None:
    *_, results = slab
    by_label = {m.label: m for m in results}
    assert by_label[LIVER].incomplete  # touches the first slice
    assert by_label[HEART].incomplete  # touches the last row: the edge of the field of view
    assert not by_label[BONE].incomplete


def test_area_of_a_cut_structure_leaves_out_the_cut_face(slab) -> None:
    *_, meshes, results = slab
    by_label = {m.label: m for m in results}
    # the spherical zone inside the scan: 2 pi R h, with h = R (the centre is on the slab's face)
    uncut = 2 * np.pi * CUT.radius * CUT.radius / 100
    cut_face = np.pi * CUT.radius**2 / 100
    assert by_label[LIVER].surface_area_cm2 == pytest.approx(uncut, rel=0.06)
    mesh_area = next(m.area_mm2 for m in meshes if m.label == LIVER) / 100
    assert mesh_area - by_label[LIVER].surface_area_cm2 == pytest.approx(cut_face, rel=0.15)
    assert by_label[LIVER].volume_ml == pytest.approx(CUT.volume_mm3 / 2 / 1000, rel=0.05)
    # a complete structure keeps its whole surface
    assert by_label[BONE].surface_area_cm2 == pytest.approx(INSIDE.area_mm2 / 100, rel=0.05)
    assert by_label[BONE].surface_area_cm2 == pytest.approx(
        next(m.area_mm2 for m in meshes if m.label == BONE) / 100)


def test_declared_but_absent_structures_are_listed(slab) -> None:
    *_, results = slab
    assert AIRWAYS not in {m.label for m in results}
    assert not_found(SLAB_LABELS, results) == [AIRWAYS]


def test_rounded_to_reported_precision() -> None:
    raw = Measurement(LIVER, 10, 23.9497836549247, 12.04999, -102.5001, 0.4999, 3, incomplete=True)
    shown = raw.rounded()
    assert (shown.volume_ml, shown.surface_area_cm2, shown.mean, shown.std) == (23.9, 12.0, -103.0, 0.0)
    assert shown.incomplete and shown.voxel_count == 10
    assert str(Measurement(LIVER, 1, 0.0, None, -0.4, 0.0, 0).rounded().mean) == "0.0"  # never "-0.0"


def test_sr_flags_the_cut_structure_and_reports_rounded_values(slab, tmp_path) -> None:
    volume, labels, _, results = slab
    algorithm = Algorithm("builtin_ct", "1")
    seg = build_seg(volume, labels, SLAB_LABELS, algorithm)
    path = tmp_path / "sr.dcm"
    build_sr(volume, seg, results, algorithm, label_map=labels).save_as(path, enforce_file_format=True)
    assert_dciodvfy_clean(path)
    numbers = segment_numbers(seg)
    names = {item.SegmentNumber: str(item.SegmentLabel) for item in seg.SegmentSequence}
    groups = {names[numbers[str(g.tracking_uid)]]: g
              for g in hd.sr.srread(path).content.get_volumetric_roi_measurement_groups()}
    assert set(groups) == {"Liver", "Bone", "Heart"}
    for name, incomplete in (("Liver", True), ("Heart", True), ("Bone", False)):
        evaluations = [(e.name.value, e.value.value) for e in groups[name].get_qualitative_evaluations()
                       if e.name.value != "276214006"]  # highdicom adds the Finding Category here
        assert evaluations == ([("130550", "130576")] if incomplete else []), name
    for group in groups.values():
        for item in group.get_measurements():
            decimals = 0 if item.unit.value == "[hnsf'U]" else 1
            assert item.value == round(item.value, decimals)
    (liver,) = [m for m in results if m.label == LIVER]
    volume_item = next(i for i in groups["Liver"].get_measurements() if i.name.value == "118565006")
    assert volume_item.value == round(liver.volume_ml, 1) != liver.volume_ml
