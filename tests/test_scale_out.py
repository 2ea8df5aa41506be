"""The scale-out configuration end to end (issue 17), every part real: two `vesalius serve`
listeners sharing one PostgreSQL database and one spool, their pipeline runs on a Ray cluster of
two nodes, DCMTK storescp as the PACS. Series are sent to both listeners at once; the Ray worker
node running a job is killed -9 mid-stage and PostgreSQL is restarted while the jobs run: every
series is processed, each result reaches the PACS exactly once.

(Each part is also tested on its own: tests/test_ray.py, tests/test_multi_listener.py and
tests/test_leases.py on both databases, tests/test_store_backends.py.)"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.peers import NodeProcess, storescp, storescu, vesalius_node, wait_for
from tests.postgres_peer import PostgresPeer
from tests.ray_peer import ray_cluster
from tests.test_ray import RESULTS, SERIES_RULE, WORKER_IP, pacs_uids, phantoms, ray_nodes_used

LISTENER = """node_name = "{name}"
lease_seconds = 3.0
workers = 1
job_attempts = 3
{rule}[database]
url = "{url}"
[ray]
address = "{address}"
"""


def answered(read: Callable[[], Any]) -> Any:
    """What a listener's API says, or None while it cannot say (503: the database restarting)."""
    try:
        return read()
    except (AssertionError, OSError):
        return None


def send_at_once(sends: list[tuple[list[Path], int]]) -> None:
    errors: list[BaseException] = []

    def send(paths: list[Path], port: int) -> None:
        try:
            storescu(paths, port)
        except BaseException as err:  # reported in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=send, args=item) for item in sends]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_two_listeners_on_postgresql_and_ray_lose_nothing_to_a_dead_worker_node_or_a_db_restart(
        tmp_path: Path, postgres_server: PostgresPeer) -> None:
    url = postgres_server.new_database()
    shared = tmp_path / "shared-data"  # one spool and results folder for both listeners and Ray
    series = phantoms(tmp_path, 4, slices=48, size=96)  # jobs of a few seconds: killed mid-stage
    with ray_cluster([WORKER_IP]) as cluster, storescp(tmp_path / "pacs") as pacs:
        worker_id = cluster.workers[0].node_id()[:12]

        def listener(name: str) -> Any:
            config = LISTENER.format(name=name, rule=SERIES_RULE, url=url, address=cluster.address)
            return vesalius_node(tmp_path, data_dir=shared, destinations=[pacs.address], config=config)

        with listener("A") as a, listener("B") as b:
            nodes: list[NodeProcess] = [a, b]
            wait_for(lambda: all("ray model worker ready" in n.log() for n in nodes), 120,
                     "each listener's Ray actor warm")
            send_at_once([(series[0].paths, a.port), (series[1].paths, b.port),
                          (series[2].paths, a.port), (series[3].paths, b.port)])

            def running_on_worker() -> int | None:
                runs = {job: node for n in nodes for job, node in ray_nodes_used(n).items()}
                for job in answered(a.jobs) or []:
                    if runs.get(job["id"]) == worker_id and job["state"] == "running" and job["progress"]:
                        return int(job["id"])
                return None

            victim = wait_for(running_on_worker, 180, "a job running a stage on the Ray worker node", 0.05)
            cluster.workers[0].kill()  # its raylet and the worker process running the actor
            postgres_server.restart()  # every listener's connections end while the jobs run

            def settled() -> list[dict] | None:
                jobs, deliveries = answered(a.jobs), answered(a.deliveries)
                if (jobs and deliveries and len(jobs) == 4 and all(j["state"] == "done" for j in jobs)
                        and len(deliveries) == 4 and all(d["state"] == "done" for d in deliveries)):
                    return list(jobs)
                return None

            jobs = wait_for(settled, 240, "every series processed and delivered")
            logs = a.log() + b.log()
            uids = pacs_uids(pacs)
            files = len(pacs.files())
    by_id = {j["id"]: j for j in jobs}
    assert by_id[victim]["attempts"] >= 2  # the lost run counted; another ran it on a live node
    assert {j["series_instance_uid"] for j in jobs} == {s.series_uid for s in series}
    assert files == len(uids) == len(set(uids)) == 4 * RESULTS  # nothing lost, nothing twice
    assert "Traceback" not in logs
