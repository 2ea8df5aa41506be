"""load_series: geometry from real and synthetic series, and clear refusals of what it cannot place."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import (
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from tests.phantoms import Cylinder, Sphere, write_phantom_series
from tests.realdata import lps_affine, write_nifti_as_dicom_series
from vesalius.inference.series import frame_number, load_series, multiframe_header, multiframe_source
from vesalius.inference.volume import Volume, VolumeError

SPHERE = Sphere(center=(9.0, -8.0, 4.0), radius=13.0, hu=300.0)
CYLINDER = Cylinder(center=(-12.0, 12.0, -4.0), axis=(0.2, 0.3, 1.0), radius=7.0, length=24.0,
                    hu=-500.0)

GEOMETRIES = [
    pytest.param(dict(orientation="axial"), id="axial"),
    pytest.param(dict(orientation="axial", feet_first=True), id="axial-feet-first"),
    pytest.param(dict(orientation="coronal"), id="coronal"),
    pytest.param(dict(orientation="sagittal"), id="sagittal"),
    pytest.param(dict(orientation="oblique"), id="oblique"),
    pytest.param(dict(orientation="axial", spacing=(3.0, 0.8, 1.2), shape=(20, 64, 48)),
                 id="anisotropic"),
    pytest.param(dict(orientation="oblique", feet_first=True, spacing=(1.25, 1.1, 0.9),
                      shape=(40, 48, 56)), id="oblique-anisotropic"),
]


def _phantom(tmp_path: Path, **overrides):
    options = dict(shape=(32, 48, 48), spacing=(2.0, 1.5, 1.5), objects=[SPHERE, CYLINDER],
                   keep_hu=True)
    options.update(overrides)
    return write_phantom_series(tmp_path / "series", **options)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_affine_and_values_match_the_phantom(tmp_path: Path, geometry: dict) -> None:
    phantom = _phantom(tmp_path, **geometry)
    volume = load_series(phantom.paths)
    assert volume.array.dtype == np.int16  # integer rescale: exact in half the memory of float32
    assert volume.array.shape == phantom.shape
    np.testing.assert_allclose(volume.affine, phantom.affine, atol=1e-4)
    np.testing.assert_array_equal(volume.array, np.round(phantom.hu))
    # slices sorted ascending along the normal, whatever the file order on disk
    normal = volume.affine[:3, 0] / np.linalg.norm(volume.affine[:3, 0])
    along = [np.asarray(ds.ImagePositionPatient, float) @ normal for ds in volume.sources]
    assert np.all(np.diff(along) > 0)
    assert all("PixelData" not in ds for ds in volume.sources)
    assert volume.series_uid == phantom.series_uid
    assert volume.study_uid == phantom.study_uid
    assert volume.modality == "CT"
    assert volume.frame_of_reference_uid == str(volume.sources[0].FrameOfReferenceUID)


@pytest.mark.parametrize("geometry", GEOMETRIES[:5])
def test_label_volumes_match_analytic(tmp_path: Path, geometry: dict) -> None:
    phantom = _phantom(tmp_path, **geometry)
    volume = load_series(phantom.paths)
    voxel = abs(np.linalg.det(volume.affine[:3, :3]))
    sphere = np.count_nonzero(volume.array == SPHERE.hu) * voxel
    cylinder = np.count_nonzero(volume.array == CYLINDER.hu) * voxel
    assert sphere == pytest.approx(SPHERE.volume_mm3, rel=0.02)
    assert cylinder == pytest.approx(CYLINDER.volume_mm3, rel=0.03)
    # and the sphere sits where it should in patient space
    indices = np.argwhere(volume.array == SPHERE.hu)
    centre = volume.affine[:3, :3] @ indices.mean(axis=0) + volume.affine[:3, 3]
    np.testing.assert_allclose(centre, SPHERE.center, atol=0.5)


def test_spacing_property(tmp_path: Path) -> None:
    phantom = _phantom(tmp_path, spacing=(2.5, 0.7, 0.9), orientation="oblique")
    np.testing.assert_allclose(load_series(phantom.paths).spacing, [2.5, 0.7, 0.9], atol=1e-5)


def test_real_ge_series_agrees_with_simpleitk_and_reference_labels(shared_data: Path) -> None:
    folder = shared_data / "ct-3slice-ge"
    volume = load_series(sorted(folder.glob("*.dcm")))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    assert volume.array.shape == sitk.GetArrayFromImage(image).shape
    np.testing.assert_allclose(volume.array, sitk.GetArrayFromImage(image), atol=0.01)
    np.testing.assert_allclose(volume.affine, _sitk_affine(image), atol=1e-3)
    # the NRRD reference labels are on the same LPS grid
    nrrd = sitk.ReadImage(str(folder / "liver_seg.nrrd"))
    np.testing.assert_allclose(volume.affine, _sitk_affine(nrrd), atol=1e-3)
    assert volume.modality == "CT"


def _sitk_affine(image: sitk.Image) -> np.ndarray:
    """SimpleITK (i=col, j=row, k=slice) geometry as our (slice, row, col) -> LPS affine."""
    direction = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    affine = np.eye(4)
    affine[:3, :3] = direction[:, ::-1]
    affine[:3, 3] = image.GetOrigin()
    return affine


@pytest.mark.parametrize("name,modality", [("example_ct_sm", "CT"), ("example_mr_sm", "MR")])
def test_nifti_written_as_dicom_round_trips(
    tmp_path: Path, shared_data: Path, name: str, modality: str
) -> None:
    import nibabel as nib

    source = shared_data / "totalseg-examples" / f"{name}.nii.gz"
    volume = load_series(write_nifti_as_dicom_series(source, tmp_path, modality=modality))
    image = nib.load(source)
    data = np.asarray(image.dataobj)
    assert volume.modality == modality
    assert sorted(volume.array.shape) == sorted(data.shape)
    # every voxel centre maps to the same LPS point as the NIfTI voxel holding the same value
    nifti_to_lps = lps_affine(image)
    for index in [(0, 0, 0), (3, 17, 29), tuple(np.array(volume.array.shape) - 1)]:
        lps = volume.affine @ np.array([*index, 1.0])
        ijk = np.round(np.linalg.solve(nifti_to_lps, lps)[:3]).astype(int)
        assert volume.array[index] == data[tuple(ijk)]


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_series_decode_to_the_same_values(tmp_path: Path, syntax: str) -> None:
    phantom = _phantom(tmp_path, shape=(6, 32, 32))
    for path in phantom.paths:
        ds = pydicom.dcmread(path)
        ds.compress(syntax)
        ds.save_as(path)
    assert pydicom.dcmread(phantom.paths[0]).file_meta.TransferSyntaxUID == syntax
    volume = load_series(phantom.paths)
    np.testing.assert_array_equal(volume.array, np.round(phantom.hu))


def test_non_image_instances_are_ignored(tmp_path: Path) -> None:
    phantom = _phantom(tmp_path, shape=(5, 16, 16))
    report = pydicom.dcmread(phantom.paths[0])
    del report.PixelData
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    report.SOPInstanceUID = generate_uid()
    report.Modality = "SR"
    report.save_as(tmp_path / "sr.dcm")
    volume = load_series([*phantom.paths, tmp_path / "sr.dcm"])
    assert len(volume.sources) == 5


def test_single_slice_uses_slice_thickness(tmp_path: Path) -> None:
    phantom = _phantom(tmp_path, shape=(1, 16, 16), spacing=(2.5, 1.0, 1.0))
    volume = load_series(phantom.paths)
    assert volume.array.shape == (1, 16, 16)
    np.testing.assert_allclose(volume.spacing, [2.5, 1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(volume.affine, phantom.affine, atol=1e-4)


def _edit(path: Path, change) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def _sorted_paths(phantom) -> list[Path]:
    def along(path: Path) -> float:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        iop = np.asarray(ds.ImageOrientationPatient, float)
        return float(np.asarray(ds.ImagePositionPatient, float) @ np.cross(iop[:3], iop[3:]))

    return sorted(phantom.paths, key=along)


def _refusal(paths) -> str:
    with pytest.raises(VolumeError) as info:
        load_series(paths)
    return str(info.value)


def test_refuses_mixed_series(tmp_path: Path) -> None:
    first = write_phantom_series(tmp_path / "a", shape=(4, 16, 16))
    second = write_phantom_series(tmp_path / "b", shape=(4, 16, 16))
    assert "mixed SeriesInstanceUID" in _refusal([*first.paths, *second.paths])


def test_refuses_mixed_orientations(tmp_path: Path) -> None:
    phantom = _phantom(tmp_path, shape=(6, 16, 16))
    _edit(phantom.paths[2], lambda ds: setattr(ds, "ImageOrientationPatient",
                                                [0, 1, 0, 0, 0, -1]))
    assert "mixed orientations" in _refusal(phantom.paths)


def test_refuses_different_sizes(tmp_path: Path) -> None:
    phantom = _phantom(tmp_path, shape=(6, 16, 16))

    def shrink(ds: pydicom.Dataset) -> None:
        pixels = ds.pixel_array
        ds.Rows = 8
        ds.PixelData = pixels[:8].tobytes()

    _edit(phantom.paths[1], shrink)
    assert "different image sizes" in _refusal(phantom.paths)


def test_refuses_different_pixel_spacing(tmp_path: Path) -> None:
    phantom = _phantom(tmp_path, shape=(6, 16, 16))
    _edit(phantom.paths[3], lambda ds: setattr(ds, "PixelSpacing", [1.0, 1.0]))
    assert "PixelSpacing" in _refusal(phantom.paths)


@pytest.mark.parametrize(
    "keyword", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                "FrameOfReferenceUID"])
def test_refuses_missing_geometry(tmp_path: Path, keyword: str) -> None:
    phantom = _phantom(tmp_path, shape=(6, 16, 16))
    _edit(phantom.paths[0], lambda ds: delattr(ds, keyword))
    assert keyword in _refusal(phantom.paths)


def test_refuses_duplicate_positions(tmp_path: Path) -> None:
    phantom = _phantom(tmp_path, shape=(6, 16, 16))
    copy = tmp_path / "copy.dcm"
    shutil.copy(phantom.paths[0], copy)
    _edit(copy, lambda ds: setattr(ds, "SOPInstanceUID", generate_uid()))
    assert "duplicate slice positions" in _refusal([*phantom.paths, copy])


def test_refuses_missing_slice(tmp_path: Path) -> None:
    phantom = _phantom(tmp_path, shape=(10, 16, 16))
    paths = _sorted_paths(phantom)
    assert "missing slice" in _refusal(paths[:4] + paths[5:])


def test_accepts_small_jitter_in_spacing(tmp_path: Path) -> None:
    phantom = _phantom(tmp_path, shape=(10, 16, 16), spacing=(2.0, 1.0, 1.0))
    paths = _sorted_paths(phantom)

    def nudge(ds: pydicom.Dataset) -> None:  # 0.1 mm: rounding in real scanners' positions
        ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.1

    _edit(paths[4], nudge)
    assert load_series(paths).array.shape == (10, 16, 16)


@pytest.mark.parametrize("degrees,slices", [(10.0, 8), (1.0, 40)])
def test_refuses_gantry_tilt(tmp_path: Path, degrees: float, slices: int) -> None:
    """Refused once some slice would sit more than half a pixel off (1 degree: 40 x 2 mm)."""
    phantom = _phantom(tmp_path, shape=(slices, 16, 16), spacing=(2.0, 1.0, 1.0))
    for k, path in enumerate(_sorted_paths(phantom)):  # slices sheared along y
        def shear(ds: pydicom.Dataset, k: int = k) -> None:
            position = [float(v) for v in ds.ImagePositionPatient]
            position[1] += k * 2.0 * np.tan(np.radians(degrees))
            ds.ImagePositionPatient = position

        _edit(path, shear)
    reason = _refusal(phantom.paths)
    assert "gantry tilt" in reason
    assert f"{degrees:.2f} degrees" in reason


def test_accepts_rounded_orientation(tmp_path: Path) -> None:
    """Scanners write direction cosines with a few decimals: a 0.07 degree wobble is fine."""
    phantom = _phantom(tmp_path, shape=(10, 16, 16), spacing=(2.0, 1.0, 1.0))
    for path in phantom.paths:
        _edit(path, lambda ds: setattr(ds, "ImageOrientationPatient",
                                       [1, 0, 0, 0, 0.9999993, -0.0012]))
    volume = load_series(phantom.paths)
    np.testing.assert_allclose(volume.affine, phantom.affine, atol=0.01)


def test_refuses_multiframe(tmp_path: Path) -> None:
    phantom = _phantom(tmp_path, shape=(2, 16, 16))

    def two_frames(ds: pydicom.Dataset) -> None:
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2

    _edit(phantom.paths[0], two_frames)
    assert "multi-frame" in _refusal(phantom.paths)


def test_refuses_no_images(tmp_path: Path) -> None:
    assert "no image instances" in _refusal([])


def test_refuses_unreadable_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    assert "junk.dcm" in _refusal([junk])


def test_the_volume_keeps_headers_not_encoded_pixels(tmp_path: Path) -> None:
    """A 512x512x300 CT would otherwise sit in memory twice: decoded in the array, encoded in the headers."""
    volume = load_series(_phantom(tmp_path, shape=(2, 8, 8)).paths)
    assert isinstance(volume, Volume) and volume.array.shape == (2, 8, 8)
    assert all("PixelData" not in ds for ds in volume.sources)
    assert all("ImagePositionPatient" in ds for ds in volume.sources)


# --- enhanced (multi-frame) input ----------------------------------------------------------------

_PER_SLICE = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
              "SliceLocation", "RescaleIntercept", "RescaleSlope", "RescaleType", "InstanceNumber",
              "SOPInstanceUID", "PixelData", "WindowCenter", "WindowWidth", "EchoTime", "ImageType")


def _item(**attributes) -> pydicom.Dataset:
    item = pydicom.Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def write_enhanced(paths: list[Path], out: Path, *, seed: int = 1, per_frame_rescale: bool = False,
                   frame_type: str = "AXIAL") -> Path:
    """The single-frame slices ``paths`` as one Enhanced CT or MR instance, frames shuffled.

    Shared functional groups: plane orientation, pixel measures, pixel value transformation (CT),
    frame type; per frame: plane position, frame content (and MR echo). Written with pydicom.
    """
    slices = [pydicom.dcmread(p) for p in paths]
    np.random.default_rng(seed).shuffle(slices)
    first = slices[0]
    mr = first.Modality == "MR"
    sop_class = EnhancedMRImageStorage if mr else EnhancedCTImageStorage
    ds = pydicom.Dataset()
    for element in first:
        if element.keyword not in _PER_SLICE:
            ds.add(element)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", frame_type, "NONE"]
    ds.NumberOfFrames = len(slices)
    shared = _item(
        PlaneOrientationSequence=[_item(ImageOrientationPatient=first.ImageOrientationPatient)],
        PixelMeasuresSequence=[_item(PixelSpacing=first.PixelSpacing,
                                     SliceThickness=first.SliceThickness)],
    )
    frame_type_macro = "MRImageFrameTypeSequence" if mr else "CTImageFrameTypeSequence"
    setattr(shared, frame_type_macro, [_item(FrameType=ds.ImageType)])
    rescale = "RescaleIntercept" in first
    if rescale and not per_frame_rescale:
        shared.PixelValueTransformationSequence = [_item(
            RescaleIntercept=first.RescaleIntercept, RescaleSlope=first.RescaleSlope,
            RescaleType=first.get("RescaleType", "US"))]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames, pixels = [], []
    for n, sl in enumerate(slices):
        item = _item(PlanePositionSequence=[_item(ImagePositionPatient=sl.ImagePositionPatient)],
                     FrameContentSequence=[_item(InStackPositionNumber=n + 1)])
        stored = sl.pixel_array
        if rescale and per_frame_rescale:  # a different stored offset per frame, same values
            shift = 10 * n
            stored = (stored.astype(np.int32) - shift).astype(stored.dtype)
            item.PixelValueTransformationSequence = [_item(
                RescaleIntercept=str(float(sl.RescaleIntercept) + shift),
                RescaleSlope=sl.RescaleSlope, RescaleType="HU")]
        if mr:
            item.MREchoSequence = [_item(EffectiveEchoTime=float(sl.get("EchoTime", 10)))]
        frames.append(item)
        pixels.append(stored)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = np.stack(pixels).tobytes()
    path = out / "enhanced.dcm"
    out.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _assert_same_volume(multi: Volume, single: Volume) -> None:
    np.testing.assert_array_equal(multi.array, single.array)
    np.testing.assert_allclose(multi.affine, single.affine, atol=1e-6)
    positions = [[float(v) for v in ds.ImagePositionPatient] for ds in multi.sources]
    expected = [[float(v) for v in ds.ImagePositionPatient] for ds in single.sources]
    np.testing.assert_allclose(positions, expected, atol=1e-6)


@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[1], GEOMETRIES[4]])
def test_enhanced_ct_is_the_same_volume_as_the_single_frame_series(
        tmp_path: Path, geometry: pytest.param) -> None:
    phantom = _phantom(tmp_path, shape=(12, 24, 20), **geometry)
    single = load_series(phantom.paths)
    path = write_enhanced(phantom.paths, tmp_path / "enhanced")
    multi = load_series([path])
    _assert_same_volume(multi, single)
    # one header per slice: the instance's, with this frame's geometry and its frame number
    assert {str(ds.SOPInstanceUID) for ds in multi.sources} == {str(pydicom.dcmread(path).SOPInstanceUID)}
    numbers = [frame_number(ds) for ds in multi.sources]
    assert sorted(numbers) == list(range(1, 13)) and numbers != sorted(numbers)  # frames shuffled
    assert all("PixelData" not in ds for ds in multi.sources)
    assert multi.sources[0].SOPClassUID == EnhancedCTImageStorage
    header = multiframe_header(multi.sources[0])
    assert "ImagePositionPatient" not in header and int(header.NumberOfFrames) == 12
    assert all(frame_number(ds) is None for ds in single.sources)
    source, order = multiframe_source(multi)
    assert source.SOPInstanceUID == header.SOPInstanceUID and "ReferencedFrameNumber" not in source
    assert [frame_number(multi.sources[i]) for i in order] == list(range(1, 13))
    assert multiframe_source(single) is None


def test_enhanced_ct_with_per_frame_rescale(tmp_path: Path) -> None:
    phantom = _phantom(tmp_path, shape=(8, 16, 16))
    path = write_enhanced(phantom.paths, tmp_path / "enhanced", per_frame_rescale=True)
    _assert_same_volume(load_series([path]), load_series(phantom.paths))


def test_enhanced_mr_from_real_mr_is_the_same_volume(tmp_path: Path, shared_data: Path) -> None:
    paths = write_nifti_as_dicom_series(shared_data / "totalseg-examples" / "example_mr_sm.nii.gz",
                                        tmp_path / "mr", modality="MR")
    single = load_series(paths)
    multi = load_series([write_enhanced(paths, tmp_path / "enhanced", seed=3)])
    _assert_same_volume(multi, single)
    assert multi.modality == "MR" and multi.sources[0].SOPClassUID == EnhancedMRImageStorage


def test_legacy_converted_enhanced_ct_written_by_highdicom(tmp_path: Path,
                                                          shared_data: Path) -> None:
    import highdicom as hd

    paths = sorted((shared_data / "ct-3slice-ge").glob("*.dcm"))
    legacy = [pydicom.dcmread(p) for p in paths]
    for ds in legacy:  # GE writes an empty Specific Character Set, which highdicom refuses
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            del ds.SpecificCharacterSet
    converted = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy[::-1], series_instance_uid=legacy[0].SeriesInstanceUID, series_number=1,
        sop_instance_uid=generate_uid(), instance_number=1)
    converted.save_as(tmp_path / "legacy.dcm")
    _assert_same_volume(load_series([tmp_path / "legacy.dcm"]), load_series(paths))


def test_refuses_multiframe_without_functional_groups(tmp_path: Path) -> None:
    phantom = _phantom(tmp_path, shape=(2, 16, 16))

    def two_frames(ds: pydicom.Dataset) -> None:
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2

    _edit(phantom.paths[0], two_frames)
    assert "no per-frame geometry" in _refusal(phantom.paths)


# --- what real series carry besides one clean stack ----------------------------------------------

def _localizer(phantom, folder: Path) -> Path:
    """A coronal scout in the phantom's series, as scanners put it first in the series."""
    ds = pydicom.dcmread(phantom.paths[0])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = 0
    path = folder / "scout.dcm"
    ds.save_as(path)
    return path


