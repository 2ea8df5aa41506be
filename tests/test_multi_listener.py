"""Two listeners sharing one database and one spool (issue 17), as real `vesalius serve` processes
with different ports and node names, DCMTK storescp as the PACS: a series whose instances arrive at
both completes once and becomes one job; a node killed -9 while it runs a job loses it to the other
once its lease expires; a listener killed mid-association leaves what it acknowledged to the other.
storescp writes every object it receives to a file of its own (+uf), so a result delivered twice
shows as two files of one SOP Instance UID."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage

from tests.conftest import free_port
from tests.peers import DCMTK_ENV, NodeProcess, port_open, running, storescu, vesalius_node, wait_for
from tests.phantoms import Cylinder, PhantomSeries, write_phantom_series
from vesalius.node.store import Store

RESULTS = 4  # what a destination receives by default: SEG, Surface Segmentation, SR, 3D preview
LEASE = 3.0
NODE = """node_name = "{name}"
lease_seconds = {lease}
stability_timeout = 4.0
study_quiet_period = 0.5
"""
# a body and a bone running through every slice, so that any part of a series has results
BODY = [Cylinder((0, 0, 0), (0, 0, 1), 70, 1000, 40), Cylinder((0, 40, 0), (0, 0, 1), 10, 1000, 700)]


def phantom(folder: Path, slices: int = 24, size: int = 96) -> PhantomSeries:
    return write_phantom_series(folder, shape=(slices, size, size), spacing=(3, 180 / size, 180 / size),
                                objects=BODY)


@dataclass
class Cluster:
    """Listeners A and B on one data folder (the spool; SQLite there, or one PostgreSQL:
    ``url``), delivering to one storescp."""

    tmp: Path
    stack: ExitStack
    pacs_folder: Path
    pacs: str
    url: str = ""  # [database] url: "" = SQLite in the shared data folder
    nodes: dict[str, NodeProcess] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.tmp / "shared-data"

    @property
    def database(self) -> str:
        """The nodes' [database] table."""
        return f'[database]\nurl = "{self.url}"\n' if self.url else ""

    def store(self) -> Store:
        return Store(self.data, self.url)

    def start(self, name: str) -> NodeProcess:
        config = NODE.format(name=name, lease=LEASE) + self.database
        self.nodes[name] = self.stack.enter_context(vesalius_node(self.tmp, data_dir=self.data,
                                                                  destinations=[self.pacs], config=config))
        return self.nodes[name]

    def running(self) -> None:
        """Both listeners up (one killed by an earlier test starts again, under its own name)."""
        for name in ("A", "B"):
            if name not in self.nodes or self.nodes[name].proc.poll() is not None:
                self.start(name)

    def kill(self, name: str) -> None:
        node = self.nodes[name]
        os.killpg(node.proc.pid, signal.SIGKILL)  # the node and its worker processes, no goodbye
        node.proc.wait(10)

    def jobs(self, series_uid: str) -> list[dict]:
        return [dict(r) for r in self.store().query("SELECT * FROM jobs WHERE series_instance_uid=?",
                                                    (series_uid,))]

    def delivered(self, series_uid: str) -> bool:
        """The series' one job done and its delivery done."""
        jobs = self.jobs(series_uid)
        if len(jobs) != 1 or jobs[0]["state"] != "done":
            return False
        rows = self.store().query("SELECT state FROM deliveries WHERE job_id=?", (jobs[0]["id"],))
        return [r["state"] for r in rows] == ["done"]

    def received(self, study_uid: str) -> Counter[str]:
        """How many times storescp received each SOP Instance UID of the study."""
        found: Counter[str] = Counter()
        for path in self.pacs_folder.iterdir():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if ds.StudyInstanceUID == study_uid:
                found[str(ds.SOPInstanceUID)] += 1
        return found

    def assert_delivered_once(self, series: PhantomSeries) -> None:
        wait_for(lambda: self.delivered(series.series_uid), 120, "the series' one job and its delivery")
        received = self.received(series.study_uid)
        assert len(received) == RESULTS and set(received.values()) == {1}, received

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.tmp.glob("node-*.log")))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Both listeners on SQLite in the shared folder, then on one real PostgreSQL."""
    url = request.getfixturevalue("postgres_server").new_database() if request.param == "postgres" else ""
    tmp = tmp_path_factory.mktemp("cluster")
    folder, port = tmp / "pacs", free_port()
    folder.mkdir()
    cmd = ["storescp", "-aet", "PACS", "-od", str(folder), "+xa", "+uf", "-pm", str(port)]
    with ExitStack() as stack:
        stack.enter_context(running(cmd, tmp / "storescp.log", DCMTK_ENV))
        wait_for(lambda: port_open(port), 10, "storescp to listen")
        cluster = Cluster(tmp, stack, folder, f"PACS@127.0.0.1:{port}", url=url)
        cluster.running()
        yield cluster


@contextmanager
def association(port: int, calling: str) -> Iterator[Association]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="VESALIUS")
    assert assoc.is_established
    try:
        yield assoc
    finally:
        assoc.release()


def test_a_series_split_over_both_listeners_is_one_job_delivered_once(cluster: Cluster) -> None:
    """Half the instances to A, half to B, in two associations open at the same time; B's ends
    (a normal release) while A's goes on after a pause longer than the quiet period: the series
    waits for A's association, which only the database tells B about."""
    cluster.running()
    series = phantom(cluster.tmp / "split")
    half = len(series.paths) // 2
    with association(cluster.nodes["A"].port, "SPLITTER") as to_a:
        with association(cluster.nodes["B"].port, "SPLITTER") as to_b:
            for i, path in enumerate(series.paths[:half]):
                assert (to_b if i % 2 else to_a).send_c_store(pydicom.dcmread(path)).Status == 0
        time.sleep(1.5)  # quiet_period is 0.5 s
        assert not cluster.jobs(series.series_uid)
        for path in series.paths[half:]:
            assert to_a.send_c_store(pydicom.dcmread(path)).Status == 0
    cluster.assert_delivered_once(series)
    store = cluster.store()
    assert store.query("SELECT COUNT(*) FROM instances WHERE series_instance_uid=?",
                       (series.series_uid,))[0][0] == len(series.paths)
    assert cluster.log().count(f"series complete series={series.series_uid}") == 1
    row = store.query("SELECT associations FROM series WHERE series_instance_uid=?", (series.series_uid,))[0]
    assert row["associations"] == 2  # so it waited the quiet period, not "complete at once"


