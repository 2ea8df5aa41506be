"""End-to-end latency of the node on a synthetic 512x512x300 chest CT (run on demand, not in CI).

    .venv/bin/python bench/e2e.py [--slices 300]

DCMTK storescu sends the series to `vesalius serve`, DCMTK storescp plays the PACS. Prints the time
from the last image acknowledged to the last result acknowledged by the PACS, the stage breakdown
the node recorded, and the peak resident memory of the node and its worker process.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.peers import storescp, storescu, vesalius_node, wait_for  # noqa: E402
from tests.phantoms import Cylinder, Sphere, write_phantom_series  # noqa: E402

CHEST = [
    Cylinder((0, 0, 0), (0, 0, 1), 160, 420, 40),
    Cylinder((80, -10, 0), (0, 0, 1), 60, 260, -850),
    Cylinder((-80, -10, 0), (0, 0, 1), 65, 260, -850),
    Cylinder((0, -20, 60), (0, 0, 1), 9, 200, -1000),
    Cylinder((0, 110, 0), (0, 0, 1), 18, 400, 700),
    Sphere((30, 0, -120), 40, 60),
]


def peak_rss_mb(pid: int) -> dict[str, float]:
    """VmHWM of a process and of its children, from /proc."""
    found = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        ppid, me = int(fields["PPid"]), int(fields["Pid"])
        if (me == pid or ppid == pid) and "VmHWM" in fields:
            found[f"{fields['Name'].strip()}[{me}]"] = int(fields["VmHWM"].split()[0]) / 1024
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        phantom = write_phantom_series(tmp / "ct", shape=(args.slices, 512, 512), spacing=(1.5, 0.75, 0.75),
                                       objects=CHEST)
        print(f"phantom written: {args.slices} slices in {time.perf_counter() - t0:.1f} s")
        with storescp(tmp / "pacs") as pacs, vesalius_node(tmp, destinations=[pacs.address]) as node:
            t_send = time.time()
            storescu(phantom.paths, node.port)
            t_last_image = time.time()
            delivered = wait_for(lambda: [d for d in node.deliveries() if d["state"] == "done"], 600,
                                 "the results at the PACS", interval=0.05)
            job = node.jobs()[0]
            rss = peak_rss_mb(node.proc.pid)
        stages = job["stages"]  # the API gives objects and ISO 8601 times

        def seconds(iso: str) -> float:
            return datetime.fromisoformat(iso).timestamp()

        send_s = seconds(delivered[0]["updated_at"]) - seconds(job["updated_at"])
        latency = seconds(delivered[0]["updated_at"]) - t_last_image
        print(f"ingest (storescu, {args.slices} slices): {t_last_image - t_send:.2f} s")
        print(f"last image -> all results acknowledged by the PACS: {latency:.2f} s (goal <= 10 s)")
        print("  includes the series quiet period (1 s) and the wait for a free worker")
        for stage, seconds in stages.items():
            print(f"  {stage:>10}: {seconds:6.2f} s")
        print(f"  {'send':>10}: {send_s:6.2f} s")
        for name, mb in sorted(rss.items()):
            print(f"peak RSS {name}: {mb:.0f} MB")
        print(f"peak RSS worst process: {max(rss.values()):.0f} MB (goal <= 1500 MB)")


if __name__ == "__main__":
    main()
