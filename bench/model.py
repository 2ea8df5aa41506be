"""builtin_ct on two threads and on one, under the worker's allocator setting and glibc's default,
side by side in one run (on demand, not in CI).

    .venv/bin/python bench/model.py [--source real|phantom] [--slices 300] [--runs 6] [--cache DIR]

Each allocator setting runs in a fresh process (it applies to blocks allocated after it): glibc's
default, and blocks of 4 MB and more mapped on their own (``inference.memory.map_large_blocks``,
what every worker sets). Within a process the model runs alternately on two threads and on one
(the cores it may use, ``usable_cores``, set to 2 and to 1); the label maps are compared bit for
bit. Prints the median seconds, the process's peak resident memory during each prediction
(VmHWM, reset before each), what stays resident after it and ``malloc_trim`` (the process, not a
difference: freed blocks a thread's arena keeps count), the resident memory with the volume
loaded, and ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith(field + ":"))


def measure(paths: list[Path], runs: int) -> dict[str, Any]:
    """In this process: ``runs`` predictions on two threads and ``runs`` on one, alternated."""
    import numpy as np

    import vesalius.inference.device as device
    import vesalius.inference.models.builtin_ct as builtin_ct
    from vesalius.inference.memory import release_free_memory
    from vesalius.inference.series import load_series

    volume = load_series(paths)
    model = builtin_ct.BuiltinCT()
    ways = {"two threads": 2, "one thread": 1}
    first = None
    results: dict[str, Any] = {way: {"s": [], "peak": [], "after": []} for way in ways}
    release_free_memory()
    results["loaded"] = status_mb("VmRSS")
    for run in range(runs):
        for way in (list(ways) if run % 2 else list(ways)[::-1]):
            # builtin_ct's own steps and its on_two_threads chunks
            builtin_ct.usable_cores = device.usable_cores = lambda cores=ways[way]: cores
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            start = time.perf_counter()
            label_map = model.predict(volume)
            results[way]["s"].append(time.perf_counter() - start)
            results[way]["peak"].append(status_mb("VmHWM"))
            first = label_map if first is None else first
            if not np.array_equal(first, label_map):
                sys.exit("the label maps differ between runs")
            del label_map
            release_free_memory()
            results[way]["after"].append(status_mb("VmRSS"))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=("phantom", "real"), default="real")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/vesalius-bench"))
    parser.add_argument("--child", choices=("default", "mapped"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from bench.e2e import series_files

    args.j2k = False
    paths = series_files(args, args.slices, args.cache, 0)
    if args.child:
        if args.child == "mapped":
            from vesalius.inference.memory import map_large_blocks

            map_large_blocks()
        print(json.dumps(measure(paths, args.runs)))
        return
    table = {}
    for setting in ("default", "mapped"):
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", setting],
                               capture_output=True, text=True, check=True)
        table[setting] = json.loads(child.stdout)
    print(f"builtin_ct on {args.slices} {args.source} slices, {args.runs} runs each way, alternated")
    print(f"resident with the volume loaded: {table['default'].pop('loaded'):.0f} MB"
          f" (default), {table['mapped'].pop('loaded'):.0f} MB (mapped)")
    print(f"{'allocator':<26} {'threads':<12} {'median s':>9} {'peak MB':>8} {'resident after':>15}")
    for setting, label in (("default", "glibc default"), ("mapped", "blocks >= 4 MB mapped")):
        for way, got in table[setting].items():
            print(f"{label:<26} {way:<12} {statistics.median(got['s']):>9.2f} {max(got['peak']):>8.0f}"
                  f" {statistics.median(got['after']):>15.0f}")
    mapped = table["mapped"]
    two, one = (statistics.median(mapped[way]["s"]) for way in ("two threads", "one thread"))
    print(f"two threads / one thread (blocks mapped): {two / one:.2f}x time")
    print(f"peak of two threads, mapped / default: "
          f"{max(mapped['two threads']['peak']) / max(table['default']['two threads']['peak']):.2f}x")


if __name__ == "__main__":
    main()
