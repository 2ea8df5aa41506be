"""STOW-RS in (issue 19): POST /studies on the node's HTTP API, multipart/related of
application/dicom parts; stored with C-STORE's checks and durability and then processed;
malformed, oversized and wrongly typed bodies refused with their status, nothing stored."""

from __future__ import annotations

import http.client
import json
import sqlite3
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.peers import NodeProcess, vesalius_node, wait_for
from tests.phantoms import PhantomSeries, write_phantom_series
from tests.study_phantoms import CHEST
from vesalius.node.destinations.dicomweb import multipart_related

REFERENCED, FAILED, REASON = "00081199", "00081198", "00081197"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    with vesalius_node(tmp_path, config="max_stow_mb = 1\nmax_instance_mb = 1\n") as running:
        yield running


def series(folder: Path, slices: int = 6, size: int = 32) -> PhantomSeries:
    return write_phantom_series(folder, shape=(slices, size, size), spacing=(5.0, 6.0, 6.0), objects=CHEST)


def post(node: NodeProcess, body: bytes, content_type: str, path: str = "/studies",
         token: str | None = "") -> tuple[int, dict]:
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token or node.token()}"
    request = urllib.request.Request(f"http://127.0.0.1:{node.http_port}{path}", data=body, method="POST",
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _post_answered_early(node: NodeProcess, content_type: str, framing: tuple[str, str],
                         pieces: Iterable[bytes]) -> int:
    """POST a body piece by piece; the server may refuse by a header or by the stream, answer and
    close while the body is still being sent: its answer is read all the same (urllib would raise)."""
    connection = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=60)
    try:
        connection.putrequest("POST", "/studies")
        connection.putheader("Content-Type", content_type)
        connection.putheader("Authorization", f"Bearer {node.token()}")
        connection.putheader(*framing)
        connection.endheaders()
        try:
            for piece in pieces:
                connection.send(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return connection.getresponse().status
    finally:
        connection.close()


def post_chunked(node: NodeProcess, chunks: Sequence[bytes], content_type: str) -> int:
    """A body without Content-Length (chunked transfer coding): only the stream says its size."""
    pieces = [b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks] + [b"0\r\n\r\n"]
    return _post_answered_early(node, content_type, ("Transfer-Encoding", "chunked"), pieces)


def post_sized(node: NodeProcess, body: bytes, content_type: str) -> int:
    """A body with its Content-Length, which alone says it is too large."""
    return _post_answered_early(node, content_type, ("Content-Length", str(len(body))), [body])


def stored(node: NodeProcess) -> int:
    with sqlite3.connect(node.data_dir / "vesalius.sqlite") as db:
        return int(db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])


def nothing_left_behind(node: NodeProcess) -> bool:
    incoming = node.data_dir / "spool" / ".incoming"
    return stored(node) == 0 and not any(incoming.iterdir())


def test_a_stow_rs_upload_is_stored_and_processed(node: NodeProcess, tmp_path: Path) -> None:
    phantom = series(tmp_path / "s")
    body, content_type = multipart_related([p.read_bytes() for p in phantom.paths])
    status, answer = post(node, body, content_type, path=f"/studies/{phantom.study_uid}")
    assert status == 200, answer
    assert len(answer[REFERENCED]["Value"]) == len(phantom.paths) and FAILED not in answer
    assert stored(node) == len(phantom.paths)  # on disk and recorded before the answer came
    jobs = wait_for(lambda: (j := node.jobs()) and j[0]["state"] in ("done", "failed") and j, 240,
                    "the uploaded series to be processed")
    assert jobs[0]["state"] == "done" and jobs[0]["series_instance_uid"] == phantom.series_uid
    rows = node.get("/series")
    assert rows[0]["calling_ae"] == "STOW-RS" and rows[0]["instances"] == len(phantom.paths)
    trail = [json.loads(line) for line in (node.data_dir / "audit.jsonl").read_text().splitlines()]
    stow = [e for e in trail if "STOW-RS" in json.dumps(e)]
    assert stow and stow[-1]["user"] == "local"  # the token's name, audited


def test_a_part_that_is_not_dicom_fails_alone_with_202(node: NodeProcess, tmp_path: Path) -> None:
    phantom = series(tmp_path / "s", slices=2)
    body, content_type = multipart_related([phantom.paths[0].read_bytes(), b"not a DICOM file at all"])
    status, answer = post(node, body, content_type)
    assert status == 202, answer
    assert len(answer[REFERENCED]["Value"]) == 1
    assert answer[FAILED]["Value"][0][REASON]["Value"] == [0xC000]
    assert stored(node) == 1
    status, answer = post(node, *multipart_related([b"garbage"]))
    assert status == 409 and FAILED in answer  # nothing of it could be stored


def test_an_instance_of_another_study_than_the_path_names_is_refused(node: NodeProcess,
                                                                     tmp_path: Path) -> None:
    phantom = series(tmp_path / "s", slices=1)
    status, answer = post(node, *multipart_related([phantom.paths[0].read_bytes()]),
                          path="/studies/1.2.3.4")
    assert status == 409 and FAILED in answer
    assert nothing_left_behind(node)


def test_malformed_bodies_are_refused_with_400_and_store_nothing(node: NodeProcess, tmp_path: Path) -> None:
    data = series(tmp_path / "s", slices=1).paths[0].read_bytes()
    body, content_type = multipart_related([data])
    truncated = body[:-len(b"--\r\n") - 40]  # the closing delimiter (and the end of the part) missing
    assert post(node, truncated, content_type)[0] == 400
    assert post(node, b"no delimiter anywhere", content_type)[0] == 400
    assert post(node, body, "multipart/related; type=\"application/dicom\"")[0] == 400  # no boundary
    assert nothing_left_behind(node)


def test_oversized_bodies_are_refused_with_413_and_store_nothing(node: NodeProcess, tmp_path: Path) -> None:
    big = series(tmp_path / "big", slices=1, size=800).paths[0].read_bytes()  # 1.3 MB > max_stow_mb = 1
    body, content_type = multipart_related([big])
    assert post_sized(node, body, content_type) == 413  # Content-Length says so
    boundary = content_type.rsplit("=", 1)[1]
    assert post_chunked(node, [body[i:i + 65536] for i in range(0, len(body), 65536)],
                        f'multipart/related; type="application/dicom"; boundary={boundary}') == 413
    assert nothing_left_behind(node)


def test_wrong_media_types_are_refused_with_415_and_a_token_is_required(node: NodeProcess,
                                                                        tmp_path: Path) -> None:
    data = series(tmp_path / "s", slices=1).paths[0].read_bytes()
    body, content_type = multipart_related([data])
    assert post(node, data, "application/dicom")[0] == 415
    assert post(node, body, content_type.replace("application/dicom", "application/json", 1))[0] == 415
    assert post(node, body, content_type, token=None)[0] == 401
    assert post(node, body, content_type, token=uuid.uuid4().hex)[0] == 401
    assert nothing_left_behind(node)
