"""What ``vesalius evaluate`` reads, and that every way of writing the same labels gives the same
figures: our SEGs (BINARY, LABELMAP), dcmqi's SEG, NIfTI and NRRD label maps, results folders; the
grids (same lattice, other extent, resampled, another frame of reference); mapping and matching; and
builtin_ct on the real TotalSegmentator example, against the Dice tests/realdata.py reports."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.phantoms import Box, Cylinder, write_phantom_series
from tests.realdata import REFERENCE_PARTS, builtin_ct_dice, dice, write_nifti_as_dicom_series
from vesalius.dicom_out.identity import Algorithm
from vesalius.dicom_out.seg import LABELMAP, build_seg
from vesalius.inference.evaluation import EvaluationError, evaluate, read_label_image
from vesalius.inference.evaluation.read import RESULTS_LABEL_MAPS, RESULTS_SEG_FILE, SUMMARY_FILE
from vesalius.inference.models import Label
from vesalius.inference.models.builtin_ct import LUNG_LEFT
from vesalius.inference.series import load_series
from vesalius.inference.volume import Volume
from vesalius.inference.volume_files import label_map_name
from vesalius.node.pipeline import OUTPUT_FILES, run_pipeline, run_pipeline_on_file

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
ALGORITHM = Algorithm("evaluate-test", "1")
PLAIN = (Label(1, "body"), Label(2, "lung_left"), Label(3, "lung_right"))
NESTED = (Label(1, "body", (2, 3)), Label(2, "lung_left"), Label(3, "lung_right"))  # as builtin_ct's body
NAMES = {"1": "body", "2": "lung_left", "3": "lung_right"}
CHEST = [Cylinder((0, 0, 0), (0, 0, 1), 30, 60, 40), Box((14, 0, 0), (16, 24, 40), -850),
         Box((-14, 0, 0), (16, 24, 40), -850)]


def _label_map(volume: Volume) -> np.ndarray:
    index = np.indices(volume.array.shape).reshape(3, -1).T
    points = (index @ volume.affine[:3, :3].T + volume.affine[:3, 3]).reshape((*volume.array.shape, 3))
    label_map = np.zeros(volume.array.shape, np.uint8)
    for value, shape in enumerate(CHEST, start=1):  # lungs (boxes) painted over the body
        label_map[shape.inside(points)] = value
    return label_map


@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> tuple[Volume, np.ndarray, Path]:
    folder = tmp_path_factory.mktemp("chest")
    series = write_phantom_series(folder / "ct", shape=(24, 48, 48), spacing=(2.5, 1.5, 1.5), objects=CHEST)
    volume = load_series(series.paths)
    return volume, _label_map(volume), folder


def _seg(volume: Volume, label_map: np.ndarray, path: Path, structures=PLAIN, kind: str = "BINARY") -> Path:
    build_seg(volume, label_map, structures, ALGORITHM, segmentation_type=kind).save_as(
        path, enforce_file_format=True)
    return path


def _nifti(label_map: np.ndarray, affine: np.ndarray, path: Path, names: dict = NAMES) -> tuple[Path, Path]:
    nib.save(nib.Nifti1Image(label_map.astype(np.uint8), RAS_TO_LPS @ affine), str(path))
    labels = path.with_name(path.name.split(".")[0] + "-labels.json")
    labels.write_text(json.dumps(names))
    return path, labels


def _rows(evaluation) -> list[dict]:
    return [dict(row) for row in evaluation.structures]


def test_seg_against_the_same_labels_as_nifti_and_nrrd_is_dice_one(chest, tmp_path: Path) -> None:
    import nrrd

    volume, label_map, _ = chest
    seg = _seg(volume, label_map, tmp_path / "seg.dcm")
    nifti, labels = _nifti(label_map, volume.affine, tmp_path / "ref.nii.gz")
    nrrd_path = tmp_path / "ref.nrrd"  # NRRD index order is (col, row, slice) in LPS
    directions = volume.affine[:3, [2, 1, 0]].T
    nrrd.write(str(nrrd_path), np.transpose(label_map, (2, 1, 0)).copy(),
               {"space": "left-posterior-superior", "space directions": directions,
                "space origin": volume.affine[:3, 3]})
    for ref in (nifti, nrrd_path):
        evaluation = evaluate(seg, ref, ref_labels=labels)
        assert [(r["name"], r["reference_name"], r["matched_by"]) for r in evaluation.structures] == [
            ("Body", "body", "concept"), ("Left lung", "lung_left", "concept"),
            ("Right lung", "lung_right", "concept")]
        for row in evaluation.structures:
            assert (row["dice"], row["iou"], row["hausdorff_mm"], row["hd95_mm"]) == (1.0, 1.0, 0.0, 0.0)
            assert row["volume_diff_ml"] == 0.0 and row["volume_ref_ml"] > 0
        assert evaluation.resampled is False
        assert not evaluation.unmatched_pred and not evaluation.unmatched_ref


def test_dcmqi_seg_against_its_nrrd_labels(shared_data: Path, tmp_path: Path) -> None:
    """Another writer's SEG (dcmqi, retired SNOMED-RT codes) of real data: matched by concept."""
    folder = shared_data / "ct-3slice-ge"
    labels = tmp_path / "liver.json"
    labels.write_text('{"1": "liver"}')
    evaluation = evaluate(folder / "reference-seg" / "liver_seg_dcmqi.dcm", folder / "liver_seg.nrrd",
                          ref_labels=labels)
    row = evaluation.structure("Liver")
    assert row["matched_by"] == "concept" and row["dice"] == 1.0 and row["hausdorff_mm"] == 0.0
    assert row["volume_pred_ml"] == row["volume_ref_ml"] > 50


