"""Time of the 3D preview on TotalSegmentator's example CT (run on demand, not in CI).

    .venv/bin/python bench/preview.py [--views 12] [--size 512] [--model total|builtin_ct]

Meshes of TotalSegmentator's reference labels (``--model total``, 100+ structures) or of builtin_ct's
labels, 100 000 triangles at most per structure as the pipeline makes them; then the render of
every view (VTK off-screen, decimated to the preview's triangle budget) and the DICOM object.
Prints the mesh count, the time to set the scene up (decimation, first frame), per view, and total
(best of three runs each).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from tests.realdata import nifti_labels_in_volume_space, write_nifti_as_dicom_series  # noqa: E402
from vesalius.dicom_out import render  # noqa: E402
from vesalius.dicom_out.identity import Algorithm  # noqa: E402
from vesalius.dicom_out.preview import build_preview, legend_entries  # noqa: E402
from vesalius.inference.measures import measure  # noqa: E402
from vesalius.inference.models import Label  # noqa: E402
from vesalius.inference.models.registry import resolve  # noqa: E402
from vesalius.inference.series import load_series  # noqa: E402
from vesalius.inference.surfaces import build_meshes  # noqa: E402
from vesalius.inference.terminology import TOTAL_CLASSES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=12)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--model", choices=("total", "builtin_ct"), default="total")
    args = parser.parse_args()
    data = ROOT.parent / "shared" / "data" / "totalseg-examples"
    with tempfile.TemporaryDirectory() as tmp:
        volume = load_series(write_nifti_as_dicom_series(data / "example_ct_sm.nii.gz", Path(tmp)))
    if args.model == "total":
        labels = nifti_labels_in_volume_space(data / "example_seg.nii.gz", volume).astype(np.uint8)
        defs = tuple(Label(value, name) for value, name in enumerate(TOTAL_CLASSES, start=1))
    else:
        model = resolve("builtin_ct")
        labels, defs = model.predict(volume), model.structures
    meshes = build_meshes(labels, volume.affine, defs)
    measurements = measure(volume, labels, defs, meshes)
    views = render.rotation_views(args.views)
    legend = legend_entries(meshes, measurements)
    def best_of_three(count: int) -> float:  # the machine may be shared: the least disturbed run
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            render.render_views(meshes, legend, views[:count], args.size)
            runs.append(time.perf_counter() - start)
        return min(runs)

    one, rendered = best_of_three(1), best_of_three(len(views))
    start = time.perf_counter()
    build_preview(volume, meshes, measurements, Algorithm("bench", "1"), views, args.size)
    built = time.perf_counter() - start
    per_view = (rendered - one) / max(len(views) - 1, 1)
    print(f"{len(meshes)} structures, {sum(len(m.triangles) for m in meshes)} triangles; "
          f"{len(views)} views of {args.size}x{args.size}")
    print(f"set-up + first view {one:.2f} s, then {per_view * 1000:.0f} ms per view; "
          f"render total {rendered:.2f} s; build_preview (render + DICOM) {built:.2f} s")


if __name__ == "__main__":
    main()
