"""Study-level routing over DICOM: DCMTK storescu -> `vesalius serve` -> DCMTK storescp.

A CT examination (localizer, thin and thick axial, lung kernel, coronal and sagittal reformats)
sent in one association and in one association per series gives exactly one job, on the thin
soft-tissue axial; a late, thinner series replaces the results at the PACS (same UIDs); with
``select = "all"`` every matching series is processed, as before. Why each series was chosen or
skipped is visible in /studies and `vesalius status`.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pydicom.errors
import pytest

from tests.peers import NodeProcess, StoreSCP, storescp, storescu, vesalius_node, wait_for
from tests.study_phantoms import Study, ct_study, reconstruction

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SURFACE = "1.2.840.10008.5.1.4.1.1.66.5"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
# long enough that the storescu runs of one study never leave it quiet between them
SLOW_STUDY = "study_quiet_period = 8\n"


def results_at(pacs: StoreSCP, study_uid: str) -> list[pydicom.Dataset]:
    """Our objects the PACS holds for a study."""
    found = []
    for path in pacs.files():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, EOFError, OSError):
            continue  # storescp is still writing it
        if ds.get("StudyInstanceUID") == study_uid and ds.get("Manufacturer") == "Vesalius":
            found.append(ds)
    return found


def seg_source(ds: pydicom.Dataset) -> str:
    return str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)


@dataclass
class Best:
    one: Study      # sent in one association
    several: Study  # one association per series
    late: str       # a thinner series sent to `one` after its job ran
    node: NodeProcess
    jobs_before: list[dict]
    segs_before: dict[str, list[pydicom.Dataset]]
    jobs_after: list[dict]
    segs_after: list[pydicom.Dataset]
    studies: list[dict]
    status: str


@pytest.fixture(scope="module")
def best(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Best]:
    tmp = tmp_path_factory.mktemp("study")
    one, several = ct_study(tmp / "one"), ct_study(tmp / "several")
    late = reconstruction(tmp / "late", one.uid, 9, 1.0, "B30f", "Chest 1.0 B30f")
    with storescp(tmp / "pacs") as pacs, \
            vesalius_node(tmp, destinations=[pacs.address], config=SLOW_STUDY) as node:
        storescu(one.paths(), node.port)
        for role in ("localizer", "thick", "coronal", "thin", "lung", "sagittal"):
            storescu(several.series[role].paths, node.port)
        wait_for(lambda: node.delivered(2), 300, "the results of both studies at the PACS")
        jobs_before = node.jobs()
        segs_before = {s.uid: [d for d in results_at(pacs, s.uid) if d.SOPClassUID == SEG]
                       for s in (one, several)}
        storescu(late.paths, node.port)
        wait_for(lambda: node.delivered(3), 300, "the late series' results at the PACS")
        studies = node.get("/studies")
        status = subprocess.run([sys.executable, "-m", "vesalius.node.cli", "status", "--data-dir",
                                 str(node.data_dir)], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        yield Best(one, several, late.series_uid, node, jobs_before, segs_before, node.jobs(),
                   [d for d in results_at(pacs, one.uid) if d.SOPClassUID == SEG], studies, status.stdout)


def test_one_job_per_study_on_the_thin_soft_tissue_axial(best: Best) -> None:
    by_series = {j["series_instance_uid"]: j for j in best.jobs_before}
    assert set(by_series) == {best.one.series["thin"].series_uid, best.several.series["thin"].series_uid}
    assert {j["state"] for j in best.jobs_before} == {"done"}
    for study in (best.one, best.several):
        [seg] = best.segs_before[study.uid]
        assert seg_source(seg) == study.series["thin"].series_uid


def test_a_late_thinner_series_replaces_the_results(best: Best) -> None:
    newest = max(best.jobs_after, key=lambda j: j["id"])
    assert len(best.jobs_after) == 3 and newest["series_instance_uid"] == best.late
    assert newest["state"] == "done"
    before = best.segs_before[best.one.uid][0]
    # the PACS got the same SOP Instance UID again, now made from the late series
    assert {str(d.SOPInstanceUID) for d in best.segs_after} == {str(before.SOPInstanceUID)}
    assert {str(d.SeriesInstanceUID) for d in best.segs_after} == {str(before.SeriesInstanceUID)}
    assert {seg_source(d) for d in best.segs_after} == {best.late}


def test_the_reasons_are_visible(best: Best) -> None:
    study = next(s for s in best.studies if s["study_instance_uid"] == best.one.uid)
    reasons = {i["series_instance_uid"]: i["reason"] for i in study["selection"]}
    assert reasons[best.late] == "chosen: 1 mm axial, 130 slices, 129 mm, kernel B30f"
    series = best.one.series
    assert reasons[series["coronal"].series_uid] == "skipped: ImageType DERIVED\\SECONDARY\\REFORMATTED"
    assert reasons[series["localizer"].series_uid] == "skipped: ImageType ORIGINAL\\PRIMARY\\LOCALIZER"
    assert reasons[series["lung"].series_uid].endswith("ranks higher on soft_kernel")
    assert reasons[series["thin"].series_uid].endswith("ranks higher on thinnest")
    assert f"ct  {best.late}  chosen: 1 mm axial" in best.status
    assert "Phantom^Test" not in best.status and "Phantom^Test" not in best.node.log()


def test_select_all_processes_every_matching_series(tmp_path: Path) -> None:
    study = ct_study(tmp_path / "study")
    every = '[[rules]]\nname = "ct"\nselect = "all"\n'
    with storescp(tmp_path / "pacs") as pacs, \
            vesalius_node(tmp_path, destinations=[pacs.address], config=every) as node:
        storescu(study.paths(), node.port)
        wait_for(lambda: node.delivered(3), 300, "the results of the three axial series")
        jobs = node.jobs()
        segs = [d for d in results_at(pacs, study.uid) if d.SOPClassUID == SEG]
    expected = {study.series[r].series_uid for r in ("thin", "thick", "lung")}
    assert {j["series_instance_uid"] for j in jobs} == expected and len(jobs) == 3
    assert {seg_source(d) for d in segs} == expected
    assert len({str(d.SOPInstanceUID) for d in segs}) == 3  # results per series, as before
