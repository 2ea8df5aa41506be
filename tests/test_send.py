"""Deliveries against real peers: DCMTK storescp as the PACS, a pynetdicom SCP that refuses us."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import CTImageStorage, LabelMapSegmentationStorage

from tests.conftest import free_port
from tests.peers import storescp, wait_for
from tests.phantoms import Sphere, write_phantom_series
from vesalius.node.config import Config, Retry
from vesalius.node.destinations import DeliveryError
from vesalius.node.destinations.dicom import DicomDestination as Destination
from vesalius.node.pipeline import OUTPUT_FILES, STL_DIR
from vesalius.node.send import Sender, files_for, next_delay
from vesalius.node.store import Claim, Store, results_ready


@pytest.fixture
def result_dir(tmp_path: Path) -> Path:
    """A results folder holding real DICOM objects under the names a job writes (CT slices
    stand in for the objects; the one playing the Label Map SEG carries that SOP class)."""
    phantom = write_phantom_series(tmp_path / "src", shape=(len(OUTPUT_FILES) + 2, 16, 16), spacing=(1, 1, 1),
                                   objects=[Sphere((0, 0, 0), 4, 100)])
    out = tmp_path / "results"
    (out / STL_DIR).mkdir(parents=True)
    names = [*OUTPUT_FILES.values(), f"{STL_DIR}/body.dcm", f"{STL_DIR}/bone.dcm"]
    for path, name in zip(phantom.paths, names, strict=True):
        (out / name).write_bytes(path.read_bytes())
    labelmap = pydicom.dcmread(out / OUTPUT_FILES["seg_labelmap"])
    labelmap.SOPClassUID = labelmap.file_meta.MediaStorageSOPClassUID = LabelMapSegmentationStorage
    labelmap.save_as(out / OUTPUT_FILES["seg_labelmap"])
    return out


def queued_delivery(store: Store, result_dir: Path, destination: str) -> int:
    with store.transaction() as db:
        job = store.add_job(db, "1.2.3", "rule", "builtin_ct", [destination])
    store.finish_job(job, result_dir, {"model": 0.1}, [destination])
    return store.query("SELECT id FROM deliveries WHERE job_id=?", (job,))[0]["id"]


@contextmanager
def sender_for(store: Store, config: Config) -> Iterator[Sender]:
    wake, stop = threading.Event(), threading.Event()
    sender = Sender(store, config, wake, stop)
    sender.thread.start()
    try:
        yield sender
    finally:
        stop.set()
        wake.set()
        sender.thread.join(10)


def delivery(store: Store, delivery_id: int) -> dict:
    return dict(store.query("SELECT * FROM deliveries WHERE id=?", (delivery_id,))[0])


def test_backoff_is_exponential_and_capped() -> None:
    retry = Retry(base_delay=2, max_delay=30, max_attempts=10)
    assert [next_delay(retry, n) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]


def test_destination_down_then_back(tmp_path: Path, result_dir: Path) -> None:
    port = free_port()
    config = Config(destinations=(Destination("pacs", "PACS", "127.0.0.1", port),),
                    retry=Retry(base_delay=1, max_delay=2, max_attempts=50))
    store = Store(tmp_path / "data")
    delivery_id = queued_delivery(store, result_dir, "pacs")
    with sender_for(store, config):
        wait_for(lambda: delivery(store, delivery_id)["attempts"] >= 2, 20, "two failed tries")
        row = delivery(store, delivery_id)
        assert row["state"] == "pending" and "unreachable" in row["error"]
        assert "Connection refused" in row["error"]  # the underlying cause, not only "no association"
        with storescp(tmp_path / "pacs", port=port) as pacs:
            wait_for(lambda: delivery(store, delivery_id)["state"] == "done", 20, "the delivery")
            received = {pydicom.dcmread(p).SOPInstanceUID for p in pacs.files()}
    sent = {pydicom.dcmread(p).SOPInstanceUID for p in files_for(config.destinations[0], result_dir)}
    assert received == sent and len(sent) == 4  # BINARY SEG, surfaces, SR, preview by default


def test_delivery_survives_a_restart(database_url: str, tmp_path: Path, result_dir: Path) -> None:
    config = Config(destinations=(Destination("pacs", "PACS", "127.0.0.1", free_port()),),
                    retry=Retry(base_delay=0.2, max_delay=0.2))
    store = Store(tmp_path / "data", database_url)
    delivery_id = queued_delivery(store, result_dir, "pacs")
    reopened = Store(tmp_path / "data", database_url)  # as a new process opens it
    assert delivery(reopened, delivery_id)["state"] == "pending"
    with storescp(tmp_path / "pacs", port=config.destinations[0].port) as pacs:
        with sender_for(Store(tmp_path / "data", database_url), config):
            wait_for(lambda: delivery(store, delivery_id)["state"] == "done", 20, "the delivery")
        assert len(pacs.files()) == 4


@contextmanager
def refusing_scp(port: int) -> Iterator[None]:
    """A real pynetdicom SCP that only talks to calling AE 'SOMEONE_ELSE'."""
    ae = AE(ae_title="PICKY")
    ae.require_calling_aet = ["SOMEONE_ELSE"]
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        yield
    finally:
        server.shutdown()


def test_permanent_refusal_ends_failed_without_looping(
        database_url: str, tmp_path: Path, result_dir: Path) -> None:
    port = free_port()
    config = Config(destinations=(Destination("picky", "PICKY", "127.0.0.1", port),),
                    retry=Retry(base_delay=0.2, max_delay=0.2, max_attempts=100))
    store = Store(tmp_path / "data", database_url)
    delivery_id = queued_delivery(store, result_dir, "picky")
    with refusing_scp(port), sender_for(store, config):
        wait_for(lambda: delivery(store, delivery_id)["state"] == "failed", 20, "the failed state")
    assert not store.due_deliveries()  # nothing left for the sender to try again
    row = delivery(store, delivery_id)
    assert row["attempts"] == 1 and "Calling AE title not recognised" in row["error"]


def test_c_store_reports_unaccepted_sop_class_as_permanent(tmp_path: Path, result_dir: Path) -> None:
    port = free_port()
    ae = AE(ae_title="CTONLY")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.4")  # MR only: our CT files are not accepted
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        with pytest.raises(DeliveryError) as err:
            Destination("x", "CTONLY", "127.0.0.1", port).send(sorted(result_dir.glob("*.dcm")), "VESALIUS")
    finally:
        server.shutdown()
    assert err.value.permanent and "does not accept" in str(err.value)


def test_outputs_chosen_per_destination(result_dir: Path) -> None:
    plain = Destination("a", "A", "h", 1)
    names = lambda d: [p.relative_to(result_dir).as_posix() for p in files_for(d, result_dir)]  # noqa: E731
    assert names(plain) == ["seg.dcm", "surfaces.dcm", "sr.dcm", "preview.dcm"]
    everything = Destination("b", "B", "h", 1, labelmap=True, encapsulated_stl=True)
    assert names(everything) == ["seg.dcm", "seg_labelmap.dcm", "surfaces.dcm", "sr.dcm", "preview.dcm",
                                 "stl/body.dcm", "stl/bone.dcm"]
    lean = Destination("c", "C", "h", 1, surfaces=False, sr=False, preview=False,
                       encapsulated_stl=("bone",))
    assert names(lean) == ["seg.dcm", "stl/bone.dcm"]


def test_label_map_skipped_when_not_accepted(tmp_path: Path, result_dir: Path) -> None:
    """A PACS without Label Map SEG support still gets everything else; no failure."""
    port, received = free_port(), []
    ae = AE(ae_title="OLDPACS")
    ae.add_supported_context(CTImageStorage)  # our stand-in objects are CT; no Label Map SEG
    handlers = [(evt.EVT_C_STORE, lambda event: received.append(event.dataset.SOPClassUID) or 0)]
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        destination = Destination("old", "OLDPACS", "127.0.0.1", port, labelmap=True)
        files = files_for(destination, result_dir)
        assert OUTPUT_FILES["seg_labelmap"] in [f.name for f in files]
        destination.send(files, "VESALIUS")
    finally:
        server.shutdown()
    assert received == [CTImageStorage] * 4  # SEG, surfaces, SR, preview


def test_per_destination_attempts_override_the_default(
        database_url: str, tmp_path: Path, result_dir: Path) -> None:
    closed = free_port()
    config = Config(destinations=(Destination("flaky", "PACS", "127.0.0.1", closed, max_attempts=2),),
                    retry=Retry(base_delay=0.1, max_delay=0.1, max_attempts=100))
    store = Store(tmp_path / "data", database_url)
    delivery_id = queued_delivery(store, result_dir, "flaky")
    with sender_for(store, config):
        wait_for(lambda: delivery(store, delivery_id)["state"] == "failed", 20, "the failed state")
    assert delivery(store, delivery_id)["attempts"] == 2


def _running_job(store: Store, destination: str) -> tuple[int, Claim]:
    with store.transaction() as db:
        job = store.add_job(db, "1.2.3", "rule", "builtin_ct", [destination])
    claimed = store.claim_job("node-a")
    assert claimed is not None and claimed["id"] == job
    claim = Claim.of(claimed)
    assert claim is not None
    return job, claim


def test_first_objects_go_out_while_the_job_still_writes_the_rest(database_url: str, tmp_path: Path,
                                                                   result_dir: Path) -> None:
    """The worker's results_ready queues the SEG, surfaces and SR; the sender delivers them while
    the job runs; finish_job then queues the rest (the 3D preview), which follows, each once."""
    config = Config(destinations=(Destination("pacs", "PACS", "127.0.0.1", free_port()),))
    store = Store(tmp_path / "data", database_url)
    job, claim = _running_job(store, "pacs")
    assert not results_ready(store.url, job, Claim("node-b", claim.attempt), result_dir, ["pacs"])
    assert store.query("SELECT * FROM deliveries") == []  # a node without the job's claim queues nothing
    assert results_ready(store.url, job, claim, result_dir, ["pacs"])
    [row] = store.query("SELECT id, part FROM deliveries")
    assert row["part"] == "first"
    uid = lambda p: str(pydicom.dcmread(p).SOPInstanceUID)  # noqa: E731
    first = [uid(result_dir / OUTPUT_FILES[key]) for key in ("seg", "surface_segmentation", "sr")]
    with storescp(tmp_path / "pacs", port=config.destinations[0].port) as pacs, sender_for(store, config):
        wait_for(lambda: delivery(store, row["id"])["state"] == "done", 20, "the first objects")
        assert store.job(job)["state"] == "running"
        assert sorted(map(uid, pacs.files())) == sorted(first)
        assert store.finish_job(job, result_dir, {"model": 0.1}, ["pacs"], claim)
        assert delivery(store, row["id"])["part"] == "rest"
        wait_for(lambda: delivery(store, row["id"])["state"] == "done", 20, "the rest")
        received = sorted(map(uid, pacs.files()))
    everything = sorted(map(uid, files_for(config.destinations[0], result_dir)))
    assert received == everything and len(everything) == 4  # each object once: none sent twice
    assert delivery(store, row["id"])["attempts"] == 1


def test_a_job_done_before_its_first_objects_went_out_sends_everything(database_url: str, tmp_path: Path,
                                                                      result_dir: Path) -> None:
    store = Store(tmp_path / "data", database_url)
    job, claim = _running_job(store, "pacs")
    assert results_ready(store.url, job, claim, result_dir, ["pacs"])
    store.finish_job(job, result_dir, {"model": 0.1}, ["pacs"], claim)
    [row] = store.query("SELECT part, state FROM deliveries")
    assert (row["part"], row["state"]) == ("all", "pending")
    store.record_delivery(1, "done", None, 0.0)
    assert store.resend_job(job) == 1
    assert store.query("SELECT part FROM deliveries")[0]["part"] == "all"


def test_a_job_done_while_its_first_objects_are_being_sent_sends_each_object_once(
        database_url: str, tmp_path: Path, result_dir: Path) -> None:
    """The job ends while a sender holds its first part: that send is left alone, and once it is
    recorded done the rest follows (reset to 'all', the first objects would go out twice)."""
    store = Store(tmp_path / "data", database_url)
    job, claim = _running_job(store, "pacs")
    assert results_ready(store.url, job, claim, result_dir, ["pacs"])
    sending = store.claim_delivery("node-a", 30.0)
    assert sending is not None and sending["part"] == "first"
    assert store.finish_job(job, result_dir, {"model": 0.1}, ["pacs"], claim)
    [row] = store.query("SELECT part, state, lease_owner FROM deliveries")
    assert (row["part"], row["state"], row["lease_owner"]) == ("first", "pending", "node-a")
    assert store.record_delivery(sending["id"], "done", None, 0.0, Claim.of(sending))
    [row] = store.query("SELECT part, state, attempts FROM deliveries")
    assert (row["part"], row["state"], row["attempts"]) == ("rest", "pending", 0)
    assert store.claim_delivery("node-a", 30.0)["part"] == "rest"


def test_each_part_names_its_own_files(result_dir: Path) -> None:
    destination = Destination("pacs", "PACS", "127.0.0.1", 104, labelmap=True, encapsulated_stl=True)
    names = {part: [p.relative_to(result_dir).as_posix() for p in files_for(destination, result_dir, part)]
             for part in ("first", "rest", "all")}
    assert names["first"] == ["seg.dcm", "seg_labelmap.dcm", "surfaces.dcm", "sr.dcm"]
    assert names["rest"] == ["preview.dcm", f"{STL_DIR}/body.dcm", f"{STL_DIR}/bone.dcm"]
    assert sorted(names["all"]) == sorted(names["first"] + names["rest"])
    with pytest.raises(ValueError, match="no such part"):
        files_for(destination, result_dir, "preview")
