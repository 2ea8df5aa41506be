"""Faults injected for real: kill -9 of the node and of its worker, a model that fails.

After every fault, every acknowledged instance must still be there, the listener must keep
serving, and each result object must reach the PACS under one SOP Instance UID only.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pydicom
from pydicom.uid import MRImageStorage
from pynetdicom import AE, AllStoragePresentationContexts, evt

from tests.conftest import free_port
from tests.peers import DCMTK_ENV, storescp, storescu, vesalius_node, wait_for, worker_pids
from tests.phantoms import Cylinder, write_phantom_series

CHEST = [Cylinder((0, 0, 0), (0, 0, 1), 70, 80, 40), Cylinder((0, 40, 0), (0, 0, 1), 10, 60, 700)]


RESULTS = 4  # what a destination receives by default: SEG, Surface Segmentation, SR, 3D preview


def phantom(folder: Path, slices: int = 30):
    return write_phantom_series(folder, shape=(slices, 96, 96), spacing=(3, 1.8, 1.8), objects=CHEST)


def pacs_uids(pacs, study_uid: str) -> list[str]:
    uids = []
    for path in pacs.files():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, EOFError):  # storescp is still writing it:
            continue  # the next poll of wait_for reads it whole
        if ds.StudyInstanceUID == study_uid:
            uids.append(str(ds.SOPInstanceUID))
    return uids


def kill_node(node) -> None:
    os.killpg(node.proc.pid, signal.SIGKILL)  # the node and its worker processes, no goodbye
    node.proc.wait(10)


def test_kill_mid_association_keeps_every_acknowledged_instance(tmp_path: Path) -> None:
    series = phantom(tmp_path / "ct", slices=60)
    data = tmp_path / "data"
    with vesalius_node(tmp_path, data_dir=data) as node:
        sender = subprocess.Popen(["storescu", "-v", "-aec", "VESALIUS", "127.0.0.1", str(node.port),
                                   *map(str, series.paths)], env={**DCMTK_ENV, "TCP_NODELAY": "1"},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        spool = data / "spool" / series.study_uid / series.series_uid
        wait_for(lambda: spool.exists() and len(list(spool.glob("*.dcm"))) >= 10, 30, "10 instances")
        kill_node(node)
        output = sender.communicate(timeout=30)[0]
    acknowledged = len(re.findall(r"Received Store Response \(Success\)", output))
    assert 0 < acknowledged < 60  # (the 10th stored may not have been acknowledged yet)
    stored = list(spool.glob("*.dcm"))
    assert len(stored) >= acknowledged  # nothing acknowledged is lost
    for path in stored:  # and nothing half-written pretends to be an instance
        assert pydicom.dcmread(path).PixelData
    with storescp(tmp_path / "pacs") as pacs, \
            vesalius_node(tmp_path, data_dir=data, destinations=[pacs.address]) as node:
        rows = node.get("/series")
        # every acknowledged instance has its row; a file renamed into place just before the kill
        # may have none yet (never acknowledged: the scanner sends it again)
        assert acknowledged <= rows[0]["instances"] <= len(stored)
        storescu(series.paths, node.port)  # the scanner sends the series again
        wait_for(lambda: len(pacs_uids(pacs, series.study_uid)) >= RESULTS, 180, "the results")
        wait_for(node.delivered, 60, "deliveries done")
        assert len(set(pacs_uids(pacs, series.study_uid))) == RESULTS


def test_kill_during_the_job_then_restart_delivers_once(tmp_path: Path) -> None:
    series = phantom(tmp_path / "ct")
    data = tmp_path / "data"
    with storescp(tmp_path / "pacs") as pacs:
        with vesalius_node(tmp_path, data_dir=data, destinations=[pacs.address]) as node:
            storescu(series.paths, node.port)
            wait_for(lambda: "job start" in node.log(), 60, "the job to start")
            kill_node(node)
        with vesalius_node(tmp_path, data_dir=data, destinations=[pacs.address]) as node:
            wait_for(lambda: len(pacs_uids(pacs, series.study_uid)) >= RESULTS, 180, "the results")
            wait_for(lambda: node.delivered(1), 60, "deliveries done")
            assert "resuming 1 interrupted job" in node.log()
            jobs = node.jobs()
        assert len(jobs) == 1 and jobs[0]["state"] == "done"
        assert len(set(pacs_uids(pacs, series.study_uid))) == RESULTS


def test_kill_during_sending_then_restart_resends_the_same_uids(tmp_path: Path) -> None:
    """The PACS holds the first C-STORE until the node is dead; after a restart the node sends
    again: the PACS may see a SOP Instance UID twice, never two UIDs for one result."""
    series = phantom(tmp_path / "ct")
    data, port = tmp_path / "data", free_port()
    received: list[str] = []
    first_arrived, node_dead = threading.Event(), threading.Event()

    def store(event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        if len(received) == 1:
            first_arrived.set()
            node_dead.wait(30)
        return 0

    ae = AE(ae_title="SLOWPACS")
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    try:
        pacs = f"SLOWPACS@127.0.0.1:{port}"
        with vesalius_node(tmp_path, data_dir=data, destinations=[pacs]) as node:
            storescu(series.paths, node.port)
            assert first_arrived.wait(120), "no delivery started"
            kill_node(node)
        node_dead.set()
        with vesalius_node(tmp_path, data_dir=data, destinations=[pacs]) as node:
            wait_for(lambda: node.delivered(1), 120, "the resend")
    finally:
        server.shutdown()
    assert len(set(received)) == RESULTS and len(received) > RESULTS


def test_worker_killed_job_retried_listener_keeps_serving(tmp_path: Path) -> None:
    series = phantom(tmp_path / "ct")
    with storescp(tmp_path / "pacs") as pacs, \
            vesalius_node(tmp_path, destinations=[pacs.address]) as node:
        storescu(series.paths, node.port)
        wait_for(lambda: "job start" in node.log(), 60, "the job to start")
        workers = worker_pids(node.proc.pid)
        assert workers, "the node runs no worker process"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["echoscu", "-aec", "VESALIUS", "127.0.0.1", str(node.port)], check=True,
                       env=DCMTK_ENV, timeout=30)
        wait_for(lambda: len(pacs_uids(pacs, series.study_uid)) >= RESULTS, 180, "the results after a retry")
        job = node.jobs()[0]
        assert job["state"] == "done" and job["attempts"] == 2
        assert "worker process died" in node.log()


def test_failing_model_ends_failed_with_reason(tmp_path: Path) -> None:
    """builtin_ct raises on MR; a rule sends it MR anyway: the job fails after its retries."""
    series = phantom(tmp_path / "mr", slices=5)
    for path in series.paths:
        ds = pydicom.dcmread(path)
        ds.Modality, ds.SOPClassUID = "MR", MRImageStorage
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.save_as(path)
    rule = '[[rules]]\nname = "mr"\nmodality = ["MR"]\nsop_class = []\nmodel = "builtin_ct"\n'
    with vesalius_node(tmp_path, config=rule) as node:
        storescu(series.paths, node.port)
        job = wait_for(lambda: (jobs := node.jobs()) and jobs[0]["state"] == "failed" and jobs[0], 60,
                       "the job to fail")
        assert job["attempts"] == 2 and "CT only" in job["error"]
        subprocess.run(["echoscu", "-aec", "VESALIUS", "127.0.0.1", str(node.port)], check=True,
                       env=DCMTK_ENV, timeout=30)


def test_series_that_cannot_be_placed_fails_at_once_with_reason(tmp_path: Path) -> None:
    series = phantom(tmp_path / "gap", slices=12)
    by_position = sorted(series.paths, key=lambda p: float(pydicom.dcmread(p).SliceLocation))
    with vesalius_node(tmp_path) as node:
        storescu([p for p in by_position if p != by_position[5]], node.port)  # one slice lost
        job = wait_for(lambda: (jobs := node.jobs()) and jobs[0]["state"] == "failed" and jobs[0], 60,
                       "the job to fail")
        assert job["attempts"] == 1 and "cannot place series in space" in job["error"]
        assert "missing" in job["error"]
        assert node.deliveries() == []
