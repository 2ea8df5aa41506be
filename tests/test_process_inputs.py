"""`vesalius process` on what users hand it: a DICOM folder with other files in it, an MR series
the model refuses, and research volumes (NIfTI, NRRD) that give the same labels as the DICOM path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk

from tests.realdata import nifti_labels_in_volume_space, write_nifti_as_dicom_series
from vesalius.inference.models.registry import resolve
from vesalius.inference.series import load_series
from vesalius.inference.volume_files import read_volume_file
from vesalius.node.pipeline import run_pipeline, run_pipeline_on_file


def vesalius_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vesalius.node.cli", "process", "--json", *args],
                          capture_output=True, text=True, timeout=300)


def test_folder_with_nrrd_files_skips_them_with_a_log_line(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "ct-3slice-ge"  # 3 DICOM slices beside 3 NRRD label maps
    result = vesalius_process(str(folder), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    for name in ("heart_seg.nrrd", "liver_seg.nrrd", "spine_seg.nrrd"):
        assert f"skipping {name}: not a DICOM file" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["shape"][0] == 3 and (tmp_path / "out" / "seg.dcm").is_file()


def test_geometry_refusal_still_says_cannot_place_in_space(shared_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "gap"
    paths = write_nifti_as_dicom_series(shared_data / "totalseg-examples" / "example_ct_sm.nii.gz", folder)
    paths[len(paths) // 2].unlink()  # a missing slice
    (folder / "notes.txt").write_text("not DICOM")
    result = vesalius_process(str(folder), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "skipping notes.txt: not a DICOM file" in result.stderr
    assert "cannot place the series in space: missing slice" in result.stderr


def test_mr_with_builtin_ct_is_one_line_not_a_traceback(shared_data: Path, tmp_path: Path) -> None:
    mr = shared_data / "totalseg-examples" / "example_mr_sm.nii.gz"
    write_nifti_as_dicom_series(mr, tmp_path / "mr", modality="MR")
    for args in ([str(tmp_path / "mr")], [str(mr), "--modality", "MR"]):
        result = vesalius_process(*args, "--out", str(tmp_path / "out"), "--model", "builtin_ct")
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        [line] = [x for x in result.stderr.splitlines() if x.startswith("vesalius process:")]
        assert line == ("vesalius process: model builtin_ct failed: builtin_ct segments CT only, "
                        "this series is MR")
        assert not (tmp_path / "out").exists()


def test_nifti_gives_the_dicom_path_labels_on_the_same_voxels(shared_data: Path, tmp_path: Path) -> None:
    nifti = shared_data / "totalseg-examples" / "example_ct_sm.nii.gz"  # RAS, i to the right
    dicom_volume = load_series(write_nifti_as_dicom_series(nifti, tmp_path / "dicom"))  # LPS axial
    dicom_labels = resolve("builtin_ct").predict(dicom_volume)
    assert len(np.unique(dicom_labels)) > 3  # body, lungs, bone: a comparison worth making
    volume = read_volume_file(nifti).volume
    np.testing.assert_allclose(volume.affine, dicom_volume.affine, atol=1e-4)  # RAS -> LPS, reordered
    np.testing.assert_array_equal(volume.array, dicom_volume.array)

    dicom_files = sorted((tmp_path / "dicom").iterdir())
    dicom_summary = run_pipeline(dicom_files, tmp_path / "from-dicom", "builtin_ct")
    summary = run_pipeline_on_file(nifti, tmp_path / "out", "builtin_ct")
    written = tmp_path / "out" / "labels.nii.gz"
    assert summary["input"] == {"file": nifti.name, "modality": "CT", "label_map": "labels.nii.gz"}
    image = nib.load(written)
    np.testing.assert_allclose(image.affine, nib.load(nifti).affine, atol=1e-4)  # the input's own grid
    assert image.shape == nib.load(nifti).shape
    # read back with nibabel (not our reader) and placed on the DICOM volume's voxels
    np.testing.assert_array_equal(nifti_labels_in_volume_space(written, dicom_volume), dicom_labels)
    assert summary["structures"] == dicom_summary["structures"]
    assert not list((tmp_path / "out").rglob("*.dcm")) and summary["objects"] == {}
    assert summary["series_instance_uid"] is None and summary["encapsulated_stl"] == []
    assert {Path(m).suffix for m in summary["meshes"]} == {".stl", ".glb"}


def test_nrrd_of_the_ge_slices_gives_the_dicom_labels(shared_data: Path, tmp_path: Path) -> None:
    slices = sorted((shared_data / "ct-3slice-ge").glob("*.dcm"))
    reader = sitk.ImageSeriesReader()  # ITK/GDCM's DICOM reader, independent of load_series
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(shared_data / "ct-3slice-ge")))  # sorted
    ct = reader.Execute()
    # stored flipped and with x and y swapped: our reader must undo it from the header alone
    stored = sitk.PermuteAxes(sitk.Flip(ct, [False, True, True]), [1, 0, 2])
    nrrd = tmp_path / "ct.nrrd"
    sitk.WriteImage(stored, str(nrrd))
    dicom_volume = load_series(slices)
    dicom_labels = resolve("builtin_ct").predict(dicom_volume)
    assert len(np.unique(dicom_labels)) > 1

    summary = run_pipeline_on_file(nrrd, tmp_path / "out", "builtin_ct")
    written = sitk.ReadImage(str(tmp_path / "out" / "labels.nrrd"))
    assert written.GetSize() == stored.GetSize() and written.GetDirection() == stored.GetDirection()
    # resampled by ITK (nearest) onto the DICOM grid as ITK reads it: the layout load_series uses
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ct).astype(np.float32), dicom_volume.array)
    on_dicom_grid = sitk.Resample(written, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(on_dicom_grid), dicom_labels)
    assert summary["input"]["label_map"] == "labels.nrrd"
    assert not list((tmp_path / "out").rglob("*.dcm"))
    assert pydicom.misc.is_dicom(slices[0])  # the slices were the DICOM input


def test_one_file_inputs_and_unreadable_volumes(shared_data: Path, tmp_path: Path) -> None:
    one = vesalius_process(str(shared_data / "ct-3slice-ge" / "02.dcm"), "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["shape"][0] == 1 and (tmp_path / "one" / "seg.dcm").is_file()
    label_map = vesalius_process(str(shared_data / "ct-3slice-ge" / "heart_seg.nrrd"), "--out",
                                 str(tmp_path / "nrrd"))
    assert label_map.returncode == 0, label_map.stderr  # any NRRD volume reads (a label map is no CT)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not gzip at all")
    result = vesalius_process(str(broken), "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "vesalius process: cannot read broken.nii.gz as NIfTI" in result.stderr
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    result = vesalius_process(str(notes), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "notes.txt is neither DICOM nor NIfTI/NRRD" in result.stderr
