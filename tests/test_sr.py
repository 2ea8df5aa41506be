"""TID 1500 SR: valid (dciodvfy), values equal the inputs, each group points at its SEG segment."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from tests.dicom_checks import assert_dciodvfy_clean
from tests.dicom_out_inputs import BODY, BONE, LABELS, LUNG_LEFT, LUNG_RIGHT, phantom_volume
from vesalius.dicom_out.identity import MANUFACTURER, SOFTWARE_VERSION, Algorithm, derived_uid
from vesalius.dicom_out.seg import build_seg, segment_numbers
from vesalius.dicom_out.sr import build_sr
from vesalius.inference.measures import Measurement
from vesalius.inference.models import Label
from vesalius.inference.terminology import term_for

ALGORITHM = Algorithm("builtin_ct", "1")
# deliberately not in segment order, and bone without a surface area
MEASUREMENTS = (
    Measurement(LUNG_RIGHT, voxel_count=644, volume_ml=1.41680, surface_area_cm2=6.0832,
                mean=-790.0, std=0.0),
    Measurement(BONE, voxel_count=280, volume_ml=0.616, surface_area_cm2=None, mean=700.0,
                std=1.25),
    Measurement(BODY, voxel_count=20160, volume_ml=44.352, surface_area_cm2=72.5,
                mean=-102.34567, std=301.5),
    Measurement(LUNG_LEFT, voxel_count=644, volume_ml=1.4168, surface_area_cm2=6.0833,
                mean=-810.0, std=0.0),
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory):
    volume, label_map = phantom_volume(tmp_path_factory.mktemp("phantom"))
    seg = build_seg(volume, label_map, LABELS, ALGORITHM)
    return volume, seg, label_map


@pytest.fixture(scope="module")
def written(inputs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    volume, seg, _ = inputs
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    build_sr(volume, seg, MEASUREMENTS, ALGORITHM).save_as(path, enforce_file_format=True)
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
    for measurement in MEASUREMENTS:
        values = _values(by_label[term_for(measurement.label.name).label])
        assert values[("118565006", None)] == (pytest.approx(measurement.volume_ml), "ml")
        assert values[("112031", "373098007")] == (pytest.approx(measurement.mean), "[hnsf'U]")
        assert values[("112031", "386136009")] == (pytest.approx(measurement.std), "[hnsf'U]")
        if measurement.surface_area_cm2 is None:
            assert ("42798000", None) not in values
        else:
            assert values[("42798000", None)] == (pytest.approx(measurement.surface_area_cm2),
                                                  "cm2")
    # DS keeps 16 characters: these inputs survive exactly
    body = _values(by_label["Body"])
    assert body[("112031", "373098007")][0] == -102.34567


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
    first = build_sr(volume, seg, MEASUREMENTS, ALGORITHM)
    again = build_sr(volume, seg, MEASUREMENTS, Algorithm("builtin_ct", "1"))
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID,
                                                               again.SOPInstanceUID)
    newer_algorithm = Algorithm("builtin_ct", "2")
    newer_seg = build_seg(volume, label_map, LABELS, newer_algorithm)
    newer = build_sr(volume, newer_seg, MEASUREMENTS, newer_algorithm)
    assert first.SeriesInstanceUID != newer.SeriesInstanceUID
    assert first.SOPInstanceUID != newer.SOPInstanceUID
    with pytest.raises(ValueError, match="no segment"):  # a SEG of another run does not fit
        build_sr(volume, seg, MEASUREMENTS, newer_algorithm)


def test_refuses_measurements_without_a_segment(inputs) -> None:
    volume, seg, _ = inputs
    airways = Measurement(Label(5, "airways"), voxel_count=1, volume_ml=0.001,
                          surface_area_cm2=None, mean=-1000.0, std=0.0)
    with pytest.raises(ValueError, match="airways"):
        build_sr(volume, seg, [airways], ALGORITHM)
    with pytest.raises(ValueError, match="no measurement"):
        build_sr(volume, seg, [], ALGORITHM)


def test_measurements_from_inference_are_reported(tmp_path: Path) -> None:
    """The pipeline's own measurements (inference.measures) of an oblique phantom."""
    from vesalius.inference.measures import measure
    from vesalius.inference.surfaces import build_meshes

    volume, label_map = phantom_volume(tmp_path / "phantom", orientation="oblique")
    measurements = measure(volume, label_map, LABELS, build_meshes(label_map, volume.affine, LABELS))
    seg = build_seg(volume, label_map, LABELS, ALGORITHM)
    path = tmp_path / "sr.dcm"
    build_sr(volume, seg, measurements, ALGORITHM).save_as(path, enforce_file_format=True)
    assert_dciodvfy_clean(path)
    groups = groups_by_tracking_uid(path)
    numbers = segment_numbers(seg)
    assert len(groups) == len(measurements) == len(seg.SegmentSequence)
    for measurement in measurements:
        uid = next(uid for uid, number in numbers.items()
                   if seg.SegmentSequence[number - 1].SegmentLabel
                   == term_for(measurement.label.name).label)
        values = _values(groups[uid])
        assert values[("118565006", None)][0] == pytest.approx(measurement.volume_ml, rel=1e-9)
        assert values[("42798000", None)][0] == pytest.approx(measurement.surface_area_cm2,
                                                              rel=1e-9)
        assert values[("112031", "373098007")][0] == pytest.approx(measurement.mean, rel=1e-9)