def test_labelmap_and_binary_segs_of_the_same_labels_give_identical_figures(chest, tmp_path: Path) -> None:
    """The body holds the lungs: a LABELMAP SEG keeps one segment per voxel and says which segments
    complete the body; read back, it is the same body as the BINARY SEG's."""
    volume, label_map, _ = chest
    binary = _seg(volume, label_map, tmp_path / "binary.dcm", NESTED)
    labelmap = _seg(volume, label_map, tmp_path / "labelmap.dcm", NESTED, LABELMAP)
    nifti, labels = _nifti(label_map, volume.affine, tmp_path / "ref.nii.gz")
    mapping = {"body": ("body", "lung_left", "lung_right"), "lung_left": ("lung_left",),
               "lung_right": ("lung_right",)}
    from_binary = evaluate(binary, nifti, mapping, ref_labels=labels)
    from_labelmap = evaluate(labelmap, nifti, mapping, ref_labels=labels)
    assert _rows(from_binary) == _rows(from_labelmap)
    assert all(row["dice"] == 1.0 for row in from_binary.structures) and len(from_binary.structures) == 3
    both = evaluate(labelmap, binary)
    assert [row["dice"] for row in both.structures] == [1.0, 1.0, 1.0]


def test_another_extent_of_the_same_lattice_is_not_resampled(chest, tmp_path: Path) -> None:
    volume, label_map, _ = chest
    seg = _seg(volume, label_map, tmp_path / "seg.dcm")
    shifted = volume.affine.copy()
    shifted[:3, 3] += volume.affine[:3, :3] @ np.array([2.0, 3.0, 0.0])  # starts 2 slices, 3 rows in
    cropped = label_map[2:-1, 3:, :]
    assert cropped.sum() < label_map.sum()
    nifti, labels = _nifti(cropped, shifted, tmp_path / "cropped.nii.gz")
    evaluation = evaluate(seg, nifti, ref_labels=labels)
    assert evaluation.resampled is False
    padded = np.zeros_like(label_map)
    padded[2:-1, 3:, :] = cropped
    for label, row in zip(PLAIN, evaluation.structures, strict=True):
        assert row["dice"] == pytest.approx(dice(label_map == label.value, padded == label.value), abs=1e-12)


