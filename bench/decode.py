"""JPEG 2000 lossless decoding, pylibjpeg-openjpeg vs GDCM, on the same slices in one run.

    .venv/bin/python bench/decode.py [--slices 50] [--runs 3]

Encodes real CT slices from the shared test data (or the phantom when absent) as JPEG 2000
Lossless with pydicom, then decodes each with both plugins. Prints best-of-N milliseconds per
slice, the ratio and the load average. Needs python-gdcm, installed by hand
(`pip install python-gdcm`; not in an extra: pydicom would then prefer GDCM everywhere, tests included).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
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


def best_ms(datasets: list[pydicom.Dataset], plugin: str, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        for ds in datasets:
            ds.pixel_array_options(decoding_plugin=plugin)
            ds._pixel_array = None  # no cached array between plugins
            ds.pixel_array  # noqa: B018
        best = min(best, (time.perf_counter() - start) * 1000 / len(datasets))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    try:
        import gdcm  # noqa: F401
    except ImportError:
        sys.exit("python-gdcm is missing: .venv/bin/pip install python-gdcm (not in an extra on purpose)")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        datasets = slices(args.slices, Path(tmp))
    rows, cols = datasets[0].Rows, datasets[0].Columns
    openjpeg = best_ms(datasets, "pylibjpeg", args.runs)
    gdcm_ms = best_ms(datasets, "gdcm", args.runs)
    print(f"JPEG 2000 Lossless, {args.slices} slices of {rows}x{cols}, best of {args.runs}, one thread; "
          f"load average {os.getloadavg()[0]:.2f} (2 cores)")
    print(f"  pylibjpeg-openjpeg: {openjpeg:6.1f} ms/slice")
    print(f"  GDCM:               {gdcm_ms:6.1f} ms/slice")
    print(f"  openjpeg / GDCM:    {openjpeg / gdcm_ms:.2f}x")


if __name__ == "__main__":
    main()
