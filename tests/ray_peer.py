"""A real Ray cluster on this machine for the tests: a head (``ray start --head``) and worker nodes
(``ray start --address``), each on its own loopback address, with small memory settings.

Ray turns 127.0.0.1 into the machine's outward address, so each node takes another loopback
address (127.0.0.2, 127.0.0.3, ...: all of 127/8 is this machine): the nodes stay on loopback
and are told apart by address. Ray's own servers listen on every interface (not configurable).

``ray start`` daemonizes; started in a session of its own, every process it leaves (raylet, GCS,
agents, the worker processes running actors) keeps that session id, so a node is killed, and the
cluster cleaned up, by session: only processes these fixtures started. (``ray stop`` would end
every Ray process on the machine.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port

RAY = str(Path(sys.executable).with_name("ray"))
# Small and quick: no prestarted idle workers, a dead node noticed within ~2 s (the defaults
# take ~30 s), 100 MB object stores (the series never travel through them: paths do).
RAY_ENV = {**os.environ, "RAY_enable_worker_prestart": "0", "RAY_prestart_worker_first_driver": "0",
           "RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "500",
           "RAY_health_check_timeout_ms": "500", "RAY_health_check_failure_threshold": "3",
           "RAY_USAGE_STATS_ENABLED": "0"}
COMMON = ["--num-gpus=0", "--object-store-memory=100000000", "--disable-usage-stats"]


@dataclass
class RayNode:
    """One ``ray start``: its node IP and the session its processes share."""

    ip: str
    session: int
    log: Path

    def pids(self) -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == self.session and fields[0] != "Z":  # field 6: the session id
                found.append(int(stat.parent.name))
        return found

    def node_id(self) -> str:
        """Ray's id of this node, from its raylet's command line."""
        for pid in self.pids():
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if args and args[0].endswith(b"/raylet"):
                for arg in args:
                    if arg.startswith(b"--node_id="):
                        return arg.split(b"=", 1)[1].decode()
        raise AssertionError(f"no raylet found for the Ray node at {self.ip}")

    def kill(self) -> None:
        """kill -9 of the whole node (raylet, agents, the workers running its actors), repeated
        until none is left (a dying raylet may still have started a worker)."""
        for _ in range(50):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        raise AssertionError(f"Ray node {self.ip}: processes still alive after kill -9: {self.pids()}")

    def alive(self) -> bool:
        return bool(self.pids())


@dataclass
class RayCluster:
    address: str
    temp_dir: Path
    head: RayNode
    workers: list[RayNode] = field(default_factory=list)

    def add_worker(self, ip: str) -> RayNode:
        node = _ray_start(["--address", self.address, f"--node-ip-address={ip}", "--num-cpus=1"],
                          ip, self.temp_dir)
        self.workers.append(node)
        return node

    def ensure_workers(self, ips: list[str]) -> list[RayNode]:
        """Worker nodes at these addresses, started again where a test killed one."""
        self.workers = [w for w in self.workers if w.alive()]
        have = {w.ip for w in self.workers}
        for ip in ips:
            if ip not in have:
                self.add_worker(ip)
        return self.workers


def _ray_start(args: list[str], ip: str, temp_dir: Path) -> RayNode:
    log = temp_dir / f"ray-start-{ip}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([RAY, "start", *args, *COMMON], stdout=out, stderr=subprocess.STDOUT,
                                env=RAY_ENV, start_new_session=True)
    node = RayNode(ip, proc.pid, log)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        node.kill()
        raise
    if code != 0:
        node.kill()
        raise AssertionError(f"ray start {ip} failed ({code}):\n{log.read_text()[-3000:]}")
    return node


@contextmanager
def ray_cluster(workers: list[str], head_cpus: int = 1) -> Iterator[RayCluster]:
    """A head at 127.0.0.2 (``head_cpus``: 0 = it runs no actor, as the node's own member of a
    production cluster) and 1-CPU worker nodes at ``workers``; all killed on exit. The temp dir
    is short: Ray's unix socket paths inside it must stay under 108 characters."""
    temp_dir = Path(tempfile.mkdtemp(prefix="vr", dir="/tmp"))
    port = free_port()
    head_ip = "127.0.0.2"
    nodes: list[RayNode] = []
    cluster = None
    try:
        head = _ray_start(["--head", f"--port={port}", f"--node-ip-address={head_ip}",
                           f"--num-cpus={head_cpus}", "--include-dashboard=false", f"--temp-dir={temp_dir}"],
                          head_ip, temp_dir)
        nodes.append(head)
        cluster = RayCluster(f"{head_ip}:{port}", temp_dir, head)
        for ip in workers:
            cluster.add_worker(ip)
        yield cluster
    finally:
        for node in [*(cluster.workers if cluster else []), *nodes]:
            node.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
