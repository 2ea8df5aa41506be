"""Synthetic CT series with known geometry: objects of set HU at known places in patient space.

Every series is written as real single-frame CT DICOM files (shuffled on disk, so readers must sort
by geometry), and carries its true affine and the analytic volume of each object for exact checks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy.special import ellipeinc, ellipkinc

ORIENTATIONS = ("axial", "coronal", "sagittal", "oblique")


@dataclass(frozen=True)
class Sphere:
    center: tuple[float, float, float]
    radius: float
    hu: float

    def inside(self, p: np.ndarray) -> np.ndarray:
        return np.sum((p - np.asarray(self.center)) ** 2, axis=-1) <= self.radius**2

    @property
    def volume_mm3(self) -> float:
        return 4.0 / 3.0 * math.pi * self.radius**3

    @property
    def area_mm2(self) -> float:
        return 4.0 * math.pi * self.radius**2

    def distance_to_surface(self, p: np.ndarray) -> np.ndarray:
        return np.abs(np.linalg.norm(p - np.asarray(self.center), axis=-1) - self.radius)


@dataclass(frozen=True)
class Cylinder:
    """A right circular cylinder: centre, unit axis (LPS), radius and length in mm."""

    center: tuple[float, float, float]
    axis: tuple[float, float, float]
    radius: float
    length: float
    hu: float

    def _parts(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a = np.asarray(self.axis, float) / np.linalg.norm(self.axis)
        d = p - np.asarray(self.center)
        along = d @ a
        radial = np.linalg.norm(d - along[..., None] * a, axis=-1)
        return along, radial

    def inside(self, p: np.ndarray) -> np.ndarray:
        along, radial = self._parts(p)
        return (np.abs(along) <= self.length / 2) & (radial <= self.radius)

    @property
    def volume_mm3(self) -> float:
        return math.pi * self.radius**2 * self.length

    def distance_to_surface(self, p: np.ndarray) -> np.ndarray:
        along, radial = self._parts(p)
        half = self.length / 2
        inside = (np.abs(along) <= half) & (radial <= self.radius)
        inner = np.minimum(self.radius - radial, half - np.abs(along))
        outer = np.hypot(np.maximum(radial - self.radius, 0), np.maximum(np.abs(along) - half, 0))
        return np.where(inside, inner, outer)

    @property
    def area_mm2(self) -> float:
        return 2 * math.pi * self.radius * self.length + 2 * math.pi * self.radius**2


@dataclass(frozen=True)
class Box:
    """An axis-aligned (LPS) box: centre and full sizes in mm."""

    center: tuple[float, float, float]
    size: tuple[float, float, float]
    hu: float

    def inside(self, p: np.ndarray) -> np.ndarray:
        d = np.abs(p - np.asarray(self.center))
        return np.all(d <= np.asarray(self.size) / 2, axis=-1)

    @property
    def volume_mm3(self) -> float:
        return float(np.prod(self.size))

    @property
    def area_mm2(self) -> float:
        x, y, z = self.size
        return 2 * (x * y + y * z + x * z)


@dataclass(frozen=True)
class Ellipsoid:
    """An axis-aligned (LPS) ellipsoid with semi-axes ``radii`` (mm)."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    hu: float

    def inside(self, p: np.ndarray) -> np.ndarray:
        q = (p - np.asarray(self.center)) / np.asarray(self.radii)
        return np.sum(q**2, axis=-1) <= 1.0

    @property
    def volume_mm3(self) -> float:
        a, b, c = self.radii
        return 4.0 / 3.0 * math.pi * a * b * c

    @property
    def area_mm2(self) -> float:
        """Exact area (Legendre's form with incomplete elliptic integrals), a > b > c."""
        a, b, c = sorted(self.radii, reverse=True)
        phi = math.acos(c / a)
        m = (a**2 * (b**2 - c**2)) / (b**2 * (a**2 - c**2))
        e, f = ellipeinc(phi, m), ellipkinc(phi, m)
        return 2 * math.pi * c**2 + 2 * math.pi * a * b / math.sin(phi) * (
            e * math.sin(phi) ** 2 + f * math.cos(phi) ** 2)

    def distance_to_surface(self, p: np.ndarray) -> np.ndarray:
        """Euclidean distance to the surface: bisection on the nearest-point Lagrange parameter."""
        r = np.asarray(self.radii, float)
        y = np.abs(p - np.asarray(self.center)) + 1e-12
        lo = np.full(len(y), -r.min() ** 2 + 1e-12)
        hi = np.full(len(y), np.linalg.norm(y * r, axis=1) + 1.0)
        for _ in range(200):
            t = (lo + hi) / 2
            g = np.sum((r * y / (r**2 + t[:, None])) ** 2, axis=1) - 1.0
            lo, hi = np.where(g > 0, t, lo), np.where(g > 0, hi, t)
        x = r**2 * y / (r**2 + ((lo + hi) / 2)[:, None])
        return np.linalg.norm(x - y, axis=1)

    def outward(self, p: np.ndarray) -> np.ndarray:
        return (p - np.asarray(self.center)) / np.asarray(self.radii) ** 2


Shape = Sphere | Cylinder | Box | Ellipsoid


