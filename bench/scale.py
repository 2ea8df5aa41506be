"""Scale-out on Ray: series per minute with one vs two Ray worker nodes, and the Ray path's
overhead against the embedded process pool for one series (run on demand, not in CI).

    .venv/bin/python bench/scale.py [--series 4] [--slices 48] [--size 128] [--repeats 2]

Three set-ups in one run, each after a warm-up series per worker (models loaded and run once):

- embedded: ``vesalius serve`` with its local process pool (``workers = 1``);
- ray x1: ``[ray] address`` on a cluster of a 0-CPU head (the node's own Ray member, as in
  production) and one 1-CPU worker node: one CPU actor;
- ray x2: the same with two worker nodes: two CPU actors (``workers = 2``), spread.

Single series: DCMTK storescu sends one series; the time from the first image sent to every
result acknowledged by the PACS (DCMTK storescp), median of ``--repeats``. Throughput: ``--series``
series sent at once (one storescu each), series per minute from the first image to the last result.
Printed side by side as ratios. On this machine every "node" shares the same cores (2 here):
two worker nodes can only be as fast as the cores the other processes leave them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.peers import DCMTK_ENV, NodeProcess, storescp, vesalius_node, wait_for  # noqa: E402
from tests.phantoms import Cylinder, write_phantom_series  # noqa: E402
from tests.ray_peer import ray_cluster  # noqa: E402

CHEST = [Cylinder((0, 0, 0), (0, 0, 1), 70, 120, 40), Cylinder((40, -10, 0), (0, 0, 1), 25, 100, -850),
         Cylinder((-40, -10, 0), (0, 0, 1), 25, 100, -850), Cylinder((0, 45, 0), (0, 0, 1), 10, 120, 700)]
SERIES_RULE = '[[rules]]\nname = "ct"\ntrigger = "series"\nselect = "all"\n'


class Series:
    """Distinct phantom series (new UIDs each), written once."""

    def __init__(self, folder: Path, slices: int, size: int) -> None:
        self.folder, self.slices, self.size, self.count = folder, slices, size, 0

    def next(self) -> list[Path]:
        self.count += 1
        shape = (self.slices, self.size, self.size)
        return write_phantom_series(self.folder / f"ct{self.count}", shape=shape,
                                    spacing=(2.5, 200 / self.size, 200 / self.size), objects=CHEST,
                                    seed=self.count).paths


def send(node: NodeProcess, batch: list[list[Path]]) -> None:
    senders = [subprocess.Popen(["storescu", "-aet", f"SCANNER{i}", "-aec", "VESALIUS", "127.0.0.1",
                                 str(node.port), *map(str, paths)], env=DCMTK_ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for i, paths in enumerate(batch)]
    for sender in senders:
        _, err = sender.communicate(timeout=600)
        assert sender.returncode == 0, err.decode()[-2000:]


def run_batch(node: NodeProcess, batch: list[list[Path]]) -> float:
    """Seconds from the first image sent until every job of the batch is delivered."""
    before = len(node.jobs())
    start = time.perf_counter()
    send(node, batch)
    wanted = before + len(batch)

    def done() -> bool:
        jobs = node.jobs()
        return (len(jobs) == wanted and all(j["state"] == "done" for j in jobs)
                and node.delivered())

    wait_for(done, 1800, "the batch's results at the PACS", interval=0.05)
    return time.perf_counter() - start


def measure(node: NodeProcess, series: Series, count: int, repeats: int, workers: int) -> dict[str, float]:
    # warm-up, one series per worker at once: libraries imported, model loaded and run in every worker
    run_batch(node, [series.next() for _ in range(workers)])
    result = {}
    if workers == 1:
        result["single_s"] = statistics.median(run_batch(node, [series.next()]) for _ in range(repeats))
    seconds = run_batch(node, [series.next() for _ in range(count)])
    result["per_min"] = count / seconds * 60
    return result


@contextmanager
def node_with(tmp: Path, pacs: str, workers: int, ray: str = "", ready: int = 0) -> Iterator[NodeProcess]:
    with vesalius_node(tmp, destinations=[pacs], config=f"workers = {workers}\n{SERIES_RULE}{ray}",
                       data_dir=tmp / f"data-{time.monotonic_ns()}") as node:
        wait_for(lambda: node.log().count("ray model worker ready") >= ready, 300, "the Ray actors warm")
        yield node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=4, help="series sent at once for the throughput")
    parser.add_argument("--slices", type=int, default=48)
    parser.add_argument("--size", type=int, default=128, help="rows and columns of each slice")
    parser.add_argument("--repeats", type=int, default=2, help="single-series runs (median)")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        series = Series(tmp / "series", args.slices, args.size)
        with storescp(tmp / "pacs") as pacs:
            with node_with(tmp, pacs.address, 1) as node:
                results["embedded"] = measure(node, series, args.series, args.repeats, 1)
            with ray_cluster(["127.0.0.3"], head_cpus=0) as cluster:
                ray = f'[ray]\naddress = "{cluster.address}"\n'
                with node_with(tmp, pacs.address, 1, ray, ready=1) as node:
                    results["ray x1"] = measure(node, series, args.series, args.repeats, 1)
                cluster.add_worker("127.0.0.4")
                with node_with(tmp, pacs.address, 2, ray, ready=2) as node:
                    results["ray x2"] = measure(node, series, args.series, args.repeats, 2)
    print(f"{args.series} series at once, {args.slices} x {args.size} x {args.size} phantom CT; "
          f"single series: median of {args.repeats}")
    base, one = results["embedded"], results["ray x1"]
    print(f"{'':10} {'single series s':>16} {'vs embedded':>12} {'series/min':>11} {'vs ray x1':>10}")
    for name, r in results.items():
        single = f"{r['single_s']:16.2f} {r['single_s'] / base['single_s']:11.2f}x" if "single_s" in r else \
            f"{'-':>16} {'-':>12}"
        print(f"{name:10} {single} {r['per_min']:11.1f} {r['per_min'] / one['per_min']:9.2f}x")
    print(f"sizing: {one['per_min'] * 60:.0f} series/hour per CPU worker (ray x1, this series size); "
          f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
