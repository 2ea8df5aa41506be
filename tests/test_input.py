"""Real-world input through the whole node: DCMTK storescu -> `vesalius serve` -> DCMTK storescp.

Scanners do not send one clean series per association: two reconstructions go out interleaved in
one association, a scout image travels inside the axial series, and a tilted-gantry series must be
refused with its reason rather than turned into a wrong surface. (The same SOP Instance UID sent
twice is tested in test_receive.py.) Small chest phantoms keep it fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pydicom.errors
import pytest
from pydicom.uid import generate_uid

from tests.dicom_checks import assert_dciodvfy_clean
from tests.peers import NodeProcess, StoreSCP, storescp, storescu, vesalius_node, wait_for
from tests.phantoms import PhantomSeries, write_phantom_series
from tests.test_e2e import CHEST
from tests.test_volume import write_enhanced

SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
SHAPE, SPACING = (30, 96, 96), (4.0, 2.5, 2.5)  # the whole chest phantom, coarse


@dataclass
class Sent:
    first: PhantomSeries    # interleaved with second, in one association
    second: PhantomSeries
    scouted: PhantomSeries  # sent with a localizer image in the series
    scout_uid: str
    tilted: PhantomSeries   # sheared slice stack (gantry tilt)
    enhanced: PhantomSeries  # sent as one Enhanced CT instance
    enhanced_uid: str
    pacs: StoreSCP
    node: NodeProcess


def _phantom(folder: Path, seed: int, description: str, **kwargs) -> PhantomSeries:
    return write_phantom_series(folder, shape=SHAPE, spacing=SPACING, objects=CHEST, seed=seed,
                                series_description=description, **kwargs)


def _add_localizer(phantom: PhantomSeries, folder: Path) -> tuple[Path, str]:
    """A coronal scout in the same series, as a CT scanner stores the topogram with the slices."""
    ds = pydicom.dcmread(phantom.paths[0])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.ImagePositionPatient = [-118.75, 0, 100]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = 0
    path = folder / "scout.dcm"
    ds.save_as(path)
    return path, str(ds.SOPInstanceUID)


def _tilt(phantom: PhantomSeries, degrees: float) -> None:
    """Shear the stack as a tilted gantry does: each slice shifted along y by its z."""
    for path in phantom.paths:
        ds = pydicom.dcmread(path)
        position = [float(v) for v in ds.ImagePositionPatient]
        position[1] += (position[2] - float(phantom.affine[2, 3])) * np.tan(np.radians(degrees))
        ds.ImagePositionPatient = position
        ds.GantryDetectorTilt = degrees
        ds.save_as(path)


@pytest.fixture(scope="module")
def sent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sent]:
    tmp = tmp_path_factory.mktemp("input")
    first = _phantom(tmp / "first", 1, "Chest soft tissue")
    second = _phantom(tmp / "second", 2, "Chest lung kernel", study_uid=first.study_uid)
    scouted = _phantom(tmp / "scouted", 3, "Chest with scout")
    scout, scout_uid = _add_localizer(scouted, tmp)
    tilted = _phantom(tmp / "tilted", 4, "Chest tilted gantry")
    _tilt(tilted, 15.0)
    enhanced = _phantom(tmp / "enhanced", 5, "Chest enhanced CT")
    enhanced_file = write_enhanced(enhanced.paths, tmp / "enhanced.dcm")
    enhanced_uid = str(pydicom.dcmread(enhanced_file, stop_before_pixels=True).SOPInstanceUID)
    # both interleaved series of one study are to be processed: every matching series, not the best
    every = '[[rules]]\nname = "ct"\nselect = "all"\n'
    with storescp(tmp / "pacs") as pacs, vesalius_node(tmp, destinations=[pacs.address],
                                                        config=every) as node:
        interleaved = [path for pair in zip(first.paths, second.paths, strict=True) for path in pair]
        storescu(interleaved, node.port)
        storescu([scout, *scouted.paths], node.port)
        storescu(tilted.paths, node.port)
        storescu([enhanced_file], node.port)
        sent = Sent(first, second, scouted, scout_uid, tilted, enhanced, enhanced_uid, pacs, node)
        # a delivery is done when the PACS acknowledged every object, so its files are complete
        wait_for(lambda: node.delivered(4) and (job := _job_for(node, tilted))
                 and job["state"] == "failed", 180,
                 "the results of each good series and the tilted series' job to fail")
        yield sent


def _seg_for(pacs: StoreSCP, phantom: PhantomSeries) -> pydicom.Dataset | None:
    """The BINARY SEG the PACS holds for a source series, or None."""
    for path in pacs.files():
        try:
            ds = pydicom.dcmread(path)
        except (pydicom.errors.InvalidDicomError, EOFError, OSError):
            continue  # storescp is still writing it
        if (ds.get("SOPClassUID") == SEGMENTATION and "ReferencedSeriesSequence" in ds
                and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == phantom.series_uid):
            return ds
    return None


def _job_for(node: NodeProcess, phantom: PhantomSeries) -> dict | None:
    return next((j for j in node.jobs() if j["series_instance_uid"] == phantom.series_uid), None)


def _referenced_instances(seg: pydicom.Dataset) -> set[str]:
    """Every source SOP Instance UID the SEG names: in its series references and per frame."""
    uids = {str(item.ReferencedSOPInstanceUID)
            for series in seg.ReferencedSeriesSequence
            for item in series.ReferencedInstanceSequence}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        for derivation in frame.get("DerivationImageSequence", []):
            uids |= {str(item.ReferencedSOPInstanceUID) for item in derivation.SourceImageSequence}
    return uids


def _sop_uids(phantom: PhantomSeries) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in phantom.paths}


def test_two_interleaved_series_are_two_complete_volumes(sent: Sent) -> None:
    for phantom in (sent.first, sent.second):
        series = next(s for s in sent.node.get("/series")
                      if s["series_instance_uid"] == phantom.series_uid)
        assert series["instances"] == SHAPE[0]
        assert _job_for(sent.node, phantom)["state"] == "done"
        seg = _seg_for(sent.pacs, phantom)
        assert _referenced_instances(seg) == _sop_uids(phantom)  # all its slices, none of the other's
        assert int(seg.NumberOfFrames) % SHAPE[0] == 0
        assert seg.StudyInstanceUID == sent.first.study_uid


def test_localizer_is_left_out_of_the_volume(sent: Sent) -> None:
    assert _job_for(sent.node, sent.scouted)["state"] == "done"
    series = next(s for s in sent.node.get("/series")
                  if s["series_instance_uid"] == sent.scouted.series_uid)
    assert series["instances"] == SHAPE[0] + 1  # the scout was received and stored
    referenced = _referenced_instances(_seg_for(sent.pacs, sent.scouted))
    assert sent.scout_uid not in referenced
    assert referenced == _sop_uids(sent.scouted)


def test_gantry_tilt_is_refused_with_the_reason(sent: Sent) -> None:
    job = _job_for(sent.node, sent.tilted)
    assert job["state"] == "failed" and job["attempts"] == 1
    assert "gantry tilt" in job["error"] and "15.00 degrees" in job["error"]
    assert _seg_for(sent.pacs, sent.tilted) is None


def test_enhanced_ct_becomes_a_seg_on_its_frames(sent: Sent) -> None:
    seg = _seg_for(sent.pacs, sent.enhanced)
    assert _job_for(sent.node, sent.enhanced)["state"] == "done"
    assert _referenced_instances(seg) == {sent.enhanced_uid}
    frames = {int(item.ReferencedFrameNumber)
              for frame in seg.PerFrameFunctionalGroupsSequence
              for item in frame.DerivationImageSequence[0].SourceImageSequence}
    assert frames == set(range(1, SHAPE[0] + 1))
    assert_dciodvfy_clean(seg)
