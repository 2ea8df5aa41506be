"""The audit trail of a running node: a real association, job, delivery, operator actions and the
start, in the append-only table and in audit.jsonl; `vesalius audit`; no patient data."""

from __future__ import annotations

import getpass
import hashlib
import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.peers import NodeProcess, StoreSCP, storescp, storescu, vesalius_node, wait_for
from tests.phantoms import PhantomSeries, Sphere, write_phantom_series
from vesalius.node.cli import parse_since
from vesalius.node.config import ConfigError, config_digest, load_config

PATIENT_NAME = "Zyxwvutsr^Qponmlk"
PATIENT_ID = "PID-86753091"
BIRTH_DATE = "19231107"
ACCESSION = "ACC-55501234"


@dataclass
class Trail:
    node: NodeProcess
    pacs: StoreSCP
    phantom: PhantomSeries
    config_path: Path

    def events(self) -> list[dict]:
        return [json.loads(line) for line in (self.node.data_dir / "audit.jsonl").read_text().splitlines()]

    def table(self) -> list[dict]:
        with sqlite3.connect(self.node.data_dir / "vesalius.sqlite") as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM audit ORDER BY id")]


def vesalius(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vesalius.node.cli", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trail]:
    tmp = tmp_path_factory.mktemp("audit")
    phantom = write_phantom_series(tmp / "series", shape=(12, 40, 40), spacing=(2.5, 2.0, 2.0),
                                   objects=[Sphere((0, 0, 0), 20, 300)], patient_id=PATIENT_ID)
    for path in phantom.paths:  # distinctive patient data that must appear nowhere in the audit
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientBirthDate, ds.AccessionNumber = PATIENT_NAME, BIRTH_DATE, ACCESSION
        ds.save_as(path)
    with storescp(tmp / "pacs") as pacs:
        config = 'allowed_calling_aes = ["SCANNER"]\n[retry]\nbase_delay = 1.0\n'
        with vesalius_node(tmp, destinations=[pacs.address], config=config) as node:
            storescu(phantom.paths, node.port)
            wait_for(lambda: node.delivered(1), 120, "the delivery to storescp")
            yield Trail(node, pacs, phantom, next(tmp.glob("node-*.toml")))


def of(events: list[dict], name: str) -> list[dict]:
    return [e for e in events if e["event"] == name]


def test_start_is_audited_with_the_configuration_digest(trail: Trail) -> None:
    start = of(trail.events(), "Application Activity")[0]
    assert start["event_type"] == "Application Start" and start["outcome"] == 0
    assert start["user"] == "VESALIUS"
    assert len(start["details"]["config_sha256"]) == 64
    assert start["details"]["http"] == f"127.0.0.1:{trail.node.http_port}"
    # the digest is of the effective configuration: the same file gives the same digest,
    config = load_config(trail.config_path)
    assert config_digest(config) == config_digest(load_config(trail.config_path))
    assert config_digest(config) != config_digest(load_config(None))  # a different one another


def test_association_is_audited_with_calling_ae_address_and_instances(trail: Trail) -> None:
    received = [e for e in of(trail.events(), "DICOM Instances Transferred")
                if e["details"]["direction"] == "received"]
    assert len(received) == 1
    event = received[0]
    assert (event["user"], event["outcome"], event["action"]) == ("SCANNER", 0, "C")
    assert event["address"].startswith("127.0.0.1:")
    assert event["details"]["instances"] == len(trail.phantom.paths) and event["details"]["refused"] == 0
    assert event["details"]["studies"] == [trail.phantom.study_uid]
    assert event["details"]["called_ae"] == "VESALIUS"


def test_rejected_association_is_a_security_alert(trail: Trail) -> None:
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", trail.node.port, ae_title="VESALIUS")
    assert assoc.is_rejected
    alert = wait_for(lambda: of(trail.events(), "Security Alert"), 10, "the Security Alert event")[0]
    assert (alert["user"], alert["outcome"], alert["event_type"]) == ("INTRUDER", 4, "Node Authentication")
    assert alert["address"].startswith("127.0.0.1:")
    # an accepted echo-only association is audited too, with no instances
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", trail.node.port, ae_title="VESALIUS")
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()
    wait_for(lambda: [e for e in of(trail.events(), "DICOM Instances Transferred")
                      if e["details"].get("instances") == 0 and e["user"] == "SCANNER"], 10,
             "the echo association's event")


def test_job_is_audited_with_model_and_version(trail: Trail) -> None:
    job = trail.node.jobs()[0]
    event = next(e for e in of(trail.events(), "DICOM Instances Accessed")
                 if e["details"]["job"] == job["id"])
    assert event["outcome"] == 0 and event["action"] == "C"
    details = event["details"]
    assert details["series"] == trail.phantom.series_uid and details["study"] == trail.phantom.study_uid
    assert details["model"] == "builtin_ct" and details["model_name"] == "builtin_ct"
    assert details["model_version"]
    assert len(details["created"]) >= 3  # SEG, Surface Segmentation, SR


def test_delivery_is_audited_with_destination_and_sop_instance_uids(trail: Trail) -> None:
    events = trail.events()
    begun = of(events, "Begin Transferring DICOM Instances")
    sent = [e for e in of(events, "DICOM Instances Transferred") if e["details"]["direction"] == "sent"]
    # one transfer per part of the results (the SEG, SR and surfaces first, the rest when the job
    # ends; or all at once): each audited as it began and as it ended, every object once
    assert len(begun) == len(sent) in (1, 2) and all(e["outcome"] == 0 for e in sent)
    assert all(e["details"]["destination"] == "PACS" and e["action"] == "R" for e in sent)
    at_pacs = {str(pydicom.dcmread(f).SOPInstanceUID) for f in trail.pacs.files()}
    sent_uids = sorted(uid for e in sent for uid in e["details"]["instances"])
    assert sent_uids == sorted(at_pacs) == sorted(uid for e in begun for uid in e["details"]["instances"])
    job = next(e for e in of(events, "DICOM Instances Accessed") if e["outcome"] == 0)
    assert at_pacs <= set(job["details"]["created"])


def test_operator_actions_over_http_and_cli_name_who(trail: Trail) -> None:
    job_id = trail.node.jobs()[0]["id"]
    wait_for(lambda: trail.node.delivered(1), 60, "the delivery")
    assert trail.node.request(f"/jobs/{job_id}/resend", "POST")[0] == 200
    wait_for(lambda: trail.node.delivered(1), 60, "the second delivery")
    cli = vesalius("resend", str(job_id), "--data-dir", str(trail.node.data_dir))
    assert cli.returncode == 0, cli.stderr
    actions = of(trail.events(), "Operator Action")
    assert [(a["user"], a["details"]["via"], a["details"]["command"], a["details"]["job"]) for a in actions] \
        == [("local", "http", "resend", job_id), (getpass.getuser(), "cli", "resend", job_id)]
    assert actions[0]["address"].startswith("127.0.0.1:")


def test_failed_authentication_is_audited_without_the_token(trail: Trail) -> None:
    wrong = "wrong-token-wrong-token-wrong"
    assert trail.node.request("/deliveries", token=wrong)[0] == 401
    failure = of(trail.events(), "User Authentication")[-1]
    assert failure["outcome"] == 4 and failure["details"]["reason"] == "wrong bearer token"
    assert failure["details"]["path"] == "/deliveries" and failure["address"].startswith("127.0.0.1:")
    text = (trail.node.data_dir / "audit.jsonl").read_text()
    assert wrong not in text and trail.node.token() not in text


def test_the_table_is_append_only_and_matches_the_json_lines(trail: Trail) -> None:
    rows = trail.table()
    lines = trail.events()
    assert [(r["time"], r["event"], r["outcome"], r["user"]) for r in rows] == \
        [(e["time"], e["event"], e["outcome"], e["user"]) for e in lines]
    with sqlite3.connect(trail.node.data_dir / "vesalius.sqlite") as db:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("UPDATE audit SET user='someone else'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("DELETE FROM audit")
    assert len(trail.table()) == len(rows)


def test_no_patient_data_in_the_audit(trail: Trail) -> None:
    stored = {str(pydicom.dcmread(f).PatientName) for f in trail.pacs.files()}
    assert stored == {PATIENT_NAME}  # the results do carry it: the test data is what we think
    text = (trail.node.data_dir / "audit.jsonl").read_text() + json.dumps(trail.table())
    for value in (PATIENT_NAME, "Zyxwvutsr", PATIENT_ID, BIRTH_DATE, ACCESSION):
        assert value not in text, value
    listing = vesalius("audit", "--data-dir", str(trail.node.data_dir))
    assert listing.returncode == 0 and PATIENT_ID not in listing.stdout and PATIENT_NAME not in listing.stdout


def test_audit_command_reads_the_trail(trail: Trail) -> None:
    result = vesalius("audit", "--data-dir", str(trail.node.data_dir), "--json")
    assert result.returncode == 0, result.stderr
    events = json.loads(result.stdout)
    assert [e["event"] for e in events] == [r["event"] for r in trail.table()]
    assert events[0]["event"] == "Application Activity" and isinstance(events[0]["details"], dict)
    recent = json.loads(vesalius("audit", "--data-dir", str(trail.node.data_dir), "--json",
                                 "--since", "1h").stdout)
    assert len(recent) == len(events)
    future = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    assert json.loads(vesalius("audit", "--data-dir", str(trail.node.data_dir), "--json",
                               "--since", future).stdout) == []
    text = vesalius("audit", "--data-dir", str(trail.node.data_dir)).stdout
    assert "DICOM Instances Transferred" in text and "user=SCANNER" in text
    bad = vesalius("audit", "--data-dir", str(trail.node.data_dir), "--since", "yesterday")
    assert bad.returncode == 2 and "--since" in bad.stderr


def test_since_accepts_iso_times_and_durations() -> None:
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert parse_since("30m", now) == "2026-12-01T11:30:00.000000+00:00"
    assert parse_since("7d", now) == "2026-11-24T12:00:00.000000+00:00"
    assert parse_since("2026-12-01T08:00", now) == "2026-12-01T08:00:00.000000+00:00"
    assert parse_since("2026-12-01T09:00+01:00", now) == "2026-12-01T08:00:00.000000+00:00"
    with pytest.raises(ConfigError):
        parse_since("soon", now)


def test_inline_token_secrets_stay_out_of_the_digest(tmp_path: Path) -> None:
    from vesalius.node.config import parse_config

    one = parse_config({"http_tokens": [{"name": "ops", "token": "a" * 20}]})
    other = parse_config({"http_tokens": [{"name": "ops", "token": "b" * 20}]})
    assert config_digest(one) == config_digest(other)
    assert hashlib.sha256(b"a" * 20).hexdigest() != config_digest(one)


def test_a_failed_job_is_audited_as_a_serious_failure(trail: Trail, tmp_path: Path) -> None:
    """(Last: it adds an association and a job to the trail the tests above count.)"""
    gapped = write_phantom_series(tmp_path / "gapped", shape=(12, 32, 32), spacing=(2.5, 2.0, 2.0),
                                  objects=[Sphere((0, 0, 0), 10, 300)])
    by_position = sorted(gapped.paths, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    storescu([p for p in by_position if p not in by_position[4:7]], trail.node.port)  # 3 slices missing
    def refused() -> dict | None:
        return next((j for j in trail.node.jobs()
                     if j["state"] == "failed" and j["series_instance_uid"] == gapped.series_uid), None)

    job = wait_for(refused, 60, "the refused job")
    event = next(e for e in of(trail.events(), "DICOM Instances Accessed")
                 if e["details"]["job"] == job["id"])
    assert event["outcome"] == 8 and event["details"]["created"] == []
    assert event["details"]["series"] == gapped.series_uid
