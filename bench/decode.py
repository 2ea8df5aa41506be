"""JPEG 2000 lossless decoding, pylibjpeg-openjpeg vs imagecodecs vs GDCM, on the same slices in
one run, each in one thread and in as many threads as there are cores.

    .venv/bin/python bench/decode.py [--slices 50] [--runs 3]

Encodes real CT slices from the shared test data (or the phantom when absent) as JPEG 2000
Lossless with pydicom, then decodes them through pydicom with each plugin: pylibjpeg
(pylibjpeg-openjpeg, pydicom's default), imagecodecs (inference/series/j2k.py, what
inference/series/read.py uses) and GDCM. Wall-clock milliseconds per slice, best of N, for 1 and
N threads: a plugin that holds the GIL is no faster in N threads. Prints the load average (other
work on the machine takes cores from the N-thread rows). GDCM is optional, installed by hand
(`pip install python-gdcm`, best into a separate folder on PYTHONPATH: once installed, pydicom
prefers it everywhere, tests included).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402
from pydicom.uid import JPEG2000Lossless  # noqa: E402

from tests.phantoms import Cylinder, write_phantom_series  # noqa: E402


def slices(count: int, tmp: Path) -> list[pydicom.Dataset]:
    real = sorted((ROOT.parent / "shared" / "data" / "ct-3slice-ge").glob("0*.dcm"))
    if not real:
        real = write_phantom_series(tmp, shape=(3, 512, 512), spacing=(1, 0.7, 0.7),
                                    objects=[Cylinder((0, 0, 0), (0, 0, 1), 150, 1000, 40)]).paths
    out = []
    for i in range(count):
        ds = pydicom.dcmread(real[i % len(real)])
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        out.append(ds)
    return out


def best_ms(datasets: list[pydicom.Dataset], plugin: str, runs: int, threads: int) -> float:
    def decode(ds: pydicom.Dataset) -> None:
        ds.pixel_array_options(decoding_plugin=plugin)
        ds._pixel_array = None  # no cached array between plugins
        ds.pixel_array  # noqa: B018

    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(runs):
            start = time.perf_counter()
            list(pool.map(decode, datasets))
            best = min(best, (time.perf_counter() - start) * 1000 / len(datasets))
    return best


def gil_stall_ms(datasets: list[pydicom.Dataset], plugin: str) -> float:
    """The longest a pure-Python thread waited while the decodes ran beside it: about one slice's
    decode when the plugin holds the GIL, a few ms (the OS scheduler's) when it releases it."""
    stop = threading.Event()
    ticks: list[float] = []

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            sum(range(100))

    ticker = threading.Thread(target=tick)
    ticker.start()
    for ds in datasets:
        ds.pixel_array_options(decoding_plugin=plugin)
        ds._pixel_array = None
        ds.pixel_array  # noqa: B018
    stop.set()
    ticker.join()
    return max(b - a for a, b in zip(ticks, ticks[1:], strict=False)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from vesalius.inference.series import j2k

    plugins = ["pylibjpeg"]
    if j2k.register():
        plugins.append(j2k.PLUGIN)
    else:
        print("imagecodecs is missing (a dependency of the node): pip install imagecodecs")
    try:
        import gdcm  # noqa: F401

        plugins.append("gdcm")
    except ImportError:
        print("python-gdcm is missing (optional): pip install --target DIR python-gdcm; PYTHONPATH=DIR")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        datasets = slices(args.slices, Path(tmp))
    rows, cols = datasets[0].Rows, datasets[0].Columns
    cores = len(os.sched_getaffinity(0))
    print(f"JPEG 2000 Lossless, {args.slices} slices of {rows}x{cols}, best of {args.runs}; "
          f"load average {os.getloadavg()[0]:.2f} ({cores} cores)")
    print(f"  {'plugin':14s} {'1 thread':>10s} {f'{cores} threads':>11s}  speed-up  "
          "longest GIL wait of a Python thread beside it")
    one = {}
    for plugin in plugins:
        one[plugin] = best_ms(datasets, plugin, args.runs, 1)
        many = best_ms(datasets, plugin, args.runs, cores)
        stall = gil_stall_ms(datasets, plugin)
        print(f"  {plugin:14s} {one[plugin]:7.1f} ms {many:8.1f} ms  {one[plugin] / many:6.2f}x  "
              f"{stall:6.1f} ms")
    for plugin in plugins[1:]:
        print(f"  pylibjpeg / {plugin}, one thread: {one['pylibjpeg'] / one[plugin]:.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
