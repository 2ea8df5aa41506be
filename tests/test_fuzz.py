"""Fuzzing the listener: hundreds of mutated data sets through live associations.

The node must answer every one with a status (never hang, never drop the association), write
nothing outside its data folder (UIDs shaped like paths, NULs, oversized values), and still
receive and process a valid series afterwards.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pynetdicom._config
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.peers import NodeProcess, send_raw, storescu, vesalius_node, wait_for
from tests.phantoms import Cylinder, write_phantom_series

VALID_STATUSES = {0x0000, 0xA700, 0xA900, 0xC000, 0xC211}  # success, or a failure the standard names
SENT: list[int] = []  # statuses of the mutated instances actually sent


ROOTS: list[tuple[Path, set[Path]]] = []  # (folder around the node's data folder, its files before)


def files_beside_data(root: Path, data_dir: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and data_dir not in p.parents}


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, Path]]:
    outer = tmp_path_factory.mktemp("fuzz")
    tmp = outer / "a" / "b"  # room for ../../ to land somewhere the test can see
    tmp.mkdir(parents=True)
    phantom = write_phantom_series(tmp / "seed", shape=(2, 32, 32), spacing=(2, 2, 2),
                                   objects=[Cylinder((0, 0, 0), (0, 0, 1), 20, 10, 40)])
    with vesalius_node(tmp, config='[[rules]]\nname = "none"\nmodality = ["NONE"]\n') as node:
        ROOTS.append((outer, files_beside_data(outer, node.data_dir)))
        yield node, phantom.paths[0]


UID_KEYWORDS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]
OTHER_KEYWORDS = ["Rows", "Columns", "BitsAllocated", "PixelData", "ImagePositionPatient", "Modality",
                  "PatientName", "SamplesPerPixel", "ImageOrientationPatient", "PixelSpacing"]

LATIN1 = st.characters(min_codepoint=32, max_codepoint=255)
PATH_PARTS = st.sampled_from(["..", ".", "/", "", "x", "1.2", "\x00", "~", "\\", "..\\", "/tmp", "%2e%2e"])
PATH_LIKE = st.lists(PATH_PARTS, min_size=1, max_size=8).map("/".join)
OVERSIZED = st.from_regex(r"[0-9.]{65,200}", fullmatch=True)
mutation = st.one_of(
    st.tuples(st.just("delete"), st.sampled_from(UID_KEYWORDS + OTHER_KEYWORDS)),
    st.tuples(st.just("uid"), st.sampled_from(UID_KEYWORDS),
              st.one_of(st.just(""), st.text(LATIN1, max_size=80),
                        st.from_regex(r"[0-9.]{1,70}", fullmatch=True), PATH_LIKE, OVERSIZED)),
    st.tuples(st.just("number"), st.sampled_from(["Rows", "Columns", "BitsAllocated", "SamplesPerPixel"]),
              st.integers(0, 65535)),
    st.tuples(st.just("truncate"), st.integers(0, 4000)),
    st.tuples(st.just("flip"), st.integers(0, 4000), st.integers(1, 255)),
)


def mutate(seed: Path, change: tuple, out: Path) -> None:
    kind = change[0]
    if kind in ("truncate", "flip"):
        raw = bytearray(seed.read_bytes())
        start = 132 + 200  # keep the preamble and file meta readable so the bytes get sent
        at = start + change[1] % (len(raw) - start)
        if kind == "truncate":
            raw = raw[:at]
        else:
            raw[at] ^= change[2]
        out.write_bytes(bytes(raw))
        return
    ds = pydicom.dcmread(seed)
    if kind == "delete":
        if change[1] in ds:
            delattr(ds, change[1])
    elif kind == "uid":
        setattr(ds, change[1], change[2])
    else:
        setattr(ds, change[1], change[2])
    ds.save_as(out, enforce_file_format=False)


@settings(max_examples=220, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(mutation, min_size=1, max_size=3))
def test_every_mutated_instance_gets_an_answer(fuzz_node: tuple[NodeProcess, Path], changes: list,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    node, seed = fuzz_node
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.dcm"
        path.write_bytes(seed.read_bytes())
        try:
            for change in changes:
                mutate(path, change, path)
            pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID  # noqa: B018
        except Exception:
            return  # pydicom cannot write or read this mutation: no sender could send it
        SENT.append(send_raw(node.port, path, "FUZZER"))
        assert SENT[-1] in VALID_STATUSES


def test_node_still_processes_after_fuzzing(fuzz_node: tuple[NodeProcess, Path], tmp_path: Path) -> None:
    node, _ = fuzz_node
    outer, before = ROOTS[-1]
    written = {p for p in files_beside_data(outer, node.data_dir) - before
               if not p.name.startswith("node-")}  # the node's own log and config
    assert written == set(), f"files written outside the data folder: {sorted(written)[:5]}"
    spool = node.data_dir / "spool"
    assert all(p.resolve().is_relative_to(spool) for p in spool.rglob("*"))
    assert len(SENT) >= 200, f"only {len(SENT)} mutated instances were sent"
    assert {0x0000, 0xC000} <= set(SENT)  # the mutations reached both the accepted and refused paths
    phantom = write_phantom_series(tmp_path / "after", shape=(4, 32, 32), spacing=(2, 2, 2),
                                   objects=[Cylinder((0, 0, 0), (0, 0, 1), 20, 10, 40)])
    storescu(phantom.paths, node.port)
    wait_for(lambda: any(s["series_instance_uid"] == phantom.series_uid and s["state"] == "stored"
                         and s["instances"] == 4 for s in node.get("/series")), 20, "the valid series")
