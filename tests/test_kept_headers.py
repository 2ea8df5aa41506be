"""Series completion reads the headers ingest kept, and the files for any it did not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from tests.study_phantoms import ct_study
from tests.test_selection import row_of
from tests.test_volume import write_enhanced
from vesalius.node import ingest, kept_headers
from vesalius.node.series import read_facts
from vesalius.node.store import Store


@pytest.fixture(scope="module")
def exam(tmp_path_factory: pytest.TempPathFactory):
    return ct_study(tmp_path_factory.mktemp("exam"))


def ingested(store: Store, paths: list[Path]) -> list[Path]:
    """Store files the way STOW-RS and pulls do (ingest.store_file); their paths in the spool."""
    for path in paths:
        incoming = store.incoming_dir / path.name
        store.incoming_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, incoming)
        assert ingest.store_file(store, incoming, "TEST").status == ingest.SUCCESS
    uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    return store.series_paths(uid)


@pytest.mark.parametrize("name", ["thin", "coronal", "localizer+thick"])
def test_facts_from_kept_headers_equal_those_read_from_the_files(exam, tmp_path: Path, name: str) -> None:
    phantoms = [exam.series[part] for part in name.split("+")]
    sources = [path for phantom in phantoms for path in phantom.paths]
    row = row_of(phantoms[-1])
    from_files = read_facts(sources, row)
    store = Store(tmp_path / "node")
    spooled = [p for phantom in phantoms for p in ingested(store, phantom.paths)]
    for path in spooled:  # the files can no longer tell: whatever completion finds was kept
        path.write_bytes(b"")
    assert read_facts(spooled, row) == from_files
    assert from_files.slices > 0
    # taken once: completed again (a late instance reopened it), the series' files are read
    assert read_facts(spooled, row).slices == 0


def test_enhanced_multiframe_headers_are_read_from_the_file(exam, tmp_path: Path) -> None:
    enhanced = write_enhanced(exam.series["thick"].paths, tmp_path / "enhanced.dcm")
    store = Store(tmp_path / "node")
    [spooled] = ingested(store, [enhanced])
    facts = read_facts([spooled], row_of(exam.series["thick"]))
    assert (facts.orientation, facts.slices, facts.slice_thickness) == ("axial", 26, 5.0)


def test_the_oldest_headers_are_dropped_beyond_the_limit(exam, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kept_headers, "KEPT_HEADERS", 3)
    store = Store(tmp_path / "node")
    sources = exam.series["thin"].paths[:5]
    ingested(store, sources)
    in_order = []  # the spool paths in the order they were stored
    for source in sources:
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        in_order.append(store.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
    assert [kept_headers.take(path) is not None for path in in_order] == [False, False, True, True, True]


def test_the_listener_keeps_the_headers_it_checked(exam, tmp_path: Path) -> None:
    """Sent over DICOM (DCMTK storescu): completion finds the facts with the spool files emptied."""
    from tests.conftest import free_port
    from tests.peers import storescu
    from vesalius.node.config import Config
    from vesalius.node.receive import Receiver, build_ae
    from vesalius.node.service import open_store

    config = Config(host="127.0.0.1", data_dir=tmp_path / "data")
    store = open_store(config)
    ae, handlers = build_ae(config, Receiver(store, node_name="test"))
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        phantom = exam.series["thin"]
        storescu(phantom.paths, port)
    finally:
        server.shutdown()
    spooled = store.series_paths(phantom.series_uid)
    assert len(spooled) == len(phantom.paths)
    for path in spooled:
        path.write_bytes(b"")
    assert read_facts(spooled, row_of(phantom)) == read_facts(phantom.paths, row_of(phantom))
