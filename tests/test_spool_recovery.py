"""Instance rows rebuilt from the spool (node.spool_recovery): the fsynced spool file is the record
of an acknowledged instance, its row is committed without an fsync of its own, so a power loss
can take rows but never files. Rebuilt here for rows deleted by hand (what a power loss leaves),
and after a real kill -9 of a node mid-series."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import threading
from pathlib import Path

import pydicom
from pydicom.uid import MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.peers import storescp, vesalius_node, wait_for
from tests.phantoms import Cylinder, write_phantom_series
from vesalius.node import ingest
from vesalius.node.spool_recovery import recover_rows
from vesalius.node.store import Store

BODY = [Cylinder((0, 0, 0), (0, 0, 1), 70, 80, 40), Cylinder((0, 40, 0), (0, 0, 1), 10, 60, 700)]


def stored(store: Store, ds: pydicom.Dataset, name: str) -> Path:
    """``ds`` received by the store as through STOW-RS (``ingest.store_file``)."""
    store.incoming_dir.mkdir(parents=True, exist_ok=True)
    path = store.incoming_dir / name
    ds.save_as(path, enforce_file_format=True)
    assert ingest.store_file(store, path, "SCANNER").status == ingest.SUCCESS
    return store.spool_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


def rows(store: Store) -> dict[str, sqlite3.Row]:
    return {r["sop_instance_uid"]: r for r in store.query(
        "SELECT i.*, s.study_instance_uid FROM instances i JOIN series s USING (series_instance_uid)")}


def test_rows_lost_are_rebuilt_from_the_spool_and_the_rest_is_left_alone(tmp_path: Path) -> None:
    ct = write_phantom_series(tmp_path / "ct", shape=(4, 16, 16), objects=BODY)
    mr = write_phantom_series(tmp_path / "mr", shape=(3, 16, 16), objects=BODY, study_uid=ct.study_uid)
    gone = write_phantom_series(tmp_path / "gone", shape=(2, 16, 16), objects=BODY)
    store = Store(tmp_path / "data")
    datasets = {}
    for n, path in enumerate([*ct.paths, *mr.paths, *gone.paths]):
        ds = pydicom.dcmread(path)
        if path in mr.paths:  # a second SOP class in the same study
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
            ds.Modality = "MR"
        datasets[str(ds.SOPInstanceUID)] = (ds, stored(store, ds, f"{n}.dcm"))
    before = rows(store)
    lost = [str(pydicom.dcmread(p).SOPInstanceUID) for p in (*ct.paths[:2], *mr.paths)]
    removed = {str(pydicom.dcmread(p).SOPInstanceUID) for p in gone.paths}
    kept = [uid for uid in before if uid not in lost and uid not in removed]
    kept_stat = {uid: os.stat(datasets[uid][1]) for uid in kept}
    with store.transaction() as db:  # what a power loss takes: rows, never the fsynced files
        db.executemany("DELETE FROM instances WHERE sop_instance_uid=?", [(u,) for u in lost])
        db.execute("DELETE FROM instances WHERE series_instance_uid=?", (gone.series_uid,))
        db.execute("DELETE FROM series WHERE series_instance_uid=?", (gone.series_uid,))  # retention
    ct_folder = store.spool_series_dir(ct.study_uid, ct.series_uid)
    leftover = ct_folder / ".1.2.3.dcm.1234.tmp"  # a write_durably interrupted before its rename
    leftover.write_bytes(b"half")
    extra = pydicom.dcmread(ct.paths[2])  # an instance never recorded whose file is cut short
    extra.SOPInstanceUID = generate_uid()
    truncated = store.spool_path(ct.study_uid, ct.series_uid, extra.SOPInstanceUID)
    extra.save_as(truncated, enforce_file_format=True)
    os.truncate(truncated, truncated.stat().st_size - 100)
    garbage = ct_folder / f"{generate_uid()}.dcm"
    garbage.write_bytes(b"\x00" * 300)
    misplaced = ct_folder / f"{generate_uid()}.dcm"  # a valid instance its own UIDs do not name
    shutil.copy(ct.paths[3], misplaced)

    recovery = recover_rows(store)

    after = rows(store)
    assert recovery.rebuilt == len(lost) and recovery.series == {ct.series_uid, mr.series_uid}
    assert set(after) == set(before) - removed
    for uid in lost:
        ds, path = datasets[uid]
        row = after[uid]
        assert (row["series_instance_uid"], row["study_instance_uid"], row["sop_class_uid"], row["path"]) == \
            (ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.SOPClassUID, str(path))
        assert row["calling_ae"] == "SCANNER"  # from the series row, durable since its first instance
    for uid in kept:  # what the store knew: row and file untouched
        assert dict(after[uid]) == dict(before[uid])
        assert os.stat(datasets[uid][1]) == kept_stat[uid]
    assert set(recovery.refused) == {leftover, truncated, garbage, misplaced,
                                     *(datasets[uid][1] for uid in removed)}
    assert "truncated" in recovery.refused[truncated]
    assert "temporary" in recovery.refused[leftover]
    assert "do not name" in recovery.refused[misplaced]
    assert all(p.exists() for p in recovery.refused)  # reported, never deleted
    modality = store.query("SELECT modality FROM series WHERE series_instance_uid=?", (mr.series_uid,))
    assert modality[0][0] == "MR"
    released = store.query("SELECT series_instance_uid FROM series WHERE released_at IS NOT NULL")
    assert {r[0] for r in released} == {ct.series_uid, mr.series_uid}  # their quiet period runs
    assert recover_rows(store).rebuilt == 0  # a second start finds nothing more to do


def test_kill_9_after_an_acknowledgement_then_restart_every_acknowledged_instance_is_processed(
        tmp_path: Path) -> None:
    """A real crash: the node is killed -9 the moment the sender has the 12th success status.
    The rows the crash could take (every row after the series' first, committed without an
    fsync) are deleted too, as a power loss would; the restarted node rebuilds them from the
    spool, the series completes and its results reach the PACS."""
    series = write_phantom_series(tmp_path / "ct", shape=(24, 64, 64), spacing=(3, 1.8, 1.8), objects=BODY)
    data = tmp_path / "data"
    acknowledged: list[str] = []
    with vesalius_node(tmp_path, data_dir=data) as node:
        ae = AE("SCANNER")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="VESALIUS")
        assert assoc.is_established
        killed = threading.Event()
        in_order = sorted((pydicom.dcmread(p) for p in series.paths),  # the part received is
                          key=lambda ds: float(ds.ImagePositionPatient[2]))  # one regular volume
        for ds in in_order:
            try:
                status = assoc.send_c_store(ds)
            except Exception:  # the association dies with the node
                break
            if status and status.Status == 0x0000:
                acknowledged.append(str(ds.SOPInstanceUID))
            if len(acknowledged) == 12 and not killed.is_set():
                os.killpg(node.proc.pid, signal.SIGKILL)  # right after an acknowledgement
                node.proc.wait(10)
                killed.set()
            if not assoc.is_established:
                break
        assoc.abort()
    assert killed.is_set() and 12 <= len(acknowledged) < len(series.paths)
    db = sqlite3.connect(data / "vesalius.sqlite")
    first = db.execute("SELECT MIN(received_at) FROM instances").fetchone()[0]
    with db:
        db.execute("DELETE FROM instances WHERE received_at > ?", (first,))
    assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 1
    db.close()
    with storescp(tmp_path / "pacs") as pacs, \
            vesalius_node(tmp_path, data_dir=data, destinations=[pacs.address]) as node:
        wait_for(node.delivered, 240, "the results of the recovered series at the PACS")
        assert "rebuilt" in node.log()
        got = sqlite3.connect(data / "vesalius.sqlite")
        uids = {r[0] for r in got.execute(
            "SELECT sop_instance_uid FROM instances WHERE series_instance_uid=?", (series.series_uid,))}
        got.close()
        assert set(acknowledged) <= uids  # nothing acknowledged was lost
        spool = data / "spool" / series.study_uid / series.series_uid
        assert len(uids) == len(list(spool.glob("*.dcm")))  # every file is an instance of the job
        jobs = node.jobs()
        assert [j["state"] for j in jobs] == ["done"] and jobs[0]["series_instance_uid"] == series.series_uid
