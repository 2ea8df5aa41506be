"""Load: 8 concurrent associations of 200 slices each while jobs run; nothing lost, no deadlock."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.peers import storescp, storescu, vesalius_node, wait_for
from tests.phantoms import Cylinder, write_phantom_series

SENDERS = 8
SLICES = 200


def test_eight_concurrent_series_while_jobs_run(tmp_path: Path) -> None:
    shape = [Cylinder((0, 0, 0), (0, 0, 1), 50, 250, 40), Cylinder((0, 25, 0), (0, 0, 1), 8, 200, 700)]
    series = [write_phantom_series(tmp_path / f"s{i}", shape=(SLICES, 64, 64), spacing=(1.5, 2, 2),
                                   objects=shape, seed=i) for i in range(SENDERS)]
    with storescp(tmp_path / "pacs") as pacs, \
            vesalius_node(tmp_path, destinations=[pacs.address]) as node:
        storescu(series[0].paths, node.port)  # one series first, so jobs are running during the load
        wait_for(lambda: "job start" in node.log(), 60, "the first job")
        start = time.perf_counter()
        with ThreadPoolExecutor(SENDERS - 1) as pool:
            results = list(pool.map(lambda i: storescu(series[i].paths, node.port, calling=f"SCANNER{i}"),
                                    range(1, SENDERS)))
        seconds = time.perf_counter() - start
        megabytes = sum(p.stat().st_size for s in series[1:] for p in s.paths) / 1e6
        print(f"\ningest under load: {(SENDERS - 1) * SLICES} instances, {megabytes:.0f} MB in "
              f"{seconds:.1f} s ({megabytes / seconds:.0f} MB/s) over {SENDERS - 1} associations")
        assert all(r.returncode == 0 for r in results)
        rows = wait_for(lambda: (rows := node.get("/series")) and len(rows) == SENDERS
                        and all(r["state"] == "complete" for r in rows) and rows, 120, "all series complete")
        assert sorted(r["instances"] for r in rows) == [SLICES] * SENDERS
        wait_for(lambda: node.delivered(SENDERS), 600, "every series processed and delivered")
        assert {j["state"] for j in node.jobs()} == {"done"}
    assert len(pacs.files()) == 4 * SENDERS  # SEG, surfaces, SR, 3D preview

