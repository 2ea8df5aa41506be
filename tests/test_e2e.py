"""The whole node with real peers: DCMTK storescu (scanner) -> `vesalius serve` -> DCMTK storescp (PACS).

Chest phantoms of known geometry (body, two lungs, spine) in several orientations go in over the
network; SEG, Surface Segmentation and SR must come back to the PACS, valid, and exact against the
analytic shapes. The real CTs of ../shared/data make the same round trip.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pydicom.errors
import pytest
from pydicom.uid import CTImageStorage

from tests.dicom_checks import assert_dciodvfy_clean
from tests.peers import StoreSCP, storescp, storescu, vesalius_node, wait_for
from tests.phantoms import Cylinder, PhantomSeries, write_phantom_series
from tests.realdata import write_nifti_as_dicom_series
from vesalius.inference.models.registry import resolve
from vesalius.inference.series import load_series

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SURFACE = "1.2.840.10008.5.1.4.1.1.66.5"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
LABELMAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"
ENCAPSULATED_STL = "1.2.840.10008.5.1.4.1.1.104.3"
PREVIEW = "1.2.840.10008.5.1.4.1.1.7.4"  # Multi-frame True Color Secondary Capture

BODY = Cylinder((0, 0, 0), (0, 0, 1), 90, 120, 40)
LEFT_LUNG = Cylinder((45, -5, 5), (0, 0, 1), 30, 80, -850)   # patient left is +x in LPS
RIGHT_LUNG = Cylinder((-45, -5, 5), (0, 0, 1), 33, 80, -850)
SPINE = Cylinder((0, 55, 0), (0, 0, 1), 16, 100, 700)     # posterior is +y
CHEST = [BODY, LEFT_LUNG, RIGHT_LUNG, SPINE]
TRUTH = {"body": BODY, "lung_left": LEFT_LUNG, "lung_right": RIGHT_LUNG, "bone": SPINE}

CASES = {
    "axial-head-first": dict(orientation="axial"),
    "axial-feet-first": dict(orientation="axial", feet_first=True),
    "coronal": dict(orientation="coronal"),
    "oblique": dict(orientation="oblique"),
}


@dataclass
class RoundTrip:
    phantoms: dict[str, PhantomSeries]
    pacs: StoreSCP
    node_log: str
    jobs: list[dict]
    deliveries: list[dict]


def objects_for(pacs: StoreSCP, study_uid: str) -> dict[str, pydicom.Dataset]:
    """The objects the PACS holds for a study, by SOP class."""
    found = {}
    for path in pacs.files():
        try:
            ds = pydicom.dcmread(path)
        except (pydicom.errors.InvalidDicomError, EOFError, OSError):
            continue  # storescp is still writing it
        if ds.get("StudyInstanceUID") == study_uid and ds.SOPClassUID != CTImageStorage:
            ds.filename = str(path)
            found[str(ds.SOPClassUID)] = ds
    return found


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoundTrip]:
    tmp = tmp_path_factory.mktemp("e2e")
    phantoms = {
        # the grid holds the whole body (a 108 mm bounding sphere) in every orientation
        name: write_phantom_series(tmp / name, shape=(88, 124, 124), spacing=(2.5, 1.8, 1.8),
                                   objects=CHEST, seed=i, series_description=f"Chest phantom {name}",
                                   **kwargs)
        for i, (name, kwargs) in enumerate(CASES.items())
    }
    with storescp(tmp / "pacs") as pacs, vesalius_node(tmp, destinations=[pacs.address]) as node:
        for phantom in phantoms.values():
            storescu(phantom.paths, node.port)
        # a delivery is done when the PACS acknowledged every object, so its files are complete
        wait_for(lambda: node.delivered(len(phantoms)), 300,
                 "SEG, Surface Segmentation and SR of every series at the PACS")
        yield RoundTrip(phantoms, pacs, node.log(), node.jobs(), node.deliveries())


def segment_masks(seg: pydicom.Dataset, source: list[Path]) -> dict[str, np.ndarray]:
    """Each segment of our SEG as a boolean volume on the source slices (read back with highdicom)."""
    volume = load_series(source)
    reader = hd.seg.Segmentation.from_dataset(seg)
    sop_uids = [str(ds.SOPInstanceUID) for ds in volume.sources]
    numbers = {str(item.SegmentLabel): int(item.SegmentNumber) for item in seg.SegmentSequence}
    pixels = reader.get_pixels_by_source_instance(source_sop_instance_uids=sop_uids,
                                                  segment_numbers=list(numbers.values()))
    return {label: pixels[..., i].astype(bool) for i, label in enumerate(numbers)}


LABEL_OF = {"body": "Body", "lung_left": "Left lung", "lung_right": "Right lung", "bone": "Bone"}


@pytest.mark.parametrize("case", CASES)
def test_results_arrive_valid_and_exact(round_trip: RoundTrip, case: str) -> None:
    phantom = round_trip.phantoms[case]
    objects = objects_for(round_trip.pacs, phantom.study_uid)
    assert set(objects) == {SEG, SURFACE, COMPREHENSIVE_3D_SR, PREVIEW}
    for ds in objects.values():
        assert_dciodvfy_clean(ds.filename)
        assert ds.StudyInstanceUID == phantom.study_uid and ds.SeriesInstanceUID != phantom.series_uid
        assert ds.Manufacturer == "Vesalius"

    # SEG: read back, equal to the model's label map, volumes within 2% of the analytic shapes
    masks = segment_masks(objects[SEG], phantom.paths)
    volume = load_series(phantom.paths)
    model = resolve("builtin_ct")
    label_map = model.predict(volume)
    voxel_mm3 = phantom.voxel_volume_mm3()
    for label in model.structures:
        if label.name in TRUTH:
            mask = masks[LABEL_OF[label.name]]
            assert np.array_equal(mask, label.mask(label_map)), label.name
            analytic = TRUTH[label.name].volume_mm3
            assert mask.sum() * voxel_mm3 == pytest.approx(analytic, rel=0.02), label.name

    # Surface Segmentation: every vertex within half a voxel diagonal of the analytic surface
    surfaces = objects[SURFACE]
    tolerance = 0.5 * float(np.linalg.norm(np.linalg.norm(phantom.affine[:3, :3], axis=0)))
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in surfaces.SegmentSequence}
    by_label = {v: k for k, v in LABEL_OF.items()}
    checked = set()
    for segment in surfaces.SegmentSequence:
        name = by_label.get(names[int(segment.SegmentNumber)])
        if name not in TRUTH:
            continue
        number = int(segment.ReferencedSurfaceSequence[0].ReferencedSurfaceNumber)
        surface = next(s for s in surfaces.SurfaceSequence if int(s.SurfaceNumber) == number)
        points = np.frombuffer(surface.SurfacePointsSequence[0].PointCoordinatesData, "<f4").reshape(-1, 3)
        distance = TRUTH[name].distance_to_surface(points.astype(float))
        assert distance.max() <= tolerance, f"{name}: a vertex is {distance.max():.2f} mm off"
        checked.add(name)
    assert checked == set(TRUTH)


def test_left_lung_is_on_the_patients_left(round_trip: RoundTrip) -> None:
    for phantom in round_trip.phantoms.values():
        masks = segment_masks(objects_for(round_trip.pacs, phantom.study_uid)[SEG], phantom.paths)
        volume = load_series(phantom.paths)
        for label, sign in (("Left lung", 1), ("Right lung", -1)):
            idx = np.argwhere(masks[label])
            centre = (np.c_[idx, np.ones(len(idx))] @ volume.affine.T)[:, :3].mean(axis=0)
            assert np.sign(centre[0]) == sign and abs(centre[0]) > 30


def test_every_result_delivered_once_and_logged(round_trip: RoundTrip) -> None:
    assert {j["state"] for j in round_trip.jobs} == {"done"} and len(round_trip.jobs) == len(CASES)
    assert {d["state"] for d in round_trip.deliveries} == {"done"}
    assert all(d["attempts"] == 1 for d in round_trip.deliveries)
    stages = round_trip.jobs[0]["stages"]
    assert set(stages) >= {"volume", "model", "surfaces", "writers"}
    assert "series complete" in round_trip.node_log and "delivery done" in round_trip.node_log
    assert "Phantom^Test" not in round_trip.node_log  # no patient names in the logs


def test_process_command_gives_the_same_objects(round_trip: RoundTrip, tmp_path: Path) -> None:
    phantom = round_trip.phantoms["oblique"]
    out = tmp_path / "out"
    # the node's default rule is study-level: its UIDs are per study and rule ("ct")
    command = [sys.executable, "-m", "vesalius.node.cli", "process", str(phantom.paths[0].parent),
               "--out", str(out), "--rule", "ct", "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    network = objects_for(round_trip.pacs, phantom.study_uid)
    for key, sop_class in (("seg", SEG), ("surface_segmentation", SURFACE), ("sr", COMPREHENSIVE_3D_SR)):
        offline = pydicom.dcmread(out / summary["objects"][key]["file"])
        online = network[sop_class]
        assert offline.SOPInstanceUID == online.SOPInstanceUID  # a re-run replaces, never duplicates
        assert offline.SeriesInstanceUID == online.SeriesInstanceUID
        for keyword in ("PixelData", "SegmentSequence", "SurfaceSequence", "ContentSequence"):
            if keyword in online:
                assert offline[keyword] == online[keyword], keyword
    meshes = sorted(p.relative_to(out).as_posix() for p in (out / "meshes").iterdir())
    assert meshes == sorted(summary["meshes"])
    assert "meshes/structures.glb" in meshes and len(meshes) == len(summary["encapsulated_stl"]) + 1


def test_real_ct_round_trip(tmp_path: Path, shared_data: Path) -> None:
    """Real CTs (the GE slices and TotalSegmentator's example) through the node to a PACS."""
    ge = sorted((shared_data / "ct-3slice-ge").glob("*.dcm"))
    chest = write_nifti_as_dicom_series(shared_data / "totalseg-examples" / "example_ct_sm.nii.gz",
                                        tmp_path / "chest")
    studies = {str(pydicom.dcmread(files[0]).StudyInstanceUID): files for files in (ge, chest)}
    with storescp(tmp_path / "pacs") as pacs:
        # this PACS also takes the Label Map SEG and Encapsulated STL (3D printing) objects
        everything = (f'[[destinations]]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs.port}\n'
                      "labelmap = true\nencapsulated_stl = true\n")
        with vesalius_node(tmp_path, config=everything) as node:
            for files in studies.values():
                storescu(files, node.port)
            wait_for(lambda: node.delivered(2), 300, "results of both real CTs at the PACS")
    for study, files in studies.items():
        objects = objects_for(pacs, study)
        assert set(objects) == {SEG, LABELMAP_SEG, SURFACE, COMPREHENSIVE_3D_SR, ENCAPSULATED_STL,
                                PREVIEW}
        for path in pacs.files():
            if pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID == study:
                assert_dciodvfy_clean(path)
        masks = segment_masks(objects[SEG], files)
        assert masks["Body"].any()
        references = {str(item.ReferencedSOPInstanceUID)
                      for frame in objects[SEG].PerFrameFunctionalGroupsSequence
                      for item in frame.DerivationImageSequence[0].SourceImageSequence}
        assert references <= {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
    chest_masks = segment_masks(objects_for(pacs, str(pydicom.dcmread(chest[0]).StudyInstanceUID))[SEG],
                                chest)
    assert chest_masks["Left lung"].sum() > 1000 and chest_masks["Right lung"].sum() > 1000
