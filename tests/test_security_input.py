"""Input can never escape: UIDs shaped like paths, NULs or oversized values, over live associations.

Each is refused (0xC000) and nothing is written outside the node's data folder (asserted on the
file system); irregular but harmless UIDs (leading zeros) are stored under a hashed name with the
real UID in the database; the node keeps serving throughout.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pynetdicom._config
import pytest
from pydicom.uid import CTImageStorage, generate_uid

from tests.peers import NodeProcess, send_raw, storescu, vesalius_node, wait_for
from tests.phantoms import Cylinder, write_phantom_series
from vesalius.node.paths import UnsafePath, inside, safe_name, uid_file_name

UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
ESCAPE_MARK = f"vesalius-escape-{uuid.uuid4().hex[:8]}"
HOSTILE = {
    "dotdot": "..",
    "up-two": f"../../{ESCAPE_MARK}",
    "absolute": f"/tmp/{ESCAPE_MARK}",
    "nul": "1.2.3\x00/../../x",
    "too-long": "1." * 32 + "1",  # 65 characters, digits and dots
    "dots-only": "...",
}
NO_JOBS = '[[rules]]\nname = "none"\nmodality = ["NONE"]\n'


@pytest.fixture(scope="module")
def node_and_seed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, Path, Path]]:
    tmp = tmp_path_factory.mktemp("input")
    seed = write_phantom_series(tmp / "seed", shape=(2, 16, 16), spacing=(2, 2, 2),
                                objects=[Cylinder((0, 0, 0), (0, 0, 1), 10, 10, 40)]).paths[0]
    with vesalius_node(tmp, config=NO_JOBS) as node:
        yield node, seed, tmp


def files_outside(root: Path, data_dir: Path) -> set[Path]:
    """Every file under ``root`` that is not in the node's data folder."""
    return {p for p in root.rglob("*") if p.is_file() and data_dir not in p.parents}


def with_uid(seed: Path, keyword: str, value: str, out: Path) -> Path:
    ds = pydicom.dcmread(seed)
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for other in UIDS:  # fresh UIDs, so every case is a new instance
        if other != keyword:
            setattr(ds, other, generate_uid())
    setattr(ds, keyword, value)
    ds.save_as(out, enforce_file_format=False)
    return out


@pytest.mark.parametrize("keyword", UIDS)
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_uid_is_refused_and_nothing_escapes(node_and_seed: tuple[NodeProcess, Path, Path],
                                                    keyword: str, case: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    node, seed, tmp = node_and_seed
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    source = with_uid(seed, keyword, HOSTILE[case], tmp / f"{case}-{keyword}.dcm")
    before = files_outside(tmp, node.data_dir)
    spool_before = {p for p in (node.data_dir / "spool").rglob("*") if p.is_file()}
    assert send_raw(node.port, source, "HOSTILE") == 0xC000
    assert files_outside(tmp, node.data_dir) - before == set()  # nothing written beside the data folder
    assert not Path(f"/tmp/{ESCAPE_MARK}").exists()
    assert not (tmp.parent / ESCAPE_MARK).exists() and not (tmp.parent.parent / ESCAPE_MARK).exists()
    assert {p for p in (node.data_dir / "spool").rglob("*") if p.is_file()} == spool_before
    assert "refused instance from HOSTILE" in node.log()
    assert HOSTILE[case] not in node.log()  # the value itself is not logged


def test_irregular_uids_are_stored_under_hashed_names(node_and_seed: tuple[NodeProcess, Path, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Leading zeros break PS3.5 but are common from older modalities: accepted, named by a hash."""
    node, seed, tmp = node_and_seed
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    ds = pydicom.dcmread(seed)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = "1.2.03.4", "1.2.03.5", "1.2.03.6 "
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp / "irregular.dcm", enforce_file_format=False)
    assert send_raw(node.port, tmp / "irregular.dcm", "HOSTILE") == 0x0000
    db = sqlite3.connect(node.data_dir / "vesalius.sqlite")
    (path, series), = db.execute("SELECT path, series_instance_uid FROM instances "
                                 "WHERE sop_instance_uid='1.2.03.6'").fetchall()
    assert series == "1.2.03.5"  # the real UID in the database
    stored = Path(path)
    assert stored.is_file() and (node.data_dir / "spool") in stored.parents
    assert stored.relative_to(node.data_dir / "spool").parts == (
        uid_file_name("1.2.03.4"), uid_file_name("1.2.03.5"), f"{uid_file_name('1.2.03.6')}.dcm")
    assert "03" not in stored.name  # a hash, not the UID
    assert pydicom.dcmread(stored).SOPInstanceUID == "1.2.03.6"


def test_node_still_serves_after_hostile_uids(node_and_seed: tuple[NodeProcess, Path, Path]) -> None:
    node, _, tmp = node_and_seed
    phantom = write_phantom_series(tmp / "after", shape=(3, 16, 16), spacing=(2, 2, 2),
                                   objects=[Cylinder((0, 0, 0), (0, 0, 1), 10, 10, 40)])
    storescu(phantom.paths, node.port)
    wait_for(lambda: any(s["series_instance_uid"] == phantom.series_uid and s["instances"] == 3
                         for s in node.get("/series")), 20, "the valid series")
    # valid UIDs keep their readable spool layout
    assert (node.data_dir / "spool" / phantom.study_uid / phantom.series_uid).is_dir()


def test_old_spool_rows_keep_working(tmp_path: Path) -> None:
    """The database stores each instance's path: rows written under an earlier layout still resolve."""
    from vesalius.node.store import SeriesInfo, Store

    store = Store(tmp_path / "data")
    old = tmp_path / "data" / "spool" / "legacy-layout" / "1.2.3.dcm"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"DICM")
    info = SeriesInfo("1.2.9", "1.2.8", "CT", CTImageStorage, "", "", "")
    store.store_instance(info, "1.2.7", b"DICM", "CT1")
    with store.transaction() as db:
        db.execute("UPDATE instances SET path=? WHERE sop_instance_uid='1.2.7'", (str(old),))
    assert store.series_paths("1.2.9") == [old]


@pytest.mark.parametrize("part", ["..", "../x", "/etc/passwd", "a/../../b", "", "x\x00y", "."])
def test_inside_refuses_escaping_components(tmp_path: Path, part: str) -> None:
    with pytest.raises(UnsafePath):
        inside(tmp_path, "ok", part)


def test_inside_refuses_a_symlink_out(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePath):
        inside(tmp_path / "root", "link", "x")


@pytest.mark.parametrize("name", ["..", "../../etc/x", "/abs", "a b", ".hidden", "x" * 300, "a/b", "é"])
def test_safe_name_is_one_plain_component(tmp_path: Path, name: str) -> None:
    safe = safe_name(name)
    assert "/" not in safe and not safe.startswith(".") and len(safe) <= 100
    assert inside(tmp_path, safe).parent == tmp_path.resolve()
    assert safe_name("lung_left") == "lung_left"
    assert safe_name(name) != safe_name(name + "!")  # different names stay different