def test_localizer_in_the_series_is_left_out(tmp_path: Path) -> None:
    phantom = _phantom(tmp_path, shape=(6, 16, 16))
    scout = _localizer(phantom, tmp_path)
    volume = load_series([scout, *phantom.paths])
    np.testing.assert_array_equal(volume.array, np.round(phantom.hu))
    assert pydicom.dcmread(scout).SOPInstanceUID not in {ds.SOPInstanceUID for ds in volume.sources}
    assert "only localizer" in _refusal([scout])


def test_without_localizer_type_another_plane_is_refused(tmp_path: Path) -> None:
    phantom = _phantom(tmp_path, shape=(6, 16, 16))
    other = _localizer(phantom, tmp_path)
    _edit(other, lambda ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "OTHER"]))
    reason = _refusal([other, *phantom.paths])
    assert "mixed orientations" in reason and "2 image planes with 1, 6 slices" in reason


def test_same_instance_twice_is_read_once(tmp_path: Path) -> None:
    phantom = _phantom(tmp_path, shape=(6, 16, 16))
    copy = tmp_path / "copy.dcm"
    shutil.copy(phantom.paths[2], copy)
    volume = load_series([*phantom.paths, copy])
    assert volume.array.shape == (6, 16, 16)


def _echoes(phantom, folder: Path, echoes: int = 2) -> list[Path]:
    """The phantom as a multi-echo MR series: each slice once per echo, in one series."""
    paths = []
    for path in phantom.paths:
        for echo in range(1, echoes + 1):
            ds = pydicom.dcmread(path)
            ds.Modality = "MR"
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.EchoNumbers = echo
            ds.EchoTime = 5.0 * echo
            paths.append(folder / f"{path.stem}-e{echo}.dcm")
            ds.save_as(paths[-1])
    return paths


