"""Real NIfTI volumes (RAS+) as DICOM series (LPS), and their label maps on our Volume grid.

TotalSegmentator's examples come as NIfTI; the node only reads DICOM. These helpers write a
standard-looking single-frame series (reoriented to the usual axial L/P/S layout) with exact
geometry, so a Volume read back from it lines up voxel for voxel with the NIfTI label map.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from scipy import ndimage

from vesalius.inference.volume import Volume

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_CT_INTERCEPT = -1024.0


def lps_affine(image: nib.Nifti1Image) -> np.ndarray:
    """The NIfTI (i, j, k) -> patient LPS millimetres affine."""
    return RAS_TO_LPS @ image.affine


def _as_lps_axes(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """Reorient so that i runs to patient Left, j to Posterior, k to Superior (axial DICOM)."""
    current = nib.orientations.io_orientation(image.affine)
    target = nib.orientations.axcodes2ornt(("L", "P", "S"))
    return image.as_reoriented(nib.orientations.ornt_transform(current, target))


def _uid(name: str, role: str) -> str:
    return generate_uid(entropy_srcs=["vesalius-test-realdata", name, role])


def write_nifti_as_dicom_series(
    nifti_path: str | Path, out_dir: str | Path, *, modality: str = "CT"
) -> list[Path]:
    """Write a NIfTI volume as a single-frame CT or MR series; returns the file paths.

    UIDs derive from the file name, so writing the same file twice gives the same series.
    """
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be CT or MR, not {modality!r}")
    nifti_path = Path(nifti_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image = _as_lps_axes(nib.load(nifti_path))
    data = np.asarray(image.dataobj, dtype=np.float64)
    affine = lps_affine(image)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    row_dir = affine[:3, 0] / spacing[0]  # along a DICOM row = NIfTI i
    col_dir = affine[:3, 1] / spacing[1]  # down a DICOM column = NIfTI j
    normal = np.cross(row_dir, col_dir)
    name = nifti_path.name
    study_uid, series_uid = _uid(name, "study"), _uid(name, "series")
    frame_uid = _uid(name, "frame")
    intercept = _CT_INTERCEPT if modality == "CT" else 0.0
    paths = []
    for k in range(data.shape[2]):
        stored = np.clip(np.round(data[:, :, k].T - intercept), -32768, 32767).astype("<i2")
        position = affine[:3, :3] @ np.array([0.0, 0.0, k]) + affine[:3, 3]
        ds = _base_dataset(modality, name, study_uid, series_uid, frame_uid, k)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_dir, *col_dir)]
        ds.SliceLocation = f"{float(position @ normal):.6f}"
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        if modality == "CT":  # the MR Image IOD has no rescale; stored values are the values
            ds.RescaleIntercept = f"{intercept:g}"
            ds.RescaleSlope = "1"
            ds.RescaleType = "HU"
        ds.PixelData = stored.tobytes()
        path = out / f"{nifti_path.name.split('.')[0]}_{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _base_dataset(
    modality: str, name: str, study_uid: str, series_uid: str, frame_uid: str, k: int
) -> pydicom.Dataset:
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    sop_uid = _uid(name, f"instance/{k}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "Vesalius test data"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"Test study from {name}"
    ds.SeriesDescription = name.split(".")[0]
    ds.PatientName = f"Test^{name.split('.')[0]}"
    ds.PatientID = name.split(".")[0].upper()
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.Laterality = ""  # Type 2C: the trunk is not a paired structure
    ds.InstanceNumber = k + 1
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    if modality == "CT":
        ds.KVP = "120"
    else:
        ds.ScanningSequence = ["SE"]
        ds.SequenceVariant = ["NONE"]
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "10"
        ds.EchoTrainLength = "1"
        ds.MagneticFieldStrength = "1.5"
    return ds


def nifti_labels_in_volume_space(nifti_path: str | Path, volume: Volume) -> np.ndarray:
    """A NIfTI label map sampled (nearest neighbour) on the Volume's (slice, row, col) grid."""
    image = nib.load(nifti_path)
    label_map = np.asarray(image.dataobj)
    # volume index -> LPS -> NIfTI index
    matrix = np.linalg.inv(lps_affine(image)) @ volume.affine
    snapped = np.round(matrix)  # same grid: exact integers, so edge voxels are not lost
    matrix = np.where(np.abs(matrix - snapped) < 1e-4, snapped, matrix)
    return ndimage.affine_transform(
        label_map, matrix, output_shape=volume.array.shape, order=0, mode="constant", cval=0
    )


