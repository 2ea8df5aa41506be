"""A CT examination as a scanner sends it: several series of one study, small (64 x 64) for speed.

A localizer, thin and thick axial soft-tissue reconstructions, a thin lung-kernel reconstruction
and coronal/sagittal reformats (ImageType DERIVED\\SECONDARY\\REFORMATTED), all of the chest
phantom, so the series a study-level rule should choose is known: the thin soft-tissue axial.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from tests.phantoms import Cylinder, PhantomSeries, write_phantom_series

BODY = Cylinder((0, 0, 0), (0, 0, 1), 90, 120, 40)
LEFT_LUNG = Cylinder((45, -5, 5), (0, 0, 1), 30, 80, -850)
RIGHT_LUNG = Cylinder((-45, -5, 5), (0, 0, 1), 33, 80, -850)
CHEST = [BODY, LEFT_LUNG, RIGHT_LUNG]
PIXEL = 3.2  # mm: 64 pixels hold the 180 mm body
ORIGINAL, REFORMAT = ["ORIGINAL", "PRIMARY", "AXIAL"], ["DERIVED", "SECONDARY", "REFORMATTED"]


@dataclass
class Study:
    uid: str
    series: dict[str, PhantomSeries]  # by role: localizer, thin, thick, lung, coronal, sagittal

    def paths(self, *roles: str) -> list[Path]:
        return [p for role in roles or self.series for p in self.series[role].paths]


def retag(phantom: PhantomSeries, number: int, *, image_type: list[str] | None = None,
          kernel: str | None = None) -> PhantomSeries:
    """Give every file of a series its Series Number, ImageType and ConvolutionKernel."""
    for path in phantom.paths:
        ds = pydicom.dcmread(path)
        ds.SeriesNumber = number
        if image_type is not None:
            ds.ImageType = image_type
        if kernel is not None:
            ds.ConvolutionKernel = kernel
        ds.save_as(path, enforce_file_format=True)
    return phantom


def reconstruction(folder: Path, study_uid: str, number: int, thickness: float, kernel: str,
                   description: str, *, orientation: str = "axial",
                   image_type: list[str] | None = None) -> PhantomSeries:
    """One series of the study covering 130 mm along its slice normal."""
    slices = int(round(130 / thickness)) if orientation == "axial" else 40
    spacing = (thickness if orientation == "axial" else 4.5, PIXEL, PIXEL)
    phantom = write_phantom_series(folder, shape=(slices, 64, 64), spacing=spacing, objects=CHEST,
                                   orientation=orientation, study_uid=study_uid, seed=number,
                                   series_description=description)
    return retag(phantom, number, image_type=image_type or ORIGINAL, kernel=kernel)


def localizer(folder: Path, study_uid: str) -> PhantomSeries:
    """A one-image coronal topogram (ImageType ...\\LOCALIZER), as CT scanners send first."""
    phantom = write_phantom_series(folder, shape=(1, 64, 64), spacing=(1.0, PIXEL, PIXEL), objects=CHEST,
                                   orientation="coronal", study_uid=study_uid,
                                   series_description="Topogram")
    return retag(phantom, 1, image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"], kernel="T20f")


def ct_study(folder: Path) -> Study:
    uid = generate_uid()
    series = {
        "localizer": localizer(folder / "localizer", uid),
        "thick": reconstruction(folder / "thick", uid, 2, 5.0, "B30f", "Chest 5.0 B30f"),
        "thin": reconstruction(folder / "thin", uid, 3, 2.0, "B30f", "Chest 2.0 B30f"),
        "lung": reconstruction(folder / "lung", uid, 4, 2.0, "B70f", "Chest 2.0 B70f lung"),
        "coronal": reconstruction(folder / "coronal", uid, 5, 4.5, "B30f", "Chest MPR cor",
                                  orientation="coronal", image_type=REFORMAT),
        "sagittal": reconstruction(folder / "sagittal", uid, 6, 4.5, "B30f", "Chest MPR sag",
                                   orientation="sagittal", image_type=REFORMAT),
    }
    return Study(uid, series)
