"""Pipeline runs on a real Ray cluster (``[ray] address``): a head and a worker node on loopback.

Several series sent at once are processed on both Ray nodes; kill -9 of the worker node while it
runs a job: the job runs again on the other node, every result reaches the PACS once. The
embedded default never imports Ray (or psycopg), and an unreachable cluster stops the node at
start-up with one line.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from tests.conftest import ROOT, free_port
from tests.peers import NodeProcess, storescp, storescu, vesalius_node, wait_for
from tests.phantoms import Cylinder, write_phantom_series
from tests.ray_peer import RayCluster, ray_cluster

CHEST = [Cylinder((0, 0, 0), (0, 0, 1), 70, 80, 40), Cylinder((0, 40, 0), (0, 0, 1), 10, 60, 700)]
RESULTS = 4  # what a destination receives by default: SEG, Surface Segmentation, SR, 3D preview
WORKER_IP = "127.0.0.3"
SERIES_RULE = '[[rules]]\nname = "ct"\ntrigger = "series"\nselect = "all"\n'


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    with ray_cluster([WORKER_IP]) as started:
        yield started


def ray_config(cluster: RayCluster) -> str:
    """Two CPU actors (``workers``), one per Ray node (spread), each job tried at most twice."""
    return f'workers = 2\njob_attempts = 2\n{SERIES_RULE}[ray]\naddress = "{cluster.address}"\n'


def phantoms(folder: Path, count: int, slices: int = 24, size: int = 64) -> list:
    return [write_phantom_series(folder / f"ct{i}", shape=(slices, size, size),
                                 spacing=(3, 160 / size, 160 / size), objects=CHEST, seed=i)
            for i in range(count)]


def send_all(series: list, port: int) -> None:
    """Every series in its own association, all at once (scanners sending side by side)."""
    errors: list[BaseException] = []

    def send(paths: list[Path]) -> None:
        try:
            storescu(paths, port)
        except BaseException as err:  # reported in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=send, args=(s.paths,)) for s in series]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def pacs_uids(pacs) -> list[str]:
    """SOP Instance UIDs of the whole files at the PACS (one a file: duplicates show)."""
    uids = []
    for path in pacs.files():
        try:
            uids.append(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        except (pydicom.errors.InvalidDicomError, EOFError, AttributeError):  # storescp still writing
            continue
    return uids


def ray_nodes_used(node: NodeProcess) -> dict[int, str]:
    """job id -> the Ray node (id prefix) each run of the job went to, from the node's log."""
    return {int(job): ray_node for job, ray_node in
            re.findall(r"job runs on ray job=(\d+) worker=\d+ node=(\w+)", node.log())}


def all_done(node: NodeProcess, series: int) -> bool:
    jobs = node.jobs()
    return len(jobs) == series and all(j["state"] == "done" for j in jobs) and node.delivered(series)


def test_series_sent_at_once_run_on_both_ray_nodes(tmp_path: Path, cluster: RayCluster) -> None:
    cluster.ensure_workers([WORKER_IP])
    *series, gap = phantoms(tmp_path, 4)
    by_position = sorted(gap.paths, key=lambda p: float(pydicom.dcmread(p).SliceLocation))
    gap.paths = [p for p in by_position if p != by_position[5]]  # one slice lost: cannot be placed
    with storescp(tmp_path / "pacs") as pacs, \
            vesalius_node(tmp_path, destinations=[pacs.address], config=ray_config(cluster)) as node:
        ready = wait_for(lambda: re.findall(r"ray model worker ready worker=\d+ node=(\w+)", node.log())
                         if node.log().count("ray model worker ready") >= 2 else None,
                         120, "both Ray actors warm")
        send_all([*series, gap], node.port)

        def settled() -> bool:
            jobs = node.jobs()
            return (len(jobs) == 4 and sorted(j["state"] for j in jobs) == ["done"] * 3 + ["failed"]
                    and node.delivered(3))

        wait_for(settled, 180, "three jobs done and delivered, one failed")
        failed = next(j for j in node.jobs() if j["state"] == "failed")
        uids = pacs_uids(pacs)
        node.proc.send_signal(signal.SIGTERM)  # a clean stop: the node leaves the cluster
        assert node.proc.wait(30) == 0
        log = node.log()
    assert set(ready) == {cluster.head.node_id()[:12], cluster.workers[0].node_id()[:12]}  # spread
    assert "ray cluster address=" in log and "cpus=2" in log  # the resources, logged at start
    assert len(uids) == len(set(uids)) == 3 * RESULTS
    # the pipeline's own error comes back through Ray as itself: no retry, the reason kept
    assert failed["attempts"] == 1 and "cannot place series in space" in failed["error"]
    assert "disconnected from the Ray cluster" in log  # a clean shutdown


