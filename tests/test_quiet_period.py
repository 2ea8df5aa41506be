"""Series completion: at once after the one association that sent a series ended with a normal
release; after quiet_period otherwise (aborted, several associations, a sender known to spread
series over several); stability_timeout while instances keep arriving."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.peers import vesalius_node, wait_for
from tests.phantoms import Sphere, write_phantom_series
from vesalius.node.config import parse_config
from vesalius.node.series import complete_due_series
from vesalius.node.store import SeriesInfo, Store

NO_JOBS = '[[rules]]\nname = "none"\nmodality = ["NO_SUCH_MODALITY"]\n'
CONFIG = {"quiet_period": 5, "stability_timeout": 60, "rules": [{"name": "none", "modality": ["NONE"]}]}


def _series(tmp: Path, name: str, n: int = 2) -> list[Path]:
    return write_phantom_series(tmp / name, shape=(n, 16, 16), spacing=(2, 2, 2),
                                objects=[Sphere((0, 0, 0), 6, 300)]).paths


def _store(store: Store, paths: list[Path], calling_ae: str = "SCANNER") -> str:
    for path in paths:
        ds = pydicom.dcmread(path)
        info = SeriesInfo(str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), "CT", str(ds.SOPClassUID),
                          "", "", "")
        store.store_instance(info, str(ds.SOPInstanceUID), path.read_bytes(), calling_ae)
    return str(ds.SeriesInstanceUID)


def _received_at(store: Store, uid: str) -> float:
    return float(store.query("SELECT last_received FROM series WHERE series_instance_uid=?", (uid,))[0][0])


def _ended_at(store: Store, uid: str) -> float:
    return float(store.query("SELECT released_at FROM series WHERE series_instance_uid=?", (uid,))[0][0])


def test_one_released_association_completes_at_once(database_url: str, tmp_path: Path) -> None:
    store, config = Store(tmp_path / "data", database_url), parse_config(CONFIG)
    uid = _store(store, _series(tmp_path, "a"))
    store.mark_released([uid], normally=[uid])
    assert complete_due_series(store, config, now=_received_at(store, uid)) == [uid]


def test_aborted_association_waits_the_quiet_period(database_url: str, tmp_path: Path) -> None:
    store, config = Store(tmp_path / "data", database_url), parse_config(CONFIG)
    uid = _store(store, _series(tmp_path, "a"))
    store.mark_released([uid])  # aborted, dropped, or another association was still sending it
    ended = _ended_at(store, uid)
    assert complete_due_series(store, config, now=ended + 1) == []
    assert complete_due_series(store, config, now=ended + 5) == [uid]


def test_a_series_over_several_associations_waits_and_so_does_its_sender_afterwards(
        database_url: str, tmp_path: Path) -> None:
    store, config = Store(tmp_path / "data", database_url), parse_config(CONFIG)
    first, second = _series(tmp_path, "a", n=3), _series(tmp_path, "b")
    uid = _store(store, first[:1], "MULTI")
    store.mark_released([uid], normally=[uid])
    assert complete_due_series(store, config, now=_received_at(store, uid)) == [uid]
    uid = _store(store, first[1:], "MULTI")  # reopens the series: a second association
    store.mark_released([uid], normally=[uid])
    assert complete_due_series(store, config, now=_received_at(store, uid) + 1) == []
    other = _store(store, second, "MULTI")  # the same sender's next series is not trusted either
    store.mark_released([other], normally=[other])
    assert complete_due_series(store, config, now=_received_at(store, other) + 1) == []
    assert set(complete_due_series(store, config, now=_ended_at(store, other) + 5)) == {uid, other}
    fresh = _store(store, _series(tmp_path, "c"), "SINGLE")  # other senders keep the fast path
    store.mark_released([fresh], normally=[fresh])
    assert complete_due_series(store, config, now=_received_at(store, fresh)) == [fresh]


def test_complete_on_release_off_keeps_the_quiet_period(database_url: str, tmp_path: Path) -> None:
    store = Store(tmp_path / "data", database_url)
    config = parse_config({**CONFIG, "complete_on_release": False})
    uid = _store(store, _series(tmp_path, "a"))
    store.mark_released([uid], normally=[uid])
    assert complete_due_series(store, config, now=_ended_at(store, uid) + 1) == []
    assert complete_due_series(store, config, now=_ended_at(store, uid) + 5) == [uid]


def _send(port: int, paths: list[Path], calling: str, release: bool) -> None:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="VESALIUS")
    assert assoc.is_established
    for path in paths:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
    if release:
        assoc.release()
    else:
        assoc.abort()


def test_the_listener_tells_a_release_from_an_abort(tmp_path: Path) -> None:
    with vesalius_node(tmp_path, config="stability_timeout = 60\n" + NO_JOBS) as node:
        _send(node.port, _series(tmp_path, "r"), "RELEASER", release=True)
        _send(node.port, _series(tmp_path, "x"), "ABORTER", release=False)
        wait_for(lambda: "association from RELEASER at 127.0.0.1 released; 1 series" in node.log()
                 and "association from ABORTER at 127.0.0.1 ended without release; 1 series" in node.log(),
                 15, "both associations to end")
        rows = {row["calling_ae"]: row for row in node.get("/series")}
        wait_for(lambda: {r["calling_ae"]: r["state"] for r in node.get("/series")}
                 == {"RELEASER": "stored", "ABORTER": "stored"}, 15, "both series complete")
        assert set(rows) == {"RELEASER", "ABORTER"}
    store = Store(node.data_dir)
    flags = {r["calling_ae"]: (r["associations"], r["released_normally"])
             for r in store.query("SELECT calling_ae, associations, released_normally FROM series")}
    assert flags == {"RELEASER": (1, 1), "ABORTER": (1, 0)}