def test_a_reference_on_another_grid_is_resampled_onto_the_prediction(chest, tmp_path: Path) -> None:
    volume, label_map, _ = chest
    seg = _seg(volume, label_map, tmp_path / "seg.dcm")
    coarse = volume.affine @ np.diag([1.0, 2.0, 2.0, 1.0])  # every other row and column
    coarse[:3, 3] += volume.affine[:3, :3] @ np.array([0.0, 0.5, 0.5])  # centred on 2x2 blocks
    nifti, labels = _nifti(label_map[:, ::2, ::2], coarse, tmp_path / "coarse.nii.gz")
    evaluation = evaluate(seg, nifti, ref_labels=labels)
    assert evaluation.resampled is True
    for row in evaluation.structures:
        assert 0.9 < row["dice"] < 1.0
        assert row["volume_ref_ml"] == pytest.approx(row["volume_pred_ml"], rel=0.1)


def test_different_frames_of_reference_are_refused(chest, tmp_path: Path) -> None:
    volume, label_map, folder = chest
    other = load_series(write_phantom_series(tmp_path / "other", shape=(24, 48, 48), spacing=(2.5, 1.5, 1.5),
                                             objects=CHEST).paths)
    assert other.frame_of_reference_uid != volume.frame_of_reference_uid
    ours = _seg(volume, label_map, tmp_path / "ours.dcm")
    theirs = _seg(other, _label_map(other), tmp_path / "theirs.dcm")
    with pytest.raises(EvaluationError, match="different frames of reference"):
        evaluate(ours, theirs)


def test_a_map_groups_reference_structures_and_the_unmatched_are_listed(chest, tmp_path: Path) -> None:
    volume, label_map, _ = chest
    seg = _seg(volume, label_map, tmp_path / "seg.dcm")
    lobes = label_map.copy()
    lobes[label_map == 2] = 4  # the left lung as two lobes, split across the slices
    lobes[:12][label_map[:12] == 2] = 5
    lobes[label_map == 3] = 0  # no right lung in the reference
    lobes[:2, :4, :4] = 6  # and a structure we do not segment
    names = {"1": "body", "4": "lung_lower_lobe_left", "5": "lung_upper_lobe_left", "6": "spleen"}
    nifti, labels = _nifti(lobes, volume.affine, tmp_path / "lobes.nii.gz", names)
    without = evaluate(seg, nifti, ref_labels=labels)
    assert [r["name"] for r in without.structures] == ["Body"]
    assert set(without.unmatched_pred) == {"Left lung", "Right lung"}
    assert set(without.unmatched_ref) == {"lung_lower_lobe_left", "lung_upper_lobe_left", "spleen"}
    mapping = {"lung_left": ("lung_*_lobe_left",), "liver": ("liver*",)}
    grouped = evaluate(seg, nifti, mapping, ref_labels=labels)
    row = grouped.structure("Left lung")
    assert grouped.structure("lung_left") is row  # by the reference's name too
    assert (row["reference_name"], row["matched_by"], row["dice"]) == ("lung_left", "concept", 1.0)
    assert grouped.unmatched_pred == ("Right lung",) and grouped.unmatched_ref == ("spleen",)
    assert grouped.notes == ("map target 'liver' matches no structure on either side",)


def test_values_without_a_name_are_noted_and_a_missing_labels_file_names_by_value(chest, tmp_path) -> None:
    volume, label_map, _ = chest
    nifti, _ = _nifti(label_map, volume.affine, tmp_path / "ref.nii.gz")
    image = read_label_image(nifti)
    assert [s.name for s in image.structures] == ["1", "2", "3"]
    assert any("no labels file" in note for note in image.notes)
    partial = tmp_path / "partial.json"
    partial.write_text('{"1": "body"}')
    evaluation = evaluate(nifti, nifti, pred_labels=partial, ref_labels=partial)
    assert [r["name"] for r in evaluation.structures] == ["body"]
    assert any("values 2, 3 have no name" in note for note in evaluation.notes)


def test_a_results_folder_holds_what_the_reader_expects() -> None:
    assert RESULTS_SEG_FILE == OUTPUT_FILES["seg"] and SUMMARY_FILE == "summary.json"
    assert set(RESULTS_LABEL_MAPS) == {label_map_name("ct.nii.gz"), label_map_name("ct.nrrd")}