def test_kill_ray_worker_node_mid_job_runs_it_on_the_other_node(tmp_path: Path, cluster: RayCluster) -> None:
    worker = cluster.ensure_workers([WORKER_IP])[0]
    worker_id = worker.node_id()[:12]
    series = phantoms(tmp_path, 2, slices=48, size=96)  # jobs of a few seconds: time to kill mid-job
    with storescp(tmp_path / "pacs") as pacs, \
            vesalius_node(tmp_path, destinations=[pacs.address], config=ray_config(cluster)) as node:
        wait_for(lambda: node.log().count("ray model worker ready") >= 2, 120, "both Ray actors warm")
        send_all(series, node.port)

        def running_on_worker() -> int | None:
            on_worker = [job for job, ray_node in ray_nodes_used(node).items() if ray_node == worker_id]
            for job in node.jobs():
                if job["id"] in on_worker and job["state"] == "running" and job["progress"]:
                    return int(job["id"])
            return None

        victim = wait_for(running_on_worker, 120, "a job running a stage on the worker node", 0.05)
        worker.kill()  # its raylet and the worker process running the actor, no goodbye
        wait_for(lambda: all_done(node, 2), 180, "every job done and delivered after the kill")
        jobs = {j["id"]: j for j in node.jobs()}
        log = node.log()
        uids = pacs_uids(pacs)
        files = len(pacs.files())
    assert jobs[victim]["attempts"] == 2  # the lost run counted; the second ran on the head node
    assert re.search(rf"job failed job={victim} attempt=1 retry=True: Ray worker lost", log)
    assert ray_nodes_used(node)[victim] == cluster.head.node_id()[:12]
    assert files == len(uids) == len(set(uids)) == 2 * RESULTS  # nothing lost, nothing twice


def test_unreachable_cluster_stops_the_node_at_start_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[ray]\naddress = "127.0.0.1:{free_port()}"\n')
    result = subprocess.run([sys.executable, "-m", "vesalius.node.cli", "serve", "--config", str(config),
                             "--data-dir", str(tmp_path / "data"), "--port", str(free_port()),
                             "--http-port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "configuration error: ray.address: cannot reach the Ray cluster at 127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr


def heavy_modules() -> list[str]:
    """The scale-out libraries loaded in this process (run in the node and in its worker)."""
    return sorted(name for name in ("ray", "psycopg") if name in sys.modules)


EMBEDDED = """
import json, sys
from pathlib import Path
from vesalius.node.config import Config, Rule
from vesalius.node.service import Node
from tests.peers import storescu, wait_for
from tests.phantoms import Cylinder, write_phantom_series
from tests.test_ray import heavy_modules

tmp, port, http_port = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
node = Node(Config(host="127.0.0.1", port=port, http_port=http_port, data_dir=tmp / "data",
                   rules=(Rule(name="ct", trigger="series", select="all"),)))
node.start()
try:
    series = write_phantom_series(tmp / "ct", shape=(16, 48, 48), spacing=(3, 3, 3),
                                  objects=[Cylinder((0, 0, 0), (0, 0, 1), 50, 40, 40)])
    storescu(series.paths, port)
    wait_for(lambda: node.store.query("SELECT 1 FROM jobs WHERE state='done'"), 120, "the job to finish")
    worker = node.runner.executor._pool.submit(heavy_modules).result(timeout=60)
    print(json.dumps({"node": heavy_modules(), "worker": worker}))
finally:
    node.stop()
"""


def test_embedded_default_never_imports_ray_or_psycopg(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(EMBEDDED), str(tmp_path),
                             str(free_port()), str(free_port())], cwd=ROOT, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == '{"node": [], "worker": []}'


@pytest.mark.parametrize(("table", "message"), [
    ({"address": "ray-head"}, 'ray.address: expected "host:port"'),
    ({"address": "ray://ray-head:10001"}, 'ray.address: expected "host:port"'),
    ({"cpu_actors": -2}, "ray.cpu_actors: -1 (automatic) or a count"),
    ({"adress": "ray-head:6379"}, "ray.adress: unknown key"),
])
def test_ray_section_is_checked(table: dict, message: str) -> None:
    from vesalius.node.checks import ConfigError
    from vesalius.node.config import parse_config

    assert parse_config({"ray": {"address": "ray-head:6379", "gpu_actors": 2}}).ray.gpu_actors == 2
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"ray": table})


def test_actors_follow_the_cluster_gpus_unless_configured() -> None:
    from vesalius.node.config import parse_config
    from vesalius.node.ray_runner import actor_counts

    def counts(ray: dict, gpus: float, workers: int = 3) -> tuple[int, int]:
        config = parse_config({"workers": workers, "ray": {"address": "ray-head:6379", **ray}})
        return actor_counts(config, {"CPU": 16.0, "GPU": gpus})

    assert counts({}, gpus=0) == (0, 3)  # CPU actors: `workers` of them
    assert counts({}, gpus=4) == (4, 0)  # one per GPU, no CPU actor
    assert counts({"cpu_actors": 2}, gpus=4) == (4, 2)
    assert counts({"gpu_actors": 1, "cpu_actors": 0}, gpus=4) == (1, 0)
    assert counts({"gpu_actors": 0}, gpus=4) == (0, 3)  # CPU only
    assert counts({"cpu_actors": 0}, gpus=0) == (0, 0)  # refused at start-up: no worker at all
