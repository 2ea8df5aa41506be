"""The command line for people: `vesalius process` with stage progress on a terminal and a short
summary (``--json``: the machine summary), `vesalius status` with headers, the next retry time
and the underlying cause of a delivery failure."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import free_port
from tests.phantoms import write_phantom_series
from tests.test_e2e import CHEST
from vesalius.node.config import Config, Retry
from vesalius.node.destinations.dicom import DicomDestination
from vesalius.node.send import Sender
from vesalius.node.store import Store

CLI = [sys.executable, "-m", "vesalius.node.cli"]


def on_a_terminal(args: list[str]) -> tuple[int, str, str]:
    """Run with stderr on a pseudo-terminal (as in an operator's shell); (rc, stdout, terminal)."""
    leader, follower = pty.openpty()
    seen: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the follower side closed: the command ended
                return
            if not chunk:
                return
            seen.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        result = subprocess.run([*CLI, *args], stdout=subprocess.PIPE, stderr=follower, text=True,
                                timeout=300, env={**os.environ, "COLUMNS": "120"})
    finally:
        os.close(follower)
    reader.join(10)
    os.close(leader)
    return result.returncode, result.stdout, b"".join(seen).decode(errors="replace")


def test_process_shows_each_stage_on_a_terminal_and_ends_with_a_summary(tmp_path: Path) -> None:
    series = write_phantom_series(tmp_path / "ct", shape=(30, 64, 64), spacing=(3.0, 3.0, 3.0), objects=CHEST)
    out = tmp_path / "out"
    rc, stdout, terminal = on_a_terminal(["process", str(series.paths[0].parent), "--out", str(out)])
    assert rc == 0, terminal
    for n, stage in enumerate(("volume", "model", "surfaces", "measures", "writers", "preview"), start=1):
        assert f"stage {n}/6: {stage}" in terminal, terminal
    summary = json.loads((out / "summary.json").read_text())
    assert stdout.splitlines()[0] == f"builtin_ct {summary['model']['version']}: " \
                                     f"{len(summary['structures'])} structure(s) in {out}"
    for structure in summary["structures"]:
        assert f"{structure['volume_ml']} ml" in stdout and structure["name"] in stdout
    assert "seg.dcm" in stdout and "meshes/structures.glb" in stdout
    machine = subprocess.run([*CLI, "process", str(series.paths[0].parent), "--out", str(tmp_path / "again"),
                              "--json"], capture_output=True, text=True, timeout=300)
    assert machine.returncode == 0 and "stage 1/6" not in machine.stderr  # no terminal: no progress
    assert json.loads(machine.stdout)["structures"] == summary["structures"]


def test_status_has_headers_the_next_try_and_the_cause_of_a_failed_delivery(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    results = tmp_path / "results"
    results.mkdir()
    one = write_phantom_series(tmp_path / "ct", shape=(2, 8, 8), objects=CHEST).paths[0]
    (results / "seg.dcm").write_bytes(one.read_bytes())  # any DICOM object: it is never received
    with store.transaction() as db:
        job = store.add_job(db, "1.2.826.0.1.1", "ct", "builtin_ct", ["pacs"])
    store.claim_job()
    store.finish_job(job, results, {"model": 1.0}, ["pacs"])
    port = free_port()  # nothing listens here
    config = Config(destinations=(DicomDestination("pacs", "PACS", "127.0.0.1", port),),
                    retry=Retry(base_delay=3600, max_delay=3600))
    sender = Sender(store, config, threading.Event(), threading.Event())
    sender.deliver(store.due_deliveries()[0])
    text = subprocess.run([*CLI, "status", "--data-dir", str(tmp_path / "data")], capture_output=True,
                          text=True, timeout=60).stdout
    lines = text.splitlines()
    header = next(line for line in lines if line.strip().startswith("DELIVERY"))
    assert header.split() == ["DELIVERY", "JOB", "DESTINATION", "STATE", "TRIES", "NEXT", "TRY", "CAUSE"]
    row = lines[lines.index(header) + 1]
    assert "pending" in row and "Connection refused" in row, row
    next_try = time.strftime("%Y-%m-%d %H", time.localtime(time.time() + 3600))  # local time, in an hour
    assert next_try in row, row
    assert any(line.strip().split()[:2] == ["JOB", "SERIES"] for line in lines)
    assert "done" in next(line for line in lines if line.strip().startswith(str(job)))
