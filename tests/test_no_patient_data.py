"""No patient data in anything the node prints.

A chest phantom carrying distinctive Patient Name (one component, so highdicom warns about it),
Patient ID, Birth Date, Accession Number and Other Patient IDs goes through `vesalius serve`
(receive, job, delivery to a PACS that is down at first, so it is retried, then `vesalius retry`),
`vesalius process`, `vesalius status` (text and JSON) and the HTTP listings: none of those values
appears in any log, stdout, stderr or JSON answer.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom

from tests.conftest import free_port
from tests.peers import storescp, storescu, vesalius_node, wait_for
from tests.phantoms import Cylinder, write_phantom_series

PHI = {
    "PatientName": "QXJZPATIENTNAME",  # no "^": highdicom's person-name warning quotes it
    "PatientID": "PIDZQ81726",
    "PatientBirthDate": "19230417",
    "AccessionNumber": "ACCZQ5512",
    "OtherPatientIDs": "OPIDZQ9934",
}
CHEST = [Cylinder((0, 0, 0), (0, 0, 1), 45, 60, 40), Cylinder((22, -3, 3), (0, 0, 1), 14, 40, -850),
         Cylinder((-22, -3, 3), (0, 0, 1), 15, 40, -850), Cylinder((0, 28, 0), (0, 0, 1), 8, 50, 700)]


def leaked(text: str) -> list[str]:
    return [value for value in PHI.values() if value.lower() in text.lower()]


def cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "vesalius.node.cli", *args], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def test_no_patient_data_in_logs_outputs_or_answers(tmp_path: Path) -> None:
    phantom = write_phantom_series(tmp_path / "series", shape=(24, 64, 64), spacing=(2.5, 2.0, 2.0),
                                   objects=CHEST)
    for path in phantom.paths:
        ds = pydicom.dcmread(path)
        for keyword, value in PHI.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)
    pacs_port = free_port()
    config = "[retry]\nbase_delay = 0.2\nmax_delay = 0.5\nmax_attempts = 200\n"
    seen: list[str] = []
    with vesalius_node(tmp_path, destinations=[f"PACS@127.0.0.1:{pacs_port}"], config=config) as node:
        storescu(phantom.paths, node.port)
        wait_for(lambda: any(d["attempts"] >= 1 for d in node.deliveries()), 300,
                 "a failed first delivery (the PACS is down)")
        with storescp(tmp_path / "pacs", port=pacs_port) as pacs:
            wait_for(lambda: node.delivered(1), 120, "the retried delivery")
            job = node.jobs()[0]["id"]
            seen.append(cli("retry", str(job), "--data-dir", str(node.data_dir)))
            wait_for(lambda: node.jobs()[0]["state"] == "done" and node.jobs()[0]["attempts"] == 1
                     and node.delivered(1), 300, "the job run again and delivered")
            assert pacs.files(), "nothing reached the PACS"
        for listing in ("/series", "/jobs", "/deliveries", "/metrics", "/healthz"):
            seen.append(str(node.get(listing)))
        seen.append(cli("status", "--data-dir", str(node.data_dir)))
        seen.append(cli("status", "--json", "--data-dir", str(node.data_dir)))
        seen.append(node.log())
    seen.append(cli("process", str(tmp_path / "series"), "--out", str(tmp_path / "out")))
    assert (tmp_path / "out" / "seg.dcm").is_file()
    assert "unlikely to represent the intended person name" in "".join(seen)  # the warning came, redacted
    for text in seen:
        assert leaked(text) == [], f"patient data in: {text[:2000]}"