def _totalseg_map() -> dict[str, tuple[str, ...]]:
    """tests/realdata.py's REFERENCE_PARTS as a --map: a trailing "_" is a prefix."""
    return {name: tuple(p + "*" if p.endswith("_") else p for p in parts)
            for name, parts in REFERENCE_PARTS.items()}


@pytest.fixture(scope="module")
def real_results(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("real")
    ct = shared_data / "totalseg-examples" / "example_ct_sm.nii.gz"
    paths = write_nifti_as_dicom_series(ct, work / "ct")
    run_pipeline(paths, work / "out", "builtin_ct")
    return work / "out", work


def test_builtin_ct_on_the_totalsegmentator_example_gives_the_dice_realdata_reports(
        shared_data: Path, real_results: tuple[Path, Path]) -> None:
    data = shared_data / "totalseg-examples"
    results, work = real_results
    today = builtin_ct_dice(data, work / "again")
    evaluation = evaluate(results, data / "example_seg.nii.gz", _totalseg_map(),
                          ref_labels=data / "label_map_total_v2.json")
    by_reference = {row["reference_name"]: row for row in evaluation.structures}
    compared = [name for name in REFERENCE_PARTS if name in today]
    assert {"lung_left", "lung_right", "bone"} <= set(compared)
    for name in compared:
        assert by_reference[name]["dice"] == pytest.approx(today[name], abs=1e-9), name
        assert by_reference[name]["matched_by"] == "concept"
    assert by_reference["lung_left"]["hd95_mm"] is not None and evaluation.resampled is False


def test_a_results_folder_of_a_nifti_input_is_read_by_the_labels_of_its_summary(
        shared_data: Path, tmp_path: Path) -> None:
    data = shared_data / "totalseg-examples"
    run_pipeline_on_file(data / "example_ct_sm.nii.gz", tmp_path / "out", "builtin_ct")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {"value": 1, "name": "body", "includes": [2, 3, 4, 5]} in summary["labels"]
    evaluation = evaluate(tmp_path / "out", data / "example_seg.nii.gz", _totalseg_map(),
                          ref_labels=data / "label_map_total_v2.json")
    ours = np.asarray(nib.load(tmp_path / "out" / "labels.nii.gz").dataobj)
    reference = np.asarray(nib.load(data / "example_seg.nii.gz").dataobj)
    left_lobes = [10, 11]  # label_map_total_v2.json: lung_upper_lobe_left, lung_lower_lobe_left
    assert evaluation.structure("lung_left")["dice"] == pytest.approx(
        dice(ours == LUNG_LEFT, np.isin(reference, left_lobes)), abs=1e-9)
    assert "body" in evaluation.unmatched_pred  # TotalSegmentator has no body
    masks = {s.name: s.mask() for s in read_label_image(tmp_path / "out").structures}
    assert masks["lung_left"].any() and not (masks["lung_left"] & ~masks["body"]).any()


def test_a_fractional_seg_counts_the_voxels_at_one_half_or_more(chest, tmp_path: Path) -> None:
    import highdicom as hd
    from pydicom.uid import generate_uid

    from vesalius.dicom_out.seg import segment_description
    from vesalius.dicom_out.sources import source_headers

    volume, label_map, _ = chest
    lung = label_map == 2
    halo = np.roll(lung, 2, axis=2) & ~lung
    fraction = np.where(lung, 0.8, np.where(halo, 0.3, 0.0)).astype(np.float32)
    seg = hd.seg.Segmentation(
        source_images=source_headers(volume), pixel_array=fraction, segmentation_type="FRACTIONAL",
        segment_descriptions=[segment_description(1, Label(2, "lung_left"), volume, ALGORITHM)],
        series_instance_uid=generate_uid(), series_number=1, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer="test", manufacturer_model_name="test", software_versions="1",
        device_serial_number="1")
    seg.save_as(tmp_path / "fractional.dcm", enforce_file_format=True)
    binary = _seg(volume, label_map, tmp_path / "binary.dcm")
    row = evaluate(tmp_path / "fractional.dcm", binary).structure("Left lung")
    assert row["dice"] == 1.0 and row["volume_pred_ml"] == row["volume_ref_ml"]
