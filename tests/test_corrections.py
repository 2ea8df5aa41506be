"""Corrections come back: radiologists' SEGs sent over DICOM (a pynetdicom SCU) to a running node
are recognised as corrections of its job, scored per structure, shown in /jobs, `vesalius status`
and /metrics, and become de-identified cases that `vesalius cases` lists, shows and exports. The job
is real: a chest phantom sent with DCMTK storescu and segmented by builtin_ct."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from tests.peers import NodeProcess, send_seg, storescu, vesalius_node, wait_for
from tests.phantoms import Box, Cylinder, write_phantom_series
from vesalius.dicom_out.identity import Algorithm
from vesalius.dicom_out.seg import build_seg
from vesalius.inference.evaluation import read_label_image
from vesalius.inference.models import Label
from vesalius.inference.series import load_series
from vesalius.inference.volume import Volume
from vesalius.node.cli import main
from vesalius.node.destinations.dicomweb import multipart_related
from vesalius.node.store import Store

BODY = Cylinder((0, 0, 0), (0, 0, 1), 55, 300, 40)
LUNGS = (Box((24, -5, 0), (26, 44, 60), -850), Box((-24, -5, 0), (26, 44, 60), -850))  # left, right
TRUTH = (Label(1, "body", (2, 3)), Label(2, "lung_left"), Label(3, "lung_right"))
IDENTIFIERS = ("Phantom^Test", "Phantom", "ACC0001")  # the phantom's name and accession


def _job_label_map(job_dir: Path, volume: Volume) -> np.ndarray:
    """The job's own structures as a label map (for a correction that changes nothing)."""
    image = read_label_image(job_dir / "seg.dcm")
    assert image.shape == volume.array.shape
    label_map = np.zeros(volume.array.shape, np.uint8)
    for value, name in ((1, "Body"), (2, "Left lung"), (3, "Right lung")):
        structure = next(s for s in image.structures if s.name == name)
        label_map[structure.mask()] = value
    return label_map


def _correction(volume: Volume, label_map: np.ndarray, n: int, labels=TRUTH) -> bytes:
    """A radiologist's SEG (Manufacturer not ours) of the series, as a viewer would send it."""
    seg = build_seg(volume, label_map, labels, Algorithm("radiologist", str(n)))
    seg.Manufacturer, seg.ManufacturerModelName = "3D Slicer", "5.6"
    out = io.BytesIO()
    seg.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, dict, Volume, Path]]:
    tmp = tmp_path_factory.mktemp("corrections")
    series = write_phantom_series(tmp / "ct", shape=(30, 96, 96), spacing=(2.5, 1.5, 1.5),
                                  objects=[BODY, *LUNGS], patient_id="PAT-CORR-77")
    with vesalius_node(tmp) as node:
        storescu(series.paths, node.port)
        job = wait_for(lambda: next((j for j in node.jobs() if j["state"] in ("done", "failed")), None), 180,
                       "the chest's job")
        assert job["state"] == "done", job["error"]
        yield node, job, load_series(series.paths), tmp


def _wait_correction(node: NodeProcess, series_uid: str) -> dict:
    return wait_for(lambda: next((c for c in node.get("/corrections")
                                  if c["series_instance_uid"] == series_uid), None),
                    120, f"correction {series_uid} recognised")


@pytest.fixture(scope="module")
def sent(chest) -> dict[int, str]:
    """Two corrections of the job sent: one changing nothing, one amending; their series UIDs."""
    node, job, volume, tmp = chest
    result_dir = Path(Store(node.data_dir).job(job["id"])["result_dir"])
    unchanged = _job_label_map(result_dir, volume)
    amended = unchanged.copy()
    amended[amended == 3] = 1  # the right lung deleted (its voxels stay body)
    amended[:12][amended[:12] == 2] = 1  # the left lung shortened
    sent = {}
    for n, label_map in enumerate((unchanged, amended), start=1):
        data = _correction(volume, label_map, n)
        sent[n] = str(pydicom.dcmread(io.BytesIO(data)).SeriesInstanceUID)
        send_seg(node.port, data)
    return sent


