"""TID 1500 SR: valid (dciodvfy), values equal the inputs, each group points at its SEG segment."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from tests.dicom_checks import assert_dciodvfy_clean
from tests.dicom_out_inputs import BODY, BONE, LABELS, LUNG_LEFT, LUNG_RIGHT, phantom_volume
from tests.object_checks import sr_problems
from vesalius.dicom_out.identity import MANUFACTURER, SOFTWARE_VERSION, Algorithm, derived_uid
from vesalius.dicom_out.seg import build_seg, segment_numbers
from vesalius.dicom_out.sr import build_sr
from vesalius.inference.measures import Measurement
from vesalius.inference.models import Label
from vesalius.inference.terminology import term_for

ALGORITHM = Algorithm("builtin_ct", "1")
# deliberately not in segment order, and bone without a surface area; key slices where each
# structure has voxels in phantom_volume (the left lung's is not its largest: the SR places the
# region on the slice the measurement names)
MEASUREMENTS = (
    Measurement(LUNG_RIGHT, voxel_count=644, volume_ml=1.41680, surface_area_cm2=6.0832,
                mean=-790.0, std=0.0, key_slice=6),
    Measurement(BONE, voxel_count=280, volume_ml=0.616, surface_area_cm2=None, mean=700.0,
                std=1.25, key_slice=2),
    Measurement(BODY, voxel_count=20160, volume_ml=44.352, surface_area_cm2=72.5,
                mean=-102.34567, std=301.5, key_slice=0),
    Measurement(LUNG_LEFT, voxel_count=644, volume_ml=1.4168, surface_area_cm2=6.0833,
                mean=-810.0, std=0.0, key_slice=8),
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory):
    volume, label_map = phantom_volume(tmp_path_factory.mktemp("phantom"))
    seg = build_seg(volume, label_map, LABELS, ALGORITHM)
    return volume, seg, label_map


@pytest.fixture(scope="module")
def written(inputs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    volume, seg, label_map = inputs
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    sr = build_sr(volume, seg, MEASUREMENTS, ALGORITHM, label_map=label_map)
    sr.save_as(path, enforce_file_format=True)
    return path


def groups_by_tracking_uid(path: Path) -> dict[str, object]:
    report = hd.sr.srread(path).content
    return {str(group.tracking_uid): group
            for group in report.get_volumetric_roi_measurement_groups()}


def test_sr_passes_dciodvfy(written: Path) -> None:
    assert_dciodvfy_clean(written)


def test_each_group_references_its_seg_segment(inputs, written: Path) -> None:
    volume, seg, _ = inputs
    numbers = segment_numbers(seg)
    labels_by_number = {item.SegmentNumber: str(item.SegmentLabel) for item in seg.SegmentSequence}
    groups = groups_by_tracking_uid(written)
    assert set(groups) <= set(numbers) and len(groups) == len(MEASUREMENTS)
    for measurement in MEASUREMENTS:
        term = term_for(measurement.label.name)
        [group] = [g for uid, g in groups.items() if labels_by_number[numbers[uid]] == term.label]
        referenced = group.referenced_segment
        assert referenced.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert referenced.referenced_sop_class_uid == seg.SOPClassUID
        assert referenced.referenced_segment_numbers == [numbers[str(group.tracking_uid)]]
        assert referenced.source_series_for_segmentation.value == volume.series_uid
        assert group.finding_type.value == term.type.value


def _values(group) -> dict[tuple[str, str | None], tuple[float, str]]:
    out = {}
    for item in group.get_measurements():
        derivation = item.derivation.value if item.derivation is not None else None
        out[(item.name.value, derivation)] = (item.value, item.unit.value)
    return out


def test_measured_values_and_units_equal_the_inputs(inputs, written: Path) -> None:
    _, seg, _ = inputs
    numbers = segment_numbers(seg)
    labels_by_number = {item.SegmentNumber: str(item.SegmentLabel) for item in seg.SegmentSequence}
    groups = groups_by_tracking_uid(written)
    by_label = {labels_by_number[numbers[uid]]: group for uid, group in groups.items()}
    for measurement in (m.rounded() for m in MEASUREMENTS):  # reported at 0.1 mL, 0.1 cm2, 1 HU
        values = _values(by_label[term_for(measurement.label.name).label])
        assert values[("118565006", None)] == (pytest.approx(measurement.volume_ml), "ml")
        assert values[("112031", "373098007")] == (pytest.approx(measurement.mean), "[hnsf'U]")
        assert values[("112031", "386136009")] == (pytest.approx(measurement.std), "[hnsf'U]")
        if measurement.surface_area_cm2 is None:
            assert ("42798000", None) not in values
        else:
            assert values[("42798000", None)] == (pytest.approx(measurement.surface_area_cm2),
                                                  "cm2")
    # rounded, not carried with 15 significant digits
    body = _values(by_label["Body"])
    assert body[("112031", "373098007")][0] == -102.0
    assert _values(by_label["Right lung"])[("118565006", None)][0] == 1.4


def test_sr_is_ours_in_the_source_study_with_derived_uids(inputs, written: Path) -> None:
    volume, seg, _ = inputs
    ds = pydicom.dcmread(written)
    assert ds.StudyInstanceUID == volume.study_uid
    assert ds.SeriesInstanceUID == derived_uid(volume.series_uid, ALGORITHM, "sr/series")
    assert ds.SOPInstanceUID == derived_uid(volume.series_uid, ALGORITHM, "sr/instance")
    assert ds.SeriesInstanceUID not in {volume.series_uid, seg.SeriesInstanceUID}
    assert (ds.Manufacturer, ds.SoftwareVersions) == (MANUFACTURER, SOFTWARE_VERSION)
    assert ds.Modality == "SR"
    evidence = {item.ReferencedSOPInstanceUID
                for study in ds.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for item in series.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence


def test_uids_are_deterministic_and_change_with_the_version(inputs) -> None:
    volume, seg, label_map = inputs
    first = build_sr(volume, seg, MEASUREMENTS, ALGORITHM, label_map=label_map)
    again = build_sr(volume, seg, MEASUREMENTS, Algorithm("builtin_ct", "1"), label_map=label_map)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID,
                                                               again.SOPInstanceUID)
    newer_algorithm = Algorithm("builtin_ct", "2")
    newer_seg = build_seg(volume, label_map, LABELS, newer_algorithm)
    newer = build_sr(volume, newer_seg, MEASUREMENTS, newer_algorithm, label_map=label_map)
    assert first.SeriesInstanceUID != newer.SeriesInstanceUID
    assert first.SOPInstanceUID != newer.SOPInstanceUID
    with pytest.raises(ValueError, match="no segment"):  # a SEG of another run does not fit
        build_sr(volume, seg, MEASUREMENTS, newer_algorithm, label_map=label_map)


def test_refuses_a_key_slice_without_the_structure(inputs) -> None:
    """A measurement of another label map (its key slice shows none of the structure) is refused,
    not reported with a region around nothing."""
    volume, seg, label_map = inputs
    bone = dataclasses.replace(MEASUREMENTS[1], key_slice=0)  # bone spans slices 2-11 only
    with pytest.raises(ValueError, match="no voxel on its key slice 0"):
        build_sr(volume, seg, [bone], ALGORITHM, label_map=label_map)


def test_refuses_measurements_without_a_segment(inputs) -> None:
    volume, seg, label_map = inputs
    airways = Measurement(Label(5, "airways"), voxel_count=1, volume_ml=0.001,
                          surface_area_cm2=None, mean=-1000.0, std=0.0, key_slice=0)
    with pytest.raises(ValueError, match="airways"):
        build_sr(volume, seg, [airways], ALGORITHM, label_map=label_map)
    with pytest.raises(ValueError, match="no measurement"):
        build_sr(volume, seg, [], ALGORITHM, label_map=label_map)


def test_measurements_from_inference_are_reported(tmp_path: Path) -> None:
    """The pipeline's own measurements (inference.measures) of an oblique phantom."""
    from vesalius.inference.measures import measure
    from vesalius.inference.surfaces import build_meshes

    volume, label_map = phantom_volume(tmp_path / "phantom", orientation="oblique")
    measurements = measure(volume, label_map, LABELS, build_meshes(label_map, volume.affine, LABELS))
    seg = build_seg(volume, label_map, LABELS, ALGORITHM)
    path = tmp_path / "sr.dcm"
    sr = build_sr(volume, seg, measurements, ALGORITHM, label_map=label_map)
    sr.save_as(path, enforce_file_format=True)
    assert_dciodvfy_clean(path)
    groups = groups_by_tracking_uid(path)
    numbers = segment_numbers(seg)
    assert len(groups) == len(measurements) == len(seg.SegmentSequence)
    for measurement in (m.rounded() for m in measurements):
        uid = next(uid for uid, number in numbers.items()
                   if seg.SegmentSequence[number - 1].SegmentLabel
                   == term_for(measurement.label.name).label)
        values = _values(groups[uid])
        assert values[("118565006", None)][0] == pytest.approx(measurement.volume_ml, rel=1e-9)
        assert values[("42798000", None)][0] == pytest.approx(measurement.surface_area_cm2,
                                                              rel=1e-9)
        assert values[("112031", "373098007")][0] == pytest.approx(measurement.mean, rel=1e-9)


