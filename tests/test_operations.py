"""Operator commands on a node's data folder: status, retry, resend."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vesalius.node.store import Store


def vesalius(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vesalius.node.cli", *args], capture_output=True, text=True,
                          timeout=60)


def test_status_retry_resend(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with store.transaction() as db:
        failed = store.add_job(db, "1.2.3.4", "ct", "builtin_ct", ["pacs"])
        done = store.add_job(db, "1.2.3.5", "ct", "builtin_ct", ["pacs"])
    store.claim_job()
    store.fail_job(failed, "worker process died", retry=False)
    store.claim_job()
    store.finish_job(done, tmp_path / "results", {"model": 1.0}, ["pacs"])
    delivery = store.listing("deliveries")[0]["id"]
    store.record_delivery(delivery, "failed", "association rejected", 0)

    status = vesalius("status", "--data-dir", str(tmp_path), "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    states = {j["id"]: (j["state"], j["error"]) for j in report["jobs"]}
    assert states == {failed: ("failed", "worker process died"), done: ("done", None)}
    assert report["deliveries"][0]["state"] == "failed"
    text = vesalius("status", "--data-dir", str(tmp_path)).stdout
    assert "worker process died" in text and "association rejected" in text

    assert vesalius("retry", str(failed), "--data-dir", str(tmp_path)).returncode == 0
    assert store.job(failed)["state"] == "queued" and store.job(failed)["attempts"] == 0
    unknown = vesalius("retry", "999", "--data-dir", str(tmp_path))
    assert unknown.returncode == 1 and "no job 999" in unknown.stderr

    assert vesalius("resend", str(done), "--data-dir", str(tmp_path)).returncode == 0
    row = store.listing("deliveries")[0]
    assert (row["state"], row["attempts"], row["error"]) == ("pending", 0, None)
    assert vesalius("resend", str(failed), "--data-dir", str(tmp_path)).returncode == 1
    unknown = vesalius("resend", "99", "--data-dir", str(tmp_path))
    assert unknown.returncode == 1 and unknown.stderr.strip() == "vesalius resend: no job 99"
    assert vesalius("status", "--data-dir", str(tmp_path / "nowhere")).returncode == 2


def test_version_and_help_name_every_command() -> None:
    version = vesalius("--version")
    assert version.returncode == 0 and version.stdout.startswith("vesalius ")
    assert version.stdout.split()[1][0].isdigit()
    help_text = vesalius("--help").stdout
    for command in ("serve", "process", "echo", "models", "status", "retry", "resend"):
        assert command in help_text
    assert "``" not in help_text
    assert "totalsegmentator:PATH" in vesalius("process", "--help").stdout