def test_corrections_are_recognised_scored_and_shown(chest, sent, capsys) -> None:
    node, job, volume, tmp = chest
    accepted = _wait_correction(node, sent[1])
    assert accepted["state"] == "recognised" and accepted["verdict"] == "accepted", accepted
    assert accepted["job_id"] == job["id"] and accepted["model_version"] == "1"
    assert {s["verdict"] for s in accepted["structures"]} == {"accepted"}
    corrected = _wait_correction(node, sent[2])
    assert corrected["verdict"] == "amended", corrected
    rows = {s["name"]: s for s in corrected["structures"]}
    assert rows["Right lung"]["verdict"] == "rejected"
    assert rows["Left lung"]["verdict"] == "amended" and 0 < rows["Left lung"]["dice"] < 1
    assert rows["Left lung"]["volume_change_ml"] < 0 and rows["Left lung"]["volume_change_pct"] < 0
    # a SEG is stored, never processed: still one job
    assert len(node.jobs()) == 1
    wait_for(lambda: sum(s["state"] == "stored" for s in node.get("/series")
                         if s["series_instance_uid"] in sent.values()) == 2, 30, "the corrections stored")
    listed = next(j for j in node.jobs() if j["id"] == job["id"])
    assert listed["correction"]["series_instance_uid"] == sent[2]
    assert listed["correction"]["verdict"] == "amended"
    assert main(["status", "--data-dir", str(node.data_dir)]) == 0
    out = capsys.readouterr().out
    assert "corrected (amended): " in out and "Right lung rejected" in out
    assert "Left lung amended (Dice" in out
    status, metrics = node.request("/metrics", token=None)
    text = metrics if isinstance(metrics, str) else json.dumps(metrics)
    assert 'vesalius_correction_dice_count{model="builtin_ct",version="1"} 6.0' in text, text
    assert ('vesalius_correction_structures_total{model="builtin_ct",verdict="rejected",version="1"} 1.0'
            in text)


def _send_and_wait(node: NodeProcess, data: bytes) -> dict:
    """Send one correction SEG and return what the node recorded of it."""
    send_seg(node.port, data)
    return _wait_correction(node, str(pydicom.dcmread(io.BytesIO(data)).SeriesInstanceUID))


def test_a_correction_of_nothing_we_did_is_kept_and_flagged(chest) -> None:
    node, job, volume, tmp = chest
    other = load_series(write_phantom_series(tmp / "other", shape=(30, 96, 96), spacing=(2.5, 1.5, 1.5),
                                             objects=[BODY, *LUNGS]).paths)
    label_map = np.zeros(other.array.shape, np.uint8)
    label_map[5:20, 30:60, 30:60] = 1
    flagged = _send_and_wait(node, _correction(other, label_map, 9, labels=(Label(1, "liver"),)))
    assert flagged["state"] == "flagged" and flagged["job_id"] is None
    assert flagged["reason"] == "references a series no job of this node finished"
    # one matching nothing of ours (a liver on the chest): flagged too
    liver = np.zeros(volume.array.shape, np.uint8)
    liver[5:20, 30:60, 30:60] = 1
    flagged = _send_and_wait(node, _correction(volume, liver, 10, labels=(Label(1, "liver"),)))
    assert flagged["state"] == "flagged" and flagged["job_id"] == job["id"]
    assert "matches none" in flagged["reason"]
    assert len(node.jobs()) == 1


