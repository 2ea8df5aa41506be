"""Evaluating a job of a running node: ``POST /jobs/{id}/evaluate`` with the reference SEG in the
request or held in the spool, the figures in ``/jobs`` and ``vesalius status``; ``vesalius evaluate
--job``. The job is real: a chest phantom sent with DCMTK storescu and segmented by builtin_ct."""

from __future__ import annotations

import http.client
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.peers import NodeProcess, storescu, vesalius_node, wait_for
from tests.phantoms import Box, Cylinder, write_phantom_series
from vesalius.dicom_out.identity import Algorithm
from vesalius.dicom_out.seg import build_seg
from vesalius.inference.models import Label
from vesalius.inference.series import load_series
from vesalius.inference.volume import Volume
from vesalius.node.api.evaluate import MAX_REFERENCE_BYTES
from vesalius.node.cli import main

BODY = Cylinder((0, 0, 0), (0, 0, 1), 55, 300, 40)
LUNGS = (Box((24, -5, 0), (26, 44, 60), -850), Box((-24, -5, 0), (26, 44, 60), -850))  # left, right
TRUTH = (Label(1, "body", (2, 3)), Label(2, "lung_left"), Label(3, "lung_right"))


def _truth(volume: Volume) -> np.ndarray:
    index = np.indices(volume.array.shape).reshape(3, -1).T
    points = (index @ volume.affine[:3, :3].T + volume.affine[:3, 3]).reshape((*volume.array.shape, 3))
    label_map = np.zeros(volume.array.shape, np.uint8)
    for value, shape in enumerate((BODY, *LUNGS), start=1):
        label_map[shape.inside(points)] = value
    return label_map


def _seg_bytes(volume: Volume, label_map: np.ndarray) -> tuple[bytes, pydicom.Dataset]:
    seg = build_seg(volume, label_map, TRUTH, Algorithm("radiologist", "1"))
    out = io.BytesIO()
    seg.save_as(out, enforce_file_format=True)
    return out.getvalue(), seg


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, int, Volume, Path]]:
    tmp = tmp_path_factory.mktemp("evaluate-node")
    series = write_phantom_series(tmp / "ct", shape=(30, 96, 96), spacing=(2.5, 1.5, 1.5),
                                  objects=[BODY, *LUNGS])
    with vesalius_node(tmp) as node:
        storescu(series.paths, node.port)
        job = wait_for(lambda: next((j for j in node.jobs() if j["state"] in ("done", "failed")), None), 180,
                       "the chest's job")
        assert job["state"] == "done", job["error"]
        yield node, job["id"], load_series(series.paths), tmp


def test_post_evaluate_stores_the_figures_with_the_job(finished) -> None:
    node, job_id, volume, _ = finished
    reference, seg = _seg_bytes(volume, _truth(volume))
    status, body = node.request(f"/jobs/{job_id}/evaluate", "POST", data=reference,
                                content_type="application/dicom", timeout=120)
    assert status == 200, body
    rows = {row["name"]: row for row in body["figures"]["structures"]}
    assert set(rows) == {"Body", "Left lung", "Right lung"}
    assert all(row["matched_by"] == "concept" and row["dice"] > 0.9 for row in rows.values()), rows
    assert body["figures"]["resampled"] is False and body["figures"]["pred"] == f"job {job_id}"
    assert body["reference"] == f"SEG {seg.SOPInstanceUID} sent with the request"
    assert body["figures"]["unmatched_ref"] == []
    job = next(j for j in node.jobs() if j["id"] == job_id)
    assert job["evaluation"]["id"] == body["id"] and job["evaluation"]["figures"] == body["figures"]
    assert job["evaluation"]["evaluated_at"] == body["evaluated_at"]
    in_study = node.get(f"/jobs?study={volume.study_uid}")
    assert [j["evaluation"]["id"] for j in in_study if j["id"] == job_id] == [body["id"]]
    assert not list((node.data_dir / ".evaluate-incoming").iterdir())  # the upload is not kept


