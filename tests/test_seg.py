"""DICOM SEG: valid (dciodvfy), voxel-exact when decoded by highdicom and by dcmqi, coded, ours."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from tests.dicom_checks import assert_dciodvfy_clean, tool
from tests.dicom_out_inputs import LABELS, phantom_volume
from vesalius.dicom_out.identity import MANUFACTURER, SOFTWARE_VERSION, Algorithm, derived_uid
from vesalius.dicom_out.seg import (
    build_seg,
    check_reference,
    present_labels,
    seg_reference,
    segment_numbers,
)
from vesalius.inference.models import Label
from vesalius.inference.series import load_series
from vesalius.inference.terminology import term_for
from vesalius.inference.volume import Volume

ALGORITHM = Algorithm("builtin_ct", "1")


@pytest.fixture(scope="module")
def oblique(tmp_path_factory: pytest.TempPathFactory) -> tuple[Volume, np.ndarray]:
    return phantom_volume(tmp_path_factory.mktemp("oblique"), orientation="oblique")


@pytest.fixture(scope="module")
def oblique_seg(oblique: tuple[Volume, np.ndarray],
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    volume, label_map = oblique
    path = tmp_path_factory.mktemp("seg") / "seg.dcm"
    build_seg(volume, label_map, LABELS, ALGORITHM).save_as(path, enforce_file_format=True)
    return path


def expected_masks(label_map: np.ndarray, structures=LABELS) -> tuple[list[Label], np.ndarray]:
    present = [label for label in structures if label.mask(label_map).any()]
    return present, np.stack([label.mask(label_map) for label in present], axis=-1)


def test_seg_passes_dciodvfy(oblique_seg: Path) -> None:
    assert_dciodvfy_clean(oblique_seg)


def test_highdicom_reads_back_the_same_voxels_per_source_slice(
        oblique: tuple[Volume, np.ndarray], oblique_seg: Path) -> None:
    volume, label_map = oblique
    present, masks = expected_masks(label_map)
    seg = hd.seg.segread(oblique_seg)
    assert seg.get_segment_numbers() == list(range(1, len(present) + 1))
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in volume.sources],
        combine_segments=False,
    )
    assert pixels.shape == masks.shape
    np.testing.assert_array_equal(pixels.astype(bool), masks)
    # the body contains the lungs: segments overlap and both keep their voxels
    assert (masks[..., 0] & masks[..., 1]).any()


def test_highdicom_volume_has_the_source_geometry(oblique: tuple[Volume, np.ndarray],
                                                  oblique_seg: Path) -> None:
    volume, label_map = oblique
    _, masks = expected_masks(label_map)
    geometry = hd.VolumeGeometry(volume.affine, volume.array.shape, "PATIENT",
                                 volume.frame_of_reference_uid)
    decoded = hd.seg.segread(oblique_seg).get_volume(combine_segments=False)
    matched = decoded.match_geometry(geometry)
    np.testing.assert_allclose(matched.affine, volume.affine, atol=1e-4)
    np.testing.assert_array_equal(matched.array.astype(bool), masks)


def test_dcmqi_decodes_the_same_voxels_and_geometry(oblique: tuple[Volume, np.ndarray],
                                                     oblique_seg: Path, tmp_path: Path) -> None:
    volume, label_map = oblique
    _, masks = expected_masks(label_map)
    result = subprocess.run(
        [tool("segimage2itkimage"), "--inputDICOM", str(oblique_seg), "--outputDirectory",
         str(tmp_path), "-t", "nrrd", "-p", "seg"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    spacing = volume.spacing  # (slice, row, col)
    directions = volume.affine[:3, :3] / spacing  # columns: unit slice, row, col vectors
    for number in range(1, masks.shape[-1] + 1):
        image = sitk.ReadImage(str(tmp_path / f"seg-{number}.nrrd"))
        # ITK's x, y, z are our col, row, slice
        np.testing.assert_allclose(image.GetOrigin(), volume.affine[:3, 3], atol=1e-4)
        np.testing.assert_allclose(image.GetSpacing(), spacing[::-1], rtol=1e-6)
        direction = np.array(image.GetDirection()).reshape(3, 3)
        np.testing.assert_allclose(direction, directions[:, ::-1], atol=1e-5)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image).astype(bool),
                                      masks[..., number - 1])


def test_segments_are_coded_from_the_table_and_empty_labels_are_left_out(
        oblique: tuple[Volume, np.ndarray], oblique_seg: Path) -> None:
    volume, label_map = oblique
    present, _ = expected_masks(label_map)
    assert "airways" not in [label.name for label in present]  # empty in the phantom
    ds = pydicom.dcmread(oblique_seg)
    assert len(ds.SegmentSequence) == len(present)
    for number, (item, label) in enumerate(zip(ds.SegmentSequence, present, strict=True), 1):
        term = term_for(label.name)
        assert item.SegmentNumber == number
        assert item.SegmentLabel == term.label
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName == ALGORITHM.name
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("builtin_ct", "1")
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == (term.category.value,
                                                                         "SCT")
        assert (kind.CodeValue, kind.CodingSchemeDesignator) == (term.type.value, "SCT")
        modifiers = kind.get("SegmentedPropertyTypeModifierCodeSequence", [])
        if term.modifier is None:
            assert not modifiers
        else:
            assert [m.CodeValue for m in modifiers] == [term.modifier.value]
        assert list(item.RecommendedDisplayCIELabValue) == list(term.cielab)
    lungs = {item.SegmentLabel: item for item in ds.SegmentSequence}
    left = lungs["Left lung"].SegmentedPropertyTypeCodeSequence[0]
    assert left.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"
    assert segment_numbers(ds) == {str(item.TrackingUID): item.SegmentNumber
                                   for item in ds.SegmentSequence}


def test_the_reference_known_before_writing_is_the_written_seg(
        oblique: tuple[Volume, np.ndarray], oblique_seg: Path) -> None:
    """The SR and surfaces are built from seg_reference while the SEG is still being written."""
    volume, label_map = oblique
    reference = seg_reference(volume, present_labels(label_map, LABELS), ALGORITHM)
    written = pydicom.dcmread(oblique_seg, stop_before_pixels=True)
    check_reference(reference, written)  # raises on any difference
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID",
                    "PatientID", "PatientName", "PatientBirthDate", "StudyDate", "AccessionNumber"):
        assert reference[keyword].value == written[keyword].value
    assert segment_numbers(reference) == segment_numbers(written)
    assert len(segment_numbers(written)) >= 3  # several segments, numbered in model order
    fewer = label_map.copy()
    fewer[fewer == LABELS[-1].value] = 0  # one structure less: segment numbers shift
    fewer[fewer == next(label for label in LABELS if label.mask(label_map).any()).value] = 0
    with pytest.raises(ValueError, match="SegmentSequence"):
        check_reference(seg_reference(volume, present_labels(fewer, LABELS), ALGORITHM), written)
    other = Algorithm(name=ALGORITHM.name, version="other", family=ALGORITHM.family)
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        check_reference(seg_reference(volume, present_labels(label_map, LABELS), other), written)


def test_seg_is_ours_in_the_source_study_with_derived_uids(
        oblique: tuple[Volume, np.ndarray], oblique_seg: Path) -> None:
    volume, _ = oblique
    ds = pydicom.dcmread(oblique_seg)
    source = volume.sources[0]
    assert ds.StudyInstanceUID == volume.study_uid
    assert ds.PatientID == source.PatientID
    assert ds.FrameOfReferenceUID == volume.frame_of_reference_uid
    assert ds.SeriesInstanceUID != volume.series_uid
    assert ds.SeriesInstanceUID == derived_uid(volume.series_uid, ALGORITHM, "seg/series")
    assert ds.SOPInstanceUID == derived_uid(volume.series_uid, ALGORITHM, "seg/instance")
    assert ds.SeriesInstanceUID.startswith("2.25.")
    assert ds.Manufacturer == MANUFACTURER
    assert ds.SoftwareVersions == SOFTWARE_VERSION
    assert ds.SeriesDescription == f"Vesalius builtin_ct {ALGORITHM.version} - Segmentation"
    assert ds.SeriesNumber == 9001
    assert ds.SeriesDate == ds.ContentDate and ds.SeriesTime == ds.ContentTime
    assert ds.SegmentationType == "BINARY"
    referenced = {item.ReferencedSOPInstanceUID
                  for item in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {s.SOPInstanceUID for s in volume.sources}


def test_building_twice_gives_the_same_uids_and_a_new_version_new_ones(
        oblique: tuple[Volume, np.ndarray]) -> None:
    volume, label_map = oblique
    first = build_seg(volume, label_map, LABELS, ALGORITHM)
    again = build_seg(volume, label_map, LABELS, Algorithm("builtin_ct", "1"))
    newer = build_seg(volume, label_map, LABELS, Algorithm("builtin_ct", "2"))
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID,
                                                               again.SOPInstanceUID)
    assert first.SeriesInstanceUID != newer.SeriesInstanceUID
    assert first.SOPInstanceUID != newer.SOPInstanceUID
    assert first.SegmentSequence[0].TrackingUID == again.SegmentSequence[0].TrackingUID
    assert first.SegmentSequence[0].TrackingUID != newer.SegmentSequence[0].TrackingUID


def test_feet_first_series_round_trips(tmp_path: Path) -> None:
    volume, label_map = phantom_volume(tmp_path / "ffs", feet_first=True)
    _, masks = expected_masks(label_map)
    seg = build_seg(volume, label_map, LABELS, ALGORITHM)
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    assert_dciodvfy_clean(path)
    pixels = hd.seg.segread(path).get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in volume.sources],
        combine_segments=False,
    )
    np.testing.assert_array_equal(pixels.astype(bool), masks)


def test_refuses_nothing_to_segment_and_mismatched_shapes(
        oblique: tuple[Volume, np.ndarray]) -> None:
    volume, label_map = oblique
    with pytest.raises(ValueError, match="no label"):
        build_seg(volume, np.zeros_like(label_map), LABELS, ALGORITHM)
    with pytest.raises(ValueError, match="shape"):
        build_seg(volume, label_map[:-1], LABELS, ALGORITHM)
    with pytest.raises(KeyError, match="unicorn_gland"):
        build_seg(volume, label_map, (Label(1, "unicorn_gland"),), ALGORITHM)


@pytest.mark.filterwarnings("ignore:The string .* unlikely to represent:UserWarning")
def test_real_ct_liver_matches_the_dcmqi_reference_seg(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "ct-3slice-ge"
    volume = load_series(sorted(folder.glob("0*.dcm")))
    label_image = sitk.ReadImage(str(folder / "liver_seg.nrrd"))
    np.testing.assert_allclose(label_image.GetOrigin(), volume.affine[:3, 3], atol=1e-3)
    label_map = sitk.GetArrayFromImage(label_image).astype(np.uint8)
    assert label_map.shape == volume.array.shape
    liver = Label(1, "liver")
    assert volume.sources[0]["SpecificCharacterSet"].is_empty  # GE writes it empty
    seg = build_seg(volume, label_map, (liver,), ALGORITHM)
    assert "SpecificCharacterSet" in volume.sources[0]  # the sources are not modified
    path = tmp_path / "liver.dcm"
    seg.save_as(path, enforce_file_format=True)
    assert_dciodvfy_clean(path)

    uids = [ds.SOPInstanceUID for ds in volume.sources]
    ours = hd.seg.segread(path).get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1], combine_segments=False)
    reference = hd.seg.segread(folder / "reference-seg" / "liver_seg_dcmqi.dcm")
    theirs = reference.get_pixels_by_source_instance(  # dcmqi leaves SpatialLocationsPreserved out
        source_sop_instance_uids=uids, segment_numbers=[1], combine_segments=False,
        ignore_spatial_locations=True)
    assert theirs.any()
    np.testing.assert_array_equal(ours.astype(bool), theirs.astype(bool))
    np.testing.assert_array_equal(ours[..., 0].astype(bool), label_map == 1)


def test_labelmap_is_its_own_object_with_the_same_segments(
        oblique: tuple[Volume, np.ndarray]) -> None:
    volume, label_map = oblique
    binary = build_seg(volume, label_map, LABELS, ALGORITHM)
    labelmap = build_seg(volume, label_map, LABELS, ALGORITHM, segmentation_type="LABELMAP")
    assert labelmap.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    assert labelmap.SegmentationType == "LABELMAP"
    assert labelmap.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    assert labelmap.SOPInstanceUID != binary.SOPInstanceUID
    assert labelmap.SeriesInstanceUID != binary.SeriesInstanceUID
    assert labelmap.SOPInstanceUID == derived_uid(volume.series_uid, ALGORITHM,
                                                  "labelmap-seg/instance")
    assert segment_numbers(labelmap) == segment_numbers(binary)  # same numbers, tracking UIDs
    assert labelmap.NumberOfFrames == len(volume.sources)  # one frame per slice, none omitted
    body = next(i for i in labelmap.SegmentSequence if i.get("SegmentLabel") == "Body")
    assert "with segments 2, 3, 4" in body.SegmentDescription  # the lungs and bone complete it
    with pytest.raises(ValueError, match="segmentation_type"):
        build_seg(volume, label_map, LABELS, ALGORITHM, segmentation_type="FRACTIONAL")


def test_labelmap_has_no_background_item_and_reads_back(
        oblique: tuple[Volume, np.ndarray], tmp_path: Path) -> None:
    """OHIF lists a Segment Number 0 item and colours segments by list position: none is written.

    The segments are the BINARY SEG's, item for item (numbers 1..N, labels, colours), and
    highdicom still reads the object as 1..N with pixel value 0 as no segment.
    """
    volume, labels = oblique
    binary = build_seg(volume, labels, LABELS, ALGORITHM)
    path = tmp_path / "labelmap.dcm"
    build_seg(volume, labels, LABELS, ALGORITHM, segmentation_type="LABELMAP").save_as(
        path, enforce_file_format=True)
    assert_dciodvfy_clean(path)
    written = pydicom.dcmread(path)
    numbers = [int(item.SegmentNumber) for item in written.SegmentSequence]
    assert numbers == [int(item.SegmentNumber) for item in binary.SegmentSequence]
    assert numbers == list(range(1, len(numbers) + 1))
    for ours, theirs in zip(written.SegmentSequence, binary.SegmentSequence, strict=True):
        assert ours.SegmentLabel == theirs.SegmentLabel
        assert list(ours.RecommendedDisplayCIELabValue) == list(theirs.RecommendedDisplayCIELabValue)
    assert written.PixelPaddingValue == 0  # pixels in no segment
    seg = hd.seg.segread(path)
    assert seg.get_segment_numbers() == numbers
    assert [seg.get_segment_description(n).segment_label for n in numbers] == [
        str(item.SegmentLabel) for item in binary.SegmentSequence]


def test_binary_seg_keeps_empty_frames_aligned_to_every_slice(
        oblique: tuple[Volume, np.ndarray], oblique_seg: Path) -> None:
    volume, label_map = oblique
    ds = pydicom.dcmread(oblique_seg)
    present, _ = expected_masks(label_map)
    assert ds.NumberOfFrames == len(volume.sources) * len(present)
    for frame in ds.PerFrameFunctionalGroupsSequence:
        [source] = [s for d in frame.DerivationImageSequence for s in d.SourceImageSequence]
        slice_index = [s.SOPInstanceUID for s in volume.sources].index(
            source.ReferencedSOPInstanceUID)
        np.testing.assert_allclose(frame.PlanePositionSequence[0].ImagePositionPatient,
                                   volume.affine[:3, :3] @ [slice_index, 0, 0]
                                   + volume.affine[:3, 3], atol=1e-4)