def orientation_axes(orientation: str, feet_first: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Row and column direction cosines (DICOM ImageOrientationPatient) for a named orientation."""
    if orientation == "axial":
        row, col = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
        if feet_first:  # what scanners write for feet-first supine: image x runs to patient right
            row = np.array([-1.0, 0, 0])
    elif orientation == "coronal":
        row, col = np.array([1.0, 0, 0]), np.array([0, 0, -1.0])
    elif orientation == "sagittal":
        row, col = np.array([0, 1.0, 0]), np.array([0, 0, -1.0])
    elif orientation == "oblique":
        a, b = math.radians(25), math.radians(35)
        rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
        rz = np.array([[math.cos(b), -math.sin(b), 0], [math.sin(b), math.cos(b), 0], [0, 0, 1]])
        rot = rz @ rx
        row, col = rot @ np.array([1.0, 0, 0]), rot @ np.array([0, 1.0, 0])
    else:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, not {orientation!r}")
    return row, col


def phantom_affine(
    shape: Sequence[int],
    spacing: Sequence[float],
    orientation: str = "axial",
    feet_first: bool = False,
    center: Sequence[float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """The (slice, row, col, 1) -> LPS affine of a grid centred on ``center``."""
    row, col = orientation_axes(orientation, feet_first)
    normal = np.cross(row, col)
    affine = np.eye(4)
    affine[:3, 0] = normal * spacing[0]
    affine[:3, 1] = col * spacing[1]
    affine[:3, 2] = row * spacing[2]
    half = (np.asarray(shape, float) - 1) / 2
    affine[:3, 3] = np.asarray(center, float) - affine[:3, :3] @ half
    return affine


@dataclass
class PhantomSeries:
    paths: list[Path]
    affine: np.ndarray
    shape: tuple[int, int, int]
    objects: list[Shape]
    study_uid: str
    series_uid: str
    hu: np.ndarray | None = field(default=None, repr=False)

    def voxel_volume_mm3(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    def truth(self, obj: Shape) -> float:
        """Analytic volume of ``obj`` in mm3."""
        return obj.volume_mm3


def voxel_centres(affine: np.ndarray, shape: Sequence[int], slice_index: int) -> np.ndarray:
    """LPS coordinates (rows, cols, 3) of the voxel centres of one slice."""
    rows, cols = np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
    idx = np.stack([np.full_like(rows, slice_index), rows, cols, np.ones_like(rows)], axis=-1)
    return (idx.reshape(-1, 4) @ affine.T)[:, :3].reshape(shape[1], shape[2], 3)


def render_slice(affine: np.ndarray, shape: Sequence[int], k: int, objects: Sequence[Shape],
                 background_hu: float) -> np.ndarray:
    """HU of one slice: later objects paint over earlier ones."""
    points = voxel_centres(affine, shape, k)
    hu = np.full(points.shape[:2], background_hu, dtype=np.float32)
    for obj in objects:
        hu[obj.inside(points)] = obj.hu
    return hu


def write_phantom_series(
    out_dir: str | Path,
    *,
    shape: Sequence[int] = (40, 64, 64),
    spacing: Sequence[float] = (2.0, 1.5, 1.5),
    orientation: str = "axial",
    feet_first: bool = False,
    objects: Sequence[Shape] = (),
    background_hu: float = -1000.0,
    center: Sequence[float] = (0.0, 0.0, 0.0),
    study_uid: str | None = None,
    series_description: str = "Phantom",
    patient_id: str = "PHANTOM1",
    keep_hu: bool = False,
    seed: int = 0,
) -> PhantomSeries:
    """Write a CT series of ``objects`` on a grid; files are shuffled and numbered out of order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(s) for s in shape)
    affine = phantom_affine(shape, spacing, orientation, feet_first, center)
    row, col = orientation_axes(orientation, feet_first)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    order = list(range(shape[0]))
    random.Random(seed).shuffle(order)
    paths: list[Path] = []
    volume = np.empty(shape, np.float32) if keep_hu else None
    for n, k in enumerate(order):
        hu = render_slice(affine, shape, k, objects, background_hu)
        if volume is not None:
            volume[k] = hu
        ds = _ct_slice(hu, affine, k, row, col, spacing, study_uid, series_uid, frame_uid,
                       series_description, patient_id, feet_first, instance_number=n + 1)
        path = out / f"IM{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return PhantomSeries(paths, affine, shape, list(objects), study_uid, series_uid, volume)


def _ct_slice(hu: np.ndarray, affine: np.ndarray, k: int, row: np.ndarray, col: np.ndarray,
              spacing: Sequence[float], study_uid: str, series_uid: str, frame_uid: str,
              description: str, patient_id: str, feet_first: bool,
              instance_number: int) -> pydicom.Dataset:
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = "CT"
    ds.Manufacturer = "Vesalius phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Phantom study"
    ds.SeriesDescription = description
    ds.PatientName = "Phantom^Test"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "FFS" if feet_first else "HFS"
    ds.KVP = "120"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.AcquisitionNumber = 1
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    position = affine[:3, :3] @ np.array([k, 0, 0]) + affine[:3, 3]
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
    ds.SliceLocation = f"{float(position @ np.cross(row, col)):.6f}"
    ds.SliceThickness = f"{spacing[0]:.6f}"
    ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[2]:.6f}"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = hu.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.PixelData = np.round(hu + 1024).astype("<i2").tobytes()
    return ds