def test_several_series_sent_to_both_listeners_at_once_are_each_processed_once(
        cluster: Cluster) -> None:
    cluster.running()
    series = [phantom(cluster.tmp / f"many{i}", slices=16) for i in range(4)]
    senders = [threading.Thread(target=storescu, args=(s.paths, cluster.nodes["AB"[i % 2]].port))
               for i, s in enumerate(series)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(timeout=120)
    for s in series:
        cluster.assert_delivered_once(s)
    log = cluster.log()  # each series completed once, each study selected once (the default study rule)
    assert [log.count(f"series complete series={s.series_uid}") for s in series] == [1] * 4
    assert [log.count(f"study complete study={s.study_uid} ") for s in series] == [1] * 4


def test_a_second_node_with_a_live_nodes_name_refuses_to_start(cluster: Cluster) -> None:
    cluster.running()
    config = cluster.tmp / "twin.toml"
    config.write_text('host = "127.0.0.1"\n' + NODE.format(name="A", lease=LEASE) + cluster.database)
    twin = subprocess.run([sys.executable, "-m", "vesalius.node.cli", "serve", "--config", str(config),
                           "--port", str(free_port()), "--http-port", str(free_port()),
                           "--data-dir", str(cluster.data)], capture_output=True, text=True, timeout=120)
    assert twin.returncode == 2, twin.stderr[-2000:]
    assert "configuration error: node_name: another node named 'A' is running" in twin.stderr
    assert cluster.nodes["A"].proc.poll() is None  # the live one is untouched


def test_a_node_killed_while_running_a_job_loses_it_to_the_other_after_its_lease(
        cluster: Cluster) -> None:
    cluster.running()
    series = phantom(cluster.tmp / "long", slices=48, size=160)  # a job long enough to be killed in
    storescu(series.paths, cluster.nodes["A"].port)
    job = wait_for(lambda: [j for j in cluster.jobs(series.series_uid) if j["state"] == "running"], 60,
                   "the job to run", interval=0.05)[0]
    owner = job["lease_owner"]
    cluster.kill(owner)
    survivor = cluster.nodes["B" if owner == "A" else "A"]
    [killed_in] = cluster.jobs(series.series_uid)
    assert (killed_in["state"], killed_in["lease_owner"]) == ("running", owner), "it ended before the kill"
    cluster.assert_delivered_once(series)
    [done] = cluster.jobs(series.series_uid)
    assert done["attempts"] == 2  # the dead node's attempt counts (job_attempts ends a job that kills nodes)
    other = "B" if owner == "A" else "A"
    assert re.search(rf"job start job={job['id']} .*attempt=2 node={other}\n", survivor.log())
    assert f"job done job={job['id']} " in survivor.log()


def test_a_listener_killed_mid_association_leaves_what_it_acknowledged_to_the_other(
        cluster: Cluster) -> None:
    cluster.running()
    series = phantom(cluster.tmp / "cut", slices=60)
    in_order = sorted(series.paths, key=lambda p: float(pydicom.dcmread(p).SliceLocation))  # no gaps
    victim = cluster.nodes["A"]
    sender = subprocess.Popen(["storescu", "-v", "-aec", "VESALIUS", "127.0.0.1", str(victim.port),
                               *map(str, in_order)], env=DCMTK_ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    spool = cluster.data / "spool" / series.study_uid / series.series_uid
    wait_for(lambda: spool.exists() and len(list(spool.glob("*.dcm"))) >= 10, 30, "10 instances")
    cluster.kill("A")
    output = sender.communicate(timeout=30)[0]
    acknowledged = len(re.findall(r"Received Store Response \(Success\)", output))
    assert 0 < acknowledged < len(in_order)
    cluster.assert_delivered_once(series)  # completed by stability_timeout at B, run and sent by B
    store = cluster.store()
    stored = store.query("SELECT COUNT(*) FROM instances WHERE series_instance_uid=?", (series.series_uid,))
    assert acknowledged <= stored[0][0] < len(in_order)
    [job] = cluster.jobs(series.series_uid)
    assert f"job done job={job['id']} " in cluster.nodes["B"].log()
