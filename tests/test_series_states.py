"""The series listing (`vesalius status`, HTTP /series) tells a processed series from one that is
only stored: 'stored' with the reason "no rule matches" (an MR under the default CT rule) or "not
chosen" (a matching series the study rule ranked lower), 'complete' for one that became a job."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pydicom

from tests.realdata import write_nifti_as_dicom_series
from tests.study_phantoms import reconstruction
from vesalius.node.config import parse_config
from vesalius.node.series import complete_due_series, select_due_studies
from vesalius.node.store import SeriesInfo, Store


def receive(store: Store, paths: list[Path], modality: str, at_time: float) -> str:
    """Store files as the listener does, received and released at the test's clock."""
    for path in paths:
        ds = pydicom.dcmread(path)
        info = SeriesInfo(str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), modality, str(ds.SOPClassUID),
                          str(ds.get("SeriesDescription", "")), "", str(ds.Manufacturer))
        store.store_instance(info, str(ds.SOPInstanceUID), path.read_bytes(), "SCANNER")
    uid = str(ds.SeriesInstanceUID)
    with store.transaction() as db:
        db.execute("UPDATE series SET first_received=?, last_received=?, released_at=? "
                   "WHERE series_instance_uid=?", (at_time, at_time, at_time, uid))
    return uid


def test_unrouted_series_are_stored_with_the_reason(
        database_url: str, shared_data: Path, tmp_path: Path) -> None:
    store = Store(tmp_path / "data", database_url)
    config = parse_config({"quiet_period": 1, "study_quiet_period": 5})  # the default study rule
    t0 = time.time()
    mr = write_nifti_as_dicom_series(shared_data / "totalseg-examples" / "example_mr_sm.nii.gz",
                                     tmp_path / "mr", modality="MR")
    study = str(pydicom.dcmread(mr[0]).StudyInstanceUID)
    thin = reconstruction(tmp_path / "thin", study, 3, 2.0, "B30f", "Chest 2.0 B30f")
    thick = reconstruction(tmp_path / "thick", study, 2, 5.0, "B30f", "Chest 5.0 B30f")
    uids = {"mr": receive(store, mr, "MR", t0), "thin": receive(store, thin.paths, "CT", t0),
            "thick": receive(store, thick.paths, "CT", t0)}

    def listed() -> dict[str, tuple[str, str | None]]:
        rows = {r["series_instance_uid"]: (r["state"], r["reason"]) for r in store.listing("series")}
        return {role: rows[uid] for role, uid in uids.items()}

    assert set(listed().values()) == {("receiving", None)}
    complete_due_series(store, config, now=t0 + 2)
    assert set(listed().values()) == {("complete", None)}  # the study rule has not chosen yet
    assert select_due_studies(store, config, now=t0 + 6) == [study]
    assert listed() == {"mr": ("stored", "no rule matches"), "thin": ("complete", None),
                        "thick": ("stored", "not chosen: another series of the study ranks higher")}
    assert [r["state"] for r in store.listing("series", study=study)].count("stored") == 2
    assert store.query("SELECT COUNT(*) FROM series WHERE state='complete'")[0][0] == 3  # as stored

    config_file = tmp_path / "vesalius.toml"  # the command finds the node's database as the node does
    config_file.write_text(f'[database]\nurl = "{database_url}"\n')
    where = ["--data-dir", str(tmp_path / "data"), "--config", str(config_file)]
    status = subprocess.run([sys.executable, "-m", "vesalius.node.cli", "status", "--json", *where],
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    rows = {r["series_instance_uid"]: r for r in json.loads(status.stdout)["series"]}
    assert (rows[uids["mr"]]["state"], rows[uids["mr"]]["reason"]) == ("stored", "no rule matches")
    text = subprocess.run([sys.executable, "-m", "vesalius.node.cli", "status", *where],
                          capture_output=True, text=True, timeout=120).stdout
    [line] = [x for x in text.splitlines() if uids["mr"] in x and " MR " in x]
    assert "stored" in line and line.endswith("no rule matches")