def test_a_seg_series_in_the_spool_is_a_reference_and_refusals_say_why(finished) -> None:
    node, job_id, volume, tmp = finished
    reference, seg = _seg_bytes(volume, _truth(volume))
    (tmp / "reference.dcm").write_bytes(reference)
    storescu([tmp / "reference.dcm"], node.port, extra=["-R"])  # stored, never processed
    uid = str(seg.SeriesInstanceUID)
    wait_for(lambda: any(s["series_instance_uid"] == uid and s["state"] == "stored"
                         for s in node.get("/series")), 30, "the reference SEG stored")

    def post(payload: object, token: str | None = "") -> tuple[int, object]:
        return node.request(f"/jobs/{job_id}/evaluate", "POST", token=token,
                            data=json.dumps(payload).encode(), content_type="application/json", timeout=120)

    status, body = post({"reference_series_uid": uid})
    assert status == 200, body
    assert body["reference"] == f"SEG series {uid}"
    assert {r["name"] for r in body["figures"]["structures"]} == {"Body", "Left lung", "Right lung"}
    assert post({"reference_series_uid": "../../etc/passwd"})[0] == 400
    assert post({"reference_series_uid": "1.2.3.4.5.999"})[0] == 404
    assert post({"reference_series_uid": volume.series_uid})[0] == 422  # the CT itself is no SEG
    assert post({"reference_series_uid": uid}, token=None)[0] == 401
    assert node.request(f"/jobs/{job_id}/evaluate", "POST", data=b"x", content_type="text/plain")[0] == 415
    assert node.request(f"/jobs/{job_id}/evaluate", "POST", data=b"not DICOM at all",
                        content_type="application/dicom")[0] == 415
    assert node.request(f"/jobs/{job_id}/evaluate", "POST", data=b"",
                        content_type="application/dicom")[0] == 400
    assert node.request("/jobs/999999/evaluate", "POST", data=reference,
                        content_type="application/dicom")[0] == 404
    connection = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=10)
    connection.putrequest("POST", f"/jobs/{job_id}/evaluate")  # a body declared too large is never read
    for name, value in (("Authorization", f"Bearer {node.token()}"), ("Content-Type", "application/dicom"),
                        ("Content-Length", str(MAX_REFERENCE_BYTES + 1))):
        connection.putheader(name, value)
    connection.endheaders()
    assert connection.getresponse().status == 413
    connection.close()
    other = load_series(write_phantom_series(tmp / "other", shape=(30, 96, 96), spacing=(2.5, 1.5, 1.5),
                                             objects=[BODY, *LUNGS]).paths)
    status, body = node.request(f"/jobs/{job_id}/evaluate", "POST", data=_seg_bytes(other, _truth(other))[0],
                                content_type="application/dicom", timeout=120)
    assert status == 422 and "different frames of reference: job " in body["error"]
    assert "sent with the request in" in body["error"] and "reference-" not in body["error"]
    actions = [e for e in map(json.loads, (node.data_dir / "audit.jsonl").read_text().splitlines())
               if e["event"] == "Operator Action" and e["details"].get("command") == "evaluate"]
    statuses = [e["details"]["status"] for e in actions]
    assert statuses.count(200) >= 2 and {400, 404, 415, 422, 413} <= set(statuses)
    assert all(e["user"] == "local" and e["details"]["via"] == "http" for e in actions)
    assert uid in {e["details"]["reference_series_uid"] for e in actions}


def test_vesalius_evaluate_job_and_status_show_the_figures(finished, capsys) -> None:
    node, job_id, volume, tmp = finished
    truth = _truth(volume)
    truth[truth == 3] = 1  # a reference without the right lung
    reference = tmp / "no-right-lung.dcm"
    reference.write_bytes(_seg_bytes(volume, truth)[0])
    assert main(["evaluate", "--job", str(job_id), str(reference), "--data-dir", str(node.data_dir),
                 "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in figures["structures"]} == {"Body", "Left lung"}
    assert "Right lung" in figures["unmatched_pred"]
    job = next(j for j in node.jobs() if j["id"] == job_id)
    assert job["evaluation"]["reference"] == "no-right-lung.dcm" and job["evaluation"]["figures"] == figures
    assert main(["status", "--data-dir", str(node.data_dir)]) == 0
    status = capsys.readouterr().out
    assert "evaluated against no-right-lung.dcm" in status
    assert re.search(r"Left lung Dice [01]\.\d{3} HD95 \d+\.\d mm", status)
    assert main(["evaluate", "--job", "999999", str(reference), "--data-dir", str(node.data_dir)]) == 1
    assert "no job 999999" in capsys.readouterr().err
    assert main(["evaluate", "--job", str(job_id), str(reference), str(reference),
                 "--data-dir", str(node.data_dir)]) == 2
    assert main(["evaluate", "--job", str(job_id), str(reference), "--data-dir", str(tmp / "ct")]) == 2
    assert "no Vesalius database" in capsys.readouterr().err