def test_multi_echo_mr_is_refused_naming_the_echoes(tmp_path: Path) -> None:
    phantom = _phantom(tmp_path, shape=(6, 16, 16))
    reason = _refusal(_echoes(phantom, tmp_path))
    assert "several echoes" in reason and "EchoNumbers 1, 2" in reason


def test_enhanced_mr_with_two_echoes_is_refused(tmp_path: Path) -> None:
    phantom = _phantom(tmp_path, shape=(4, 16, 16))
    paths = _echoes(phantom, tmp_path)
    for path in paths:
        _edit(path, lambda ds: delattr(ds, "RescaleIntercept") or delattr(ds, "RescaleSlope"))
    reason = _refusal([write_enhanced(paths, tmp_path / "enhanced")])
    assert "several echoes" in reason and "EchoTime 10.0, 5.0" in reason


def test_localizer_frames_of_an_enhanced_instance_are_left_out(tmp_path: Path) -> None:
    phantom = _phantom(tmp_path, shape=(4, 16, 16))
    scout = write_enhanced([phantom.paths[0]], tmp_path / "scout", frame_type="LOCALIZER")
    volume = load_series([*phantom.paths, scout])
    assert volume.array.shape == (4, 16, 16)


def test_irregular_spacing_beyond_tolerance_is_refused(tmp_path: Path) -> None:
    """A gap 15 % off the median is not a missing slice, and not a regular grid either."""
    phantom = _phantom(tmp_path, shape=(10, 16, 16), spacing=(2.0, 1.0, 1.0))
    paths = _sorted_paths(phantom)
    for path in paths[5:]:
        _edit(path, lambda ds: ds.ImagePositionPatient.__setitem__(
            2, float(ds.ImagePositionPatient[2]) + 0.3))
    reason = _refusal(paths)
    assert "irregular slice spacing" in reason and "tolerance 10%" in reason


def test_missing_slices_are_counted(tmp_path: Path) -> None:
    phantom = _phantom(tmp_path, shape=(10, 16, 16))
    paths = _sorted_paths(phantom)
    assert "missing slice: 2 slice(s) missing" in _refusal(paths[:4] + paths[6:])
