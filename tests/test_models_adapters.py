"""TotalSegmentator and nnU-Net adapters: what goes in (arrays, images, weights layout) and what
comes back (their label values -> our labels and codes), checked on generated and real data without
installing either package."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from tests.phantoms import Box, Sphere, write_phantom_series
from tests.realdata import nifti_labels_in_volume_space, write_nifti_as_dicom_series
from vesalius.inference.models.nnunet import (
    dataset_classes,
    folder_problems,
    load_nnunet,
    nnunet_input,
    nnunet_labels,
)
from vesalius.inference.models.output import to_label_map
from vesalius.inference.models.registry import ModelSpecError, check, spec_from_path_form
from vesalius.inference.models.totalsegmentator import (
    class_map,
    offline_config,
    totalseg_input,
    totalseg_labels,
    weights_problems,
)
from vesalius.inference.series import load_series
from vesalius.inference.terminology import term_for

OBJECTS = [Sphere((10.0, -5.0, 4.0), 14.0, 60.0), Box((-15.0, 8.0, -4.0), (16.0, 12.0, 14.0), 500.0)]


@pytest.mark.parametrize("orientation", ["axial", "coronal", "oblique"])
def test_nnunet_gets_the_array_simpleitk_would_give_it(tmp_path: Path, orientation: str) -> None:
    """nnU-Net reads images with SimpleITK; our volume must be exactly that array and spacing."""
    series = write_phantom_series(tmp_path, shape=(12, 40, 36), spacing=(2.5, 1.1, 0.9),
                                  orientation=orientation, feet_first=orientation == "axial",
                                  objects=OBJECTS)
    volume = load_series(series.paths)
    image, properties = nnunet_input(volume)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    itk = reader.Execute()
    assert image.shape == (1, *sitk.GetArrayFromImage(itk).shape) and image.dtype == np.float32
    np.testing.assert_array_equal(image[0], sitk.GetArrayFromImage(itk).astype(np.float32))
    np.testing.assert_allclose(properties["spacing"], itk.GetSpacing()[::-1], rtol=1e-5)


def write_nnunet_folder(folder: Path, labels: dict, folds: tuple[int, ...] = (0, 1)) -> Path:
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels,
                                                     "numTraining": 10, "file_ending": ".nii.gz"}))
    (folder / "plans.json").write_text(json.dumps({"dataset_name": "Dataset101_Test"}))
    for fold in folds:
        (folder / f"fold_{fold}").mkdir()
        (folder / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(b"weights")
    return folder


def test_nnunet_folder_layout_labels_and_output(tmp_path: Path) -> None:
    folder = write_nnunet_folder(tmp_path / "Dataset101", {"background": 0, "Liver": 1, "heart": 2})
    assert folder_problems(folder) == []
    assert folder_problems(folder, folds=(3,)) == [f"{folder}/fold_3/checkpoint_final.pth is missing"]
    spec = spec_from_path_form(f"nnunet:{folder}")
    labels, channels = nnunet_labels(spec)
    assert [(label.value, label.name) for label in labels] == [(1, "liver"), (2, "heart")]
    segmentation = np.array([[[0, 1, 2, 2]]], np.int16)  # what predict_single_npy_array returns
    assert to_label_map("nnU-Net", segmentation, channels, (1, 1, 4)).tolist() == [[[0, 1, 2, 2]]]
    with pytest.raises(RuntimeError, match="returned shape"):
        to_label_map("nnU-Net", segmentation, channels, (1, 2, 4))
    with pytest.raises(ModelSpecError, match="nnU-Net is not installed"):
        load_nnunet(spec)  # the extra is not part of the test install


def test_nnunet_refusals(tmp_path: Path) -> None:
    regions = write_nnunet_folder(tmp_path / "regions", {"background": 0, "whole": [1, 2]})
    with pytest.raises(ModelSpecError, match="region-based"):
        dataset_classes(regions)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelSpecError, match=r"dataset.json is missing.*no fold_N folders"):
        check(f"nnunet:{empty}")


def test_totalsegmentator_weights_layout(tmp_path: Path) -> None:
    home = tmp_path / "totalseg"
    results = home / "nnunet" / "results"
    assert "does not exist" in weights_problems(home)[0]
    for n in (291, 292, 293, 294):
        (results / f"Dataset{n}_TotalSegmentator_part{n - 290}_1559subj").mkdir(parents=True)
    assert "Dataset295" in weights_problems(home)[0]
    (results / "Dataset295_TotalSegmentator_part5_ribs_1559subj").mkdir()
    assert weights_problems(home) == [] and weights_problems(results) == []
    assert "Dataset297" in weights_problems(home, fast=True)[0]
    config = offline_config(home)
    assert json.loads(config.read_text())["send_usage_stats"] is False
    # the weights are right; TotalSegmentator itself is not installed here: only that is named
    with pytest.raises(ModelSpecError) as refused:
        check(f"totalsegmentator:{home}")
    assert "pip install 'vesalius[totalsegmentator]'" in str(refused.value)
    assert "Dataset" not in str(refused.value)


def test_totalsegmentator_classes_are_its_own_and_all_coded(shared_data: Path) -> None:
    reference = json.loads((shared_data / "totalseg-examples" / "label_map_total_v2.json").read_text())
    classes = class_map("total")
    assert classes == {int(k): v for k, v in reference.items()}
    labels, _ = totalseg_labels(spec_from_path_form("totalsegmentator:/weights"))
    assert len(labels) == 117
    for label in labels:
        term = term_for(label.name)
        assert term.type.scheme_designator == "SCT" and term.type.value.isdigit()
    assert term_for("kidney_left").modifier.value == "7771000"
    assert term_for("rib_right_12").type.value == "43993008"
    assert term_for("kidney_cyst_right").region.value == "64033007"


def test_totalsegmentator_input_and_output_on_a_real_ct(tmp_path: Path, shared_data: Path) -> None:
    """The example CT as a DICOM series -> the NIfTI TotalSegmentator takes; its published labels
    for that CT, as TotalSegmentator returns them on its input grid -> our label map and codes."""
    examples = shared_data / "totalseg-examples"
    volume = load_series(write_nifti_as_dicom_series(examples / "example_ct_sm.nii.gz", tmp_path))
    image = totalseg_input(volume)
    assert image.shape == volume.array.shape
    # TotalSegmentator returns labels on its input's grid: the reference reoriented onto it
    reference = nib.load(examples / "example_seg.nii.gz")
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(reference.affine),
                                                nib.orientations.io_orientation(image.affine))
    returned = reference.as_reoriented(transform)
    np.testing.assert_allclose(returned.affine, image.affine, atol=1e-3)  # same voxels, same place
    spec = spec_from_path_form("totalsegmentator:/weights")
    labels, channels = totalseg_labels(spec)
    ours = to_label_map("TotalSegmentator", np.asanyarray(returned.dataobj), channels, volume.array.shape)
    expected = nifti_labels_in_volume_space(examples / "example_seg.nii.gz", volume)
    np.testing.assert_array_equal(ours, expected)
    present = {label.name for label in labels if label.mask(ours).any()}
    assert {"liver", "spleen", "aorta"} <= present and len(present) < len(labels)  # empty ones omitted
    subset = spec_from_path_form("totalsegmentator:/weights").__class__(
        name="liver_only", kind="totalsegmentator", path=Path("/weights"), roi_subset=("liver",))
    sub_labels, sub_channels = totalseg_labels(subset)
    assert [label.name for label in sub_labels] == ["liver"]
    only = to_label_map("TotalSegmentator", np.asanyarray(returned.dataobj), sub_channels, volume.array.shape)
    assert set(np.unique(only)) == {0, 5}