def test_each_structure_is_located_on_its_key_slice_for_viewers(inputs, written: Path) -> None:
    """A TID 1410 group per structure, same Tracking UID: the rectangle enclosing the structure
    on the source slice of its measurement's key slice (what OHIF needs to show the numbers)."""
    volume, seg, label_map = inputs
    report = hd.sr.srread(written).content
    planar = {str(g.tracking_uid): g for g in report.get_planar_roi_measurement_groups()}
    volumetric = groups_by_tracking_uid(written)
    assert set(planar) == set(volumetric)
    by_name = {m.label.name: m for m in MEASUREMENTS}
    for uid, group in planar.items():
        measurement = by_name[next(n for n in by_name
                                   if str(volumetric[uid].tracking_identifier) == term_for(n).label)]
        mask = measurement.label.mask(label_map)
        z = measurement.key_slice
        region = group.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        source = region.ContentSequence[0].ReferencedSOPSequence[0]
        assert source.ReferencedSOPInstanceUID == volume.sources[z].SOPInstanceUID
        points = region.value
        rows, cols = np.nonzero(mask[z])
        np.testing.assert_array_equal(points.min(axis=0), [cols.min(), rows.min()])
        np.testing.assert_array_equal(points.max(axis=0), [cols.max() + 1, rows.max() + 1])
        np.testing.assert_array_equal(points[0], points[-1])  # closed
    assert sr_problems(pydicom.dcmread(written), seg) == []