def test_each_correction_is_a_deidentified_case(chest, sent, capsys, tmp_path) -> None:
    node, job, volume, tmp = chest
    cases = wait_for(lambda: (c := _cases(node, capsys)) and len(c) >= 2 and c, 120, "two cases")
    case = cases[-1]
    assert case["modality"] == "CT" and case["model"] == "builtin_ct" and case["model_version"] == "1"
    assert case["patient"].startswith("VES") and case["structures"]
    assert 0 < case["agreement"] < 1 and cases[0]["agreement"] == 1.0
    folder = Path(case["folder"])
    image = sitk.ReadImage(str(folder / "image.nii.gz"))
    label = sitk.ReadImage(str(folder / "label.nii.gz"))
    assert image.GetSize() == label.GetSize() == volume.array.shape[::-1]
    meta = json.loads((folder / "case.json").read_text())
    names = {v["name"] for v in meta["labels"].values()}
    assert names == set(case["structures"]) == {"Body", "Left lung"}  # the deleted right lung is not a label
    # the corrected label map on the source grid: the left lung's voxels as the correction has them
    left = int(next(k for k, v in meta["labels"].items() if v["name"] == "Left lung"))
    assert int((sitk.GetArrayFromImage(label) == left).sum()) > 0
    # the same pseudonym for both cases of one patient
    assert len({c["patient"] for c in cases}) == 1
    assert main(["cases", "show", str(case["id"]), "--data-dir", str(node.data_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == meta["labels"]
    assert main(["cases", "list", "--json", "--max-agreement", "0.99", "--data-dir", str(node.data_dir)]) == 0
    assert [c["id"] for c in json.loads(capsys.readouterr().out)] == [case["id"]]
    assert main(["cases", "list", "--json", "--structure", "liver", "--data-dir", str(node.data_dir)]) == 0
    assert json.loads(capsys.readouterr().out) == []
    monai = tmp_path / "monai"
    assert main(["cases", "export", "--format", "monai", "--out", str(monai), "--data-dir",
                 str(node.data_dir)]) == 0
    datalist = json.loads((monai / "datalist.json").read_text())
    assert len(datalist["training"]) == len(cases)
    assert all((monai / item["image"]).is_file() and (monai / item["label"]).is_file()
               for item in datalist["training"])
    nnunet = tmp_path / "nnunet"
    assert main(["cases", "export", "--format", "nnunet", "--out", str(nnunet), "--data-dir",
                 str(node.data_dir)]) == 0
    dataset = next(nnunet.glob("Dataset*_Vesalius"))
    spec = json.loads((dataset / "dataset.json").read_text())
    assert spec["numTraining"] == len(cases) and spec["labels"]["background"] == 0
    assert {"Body", "Left lung", "Right lung"} == set(spec["labels"]) - {"background"}
    assert len(list((dataset / "imagesTr").glob("*_0000.nii.gz"))) == len(cases)
    first = next((dataset / "labelsTr").glob("*"))
    values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(first)))))
    assert values <= set(spec["labels"].values())
    # no direct identifier in any stored or exported file of the library
    for root in (node.data_dir / "cases", monai, nnunet):
        for path in root.rglob("*"):
            if path.is_file():
                raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
                for identifier in (*IDENTIFIERS, "PAT-CORR-77", volume.study_uid, volume.series_uid):
                    assert identifier.encode() not in raw, (path, identifier)


def _cases(node: NodeProcess, capsys) -> list[dict]:
    main(["cases", "list", "--json", "--data-dir", str(node.data_dir)])
    return json.loads(capsys.readouterr().out)


def test_a_correction_sent_with_stow_rs_is_recognised_too(chest) -> None:
    node, job, volume, tmp = chest
    label_map = _job_label_map(Path(Store(node.data_dir).job(job["id"])["result_dir"]), volume)
    label_map[label_map == 2] = 1  # the left lung deleted
    data = _correction(volume, label_map, 20)
    uid = str(pydicom.dcmread(io.BytesIO(data)).SeriesInstanceUID)
    body, content_type = multipart_related([data])
    status, answer = node.request(f"/studies/{volume.study_uid}", "POST", data=body,
                                  content_type=content_type)
    assert status == 200, answer
    correction = _wait_correction(node, uid)
    assert correction["state"] == "recognised" and correction["job_id"] == job["id"]
    assert {s["name"]: s["verdict"] for s in correction["structures"]}["Left lung"] == "rejected"
    assert len(node.jobs()) == 1