def totalseg_label_values(label_map_path: str | Path, *names_or_prefixes: str) -> list[int]:
    """TotalSegmentator label values whose name equals or starts with any of the given strings."""
    mapping = json.loads(Path(label_map_path).read_text())
    return sorted(
        int(value)
        for value, name in mapping.items()
        if any(name == p or name.startswith(p) for p in names_or_prefixes)
    )


# Reference structures of TotalSegmentator's "total" task that make up each builtin_ct label.
BONE_CLASSES = (
    "vertebrae_", "rib_", "sternum", "sacrum", "hip_", "femur_", "humerus_", "scapula_",
    "clavicula_", "skull",
)
REFERENCE_PARTS = {
    "lung_left": ("lung_upper_lobe_left", "lung_lower_lobe_left"),
    "lung_right": ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"),
    "airways": ("trachea",),
    "bone": BONE_CLASSES,
}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Sørensen-Dice overlap of two boolean masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


BONE_GROUPS = {"vertebrae": ("vertebrae_",), "ribs": ("rib_",)}


def bone_group_scores(
    bone: np.ndarray, reference: np.ndarray, label_map_path: str | Path
) -> dict[str, float]:
    """Precision and recall of a bone mask per bone group (vertebrae, ribs).

    Recall: the share of the group's reference voxels in ``bone``. Precision: the share of
    ``bone`` voxels whose nearest reference bone voxel is in the group that are reference bone.
    """
    truth = np.isin(reference, totalseg_label_values(label_map_path, *BONE_CLASSES))
    if not truth.any():
        return {}
    nearest = ndimage.distance_transform_edt(~truth, return_distances=False, return_indices=True)
    nearest_label = reference[tuple(nearest)]
    scores = {}
    for group, parts in BONE_GROUPS.items():
        values = totalseg_label_values(label_map_path, *parts)
        member = np.isin(reference, values)
        claimed = bone & np.isin(nearest_label, values)
        scores[f"bone_{group}_recall"] = float(bone[member].mean()) if member.any() else 1.0
        scores[f"bone_{group}_precision"] = float(truth[claimed].mean()) if claimed.any() else 1.0
    return scores


def builtin_ct_dice(data_dir: str | Path, work_dir: str | Path) -> dict[str, float]:
    """Dice of builtin_ct against TotalSegmentator on the example CT, per comparable structure.

    Also the bone groups' precision and recall (``bone_group_scores``), for the report only.
    """
    from vesalius.inference.models.registry import resolve
    from vesalius.inference.series import load_series

    data_dir = Path(data_dir)
    volume = load_series(write_nifti_as_dicom_series(data_dir / "example_ct_sm.nii.gz", work_dir))
    model = resolve("builtin_ct")
    label_map = model.predict(volume)
    reference = nifti_labels_in_volume_space(data_dir / "example_seg.nii.gz", volume)
    class_names = data_dir / "label_map_total_v2.json"
    scores = {}
    for label in model.structures:
        parts = REFERENCE_PARTS.get(label.name)
        if parts is None:
            continue
        truth = np.isin(reference, totalseg_label_values(class_names, *parts))
        if truth.any():
            scores[label.name] = dice(label.mask(label_map), truth)
    bone = next(label for label in model.structures if label.name == "bone").mask(label_map)
    scores.update(bone_group_scores(bone, reference, class_names))
    body = model.structures[0].mask(label_map)
    scores["body_recall_of_reference_organs"] = float(body[reference > 0].mean())
    return scores


if __name__ == "__main__":  # python -m tests.realdata: print builtin_ct's Dice per structure
    import tempfile

    from tests.conftest import shared_data_dir

    with tempfile.TemporaryDirectory() as tmp:
        for name, score in builtin_ct_dice(shared_data_dir() / "totalseg-examples", tmp).items():
            print(f"{name:34s} {score:.3f}")
