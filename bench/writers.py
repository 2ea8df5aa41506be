"""SEG writers and surfaces side by side on one label map, in one run (on demand, not in CI).

    .venv/bin/python bench/writers.py [--slices 300] [--runs 3] [--cache DIR]

On the chest phantom of bench/e2e.py (builtin_ct's label map: body containing lungs and bone):
- our BINARY SEG (dicom_out.seg) vs highdicom fed the plain (slices, rows, cols, segments) stack
  (this node before; highdicom's overlap path) vs highdicom fed a 3-D label array (the common
  exporter form, which cannot hold the overlapping body) vs dcmqi's itkimage2segimage (C++);
- our surfaces (inference.surfaces) vs scikit-image ``marching_cubes`` per label (bench extra).
Prints best-of-N seconds, peak RSS growth of each in-process writer, the load average, and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.e2e import CHEST  # noqa: E402
from tests.dicom_checks import tool  # noqa: E402
from tests.phantoms import write_phantom_series  # noqa: E402


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakSampler:
    """The highest RSS seen (every 2 ms) while the block runs."""

    def __init__(self) -> None:
        self.mb = rss_mb()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.mb = max(self.mb, rss_mb())
            time.sleep(0.002)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()


def measured(call: Callable[[], Any], runs: int) -> tuple[float, float]:
    """(best wall seconds of ``runs``, peak RSS growth in MB over the call) of one in-process call."""
    from vesalius.inference.memory import release_free_memory

    best, growth = float("inf"), 0.0
    for _ in range(runs):
        release_free_memory()
        base, peak = rss_mb(), PeakSampler()
        start = time.perf_counter()
        with peak:
            result = call()
        best = min(best, time.perf_counter() - start)
        growth = max(growth, peak.mb - base)
        del result
    return best, growth


def series(slices: int, cache: Path | None, tmp: Path) -> list[Path]:
    folder = (cache or tmp) / f"chest{slices}"
    if not (folder / "done").exists():
        write_phantom_series(folder, shape=(slices, 512, 512), spacing=(1.5, 0.75, 0.75), objects=CHEST)
        (folder / "done").write_text("")
    return sorted(folder.glob("*.dcm"))


def dcmqi_seg(paths: list[Path], label_map: np.ndarray, volume: Any, present: list[Any], out: Path) -> None:
    """itkimage2segimage with one NRRD per segment (so the body may overlap), same source files."""
    import SimpleITK as sitk

    out.mkdir(parents=True, exist_ok=True)
    spacing = volume.spacing
    directions = volume.affine[:3, :3] / spacing
    images, attributes = [], []
    for number, label in enumerate(present, start=1):
        image = sitk.GetImageFromArray(label.mask(label_map).astype(np.uint8) * number)
        image.SetSpacing([float(s) for s in spacing[::-1]])
        image.SetOrigin([float(v) for v in volume.affine[:3, 3]])
        image.SetDirection([float(v) for v in directions[:, ::-1].ravel()])
        path = out / f"segment{number}.nrrd"
        sitk.WriteImage(image, str(path), useCompression=False)
        images.append(str(path))
        attributes.append([{"labelID": number, "SegmentLabel": label.name,
                            "SegmentAlgorithmType": "AUTOMATIC", "SegmentAlgorithmName": "builtin_ct",
                            "SegmentedPropertyCategoryCodeSequence": {
                                "CodeValue": "123037004", "CodingSchemeDesignator": "SCT",
                                "CodeMeaning": "Anatomical Structure"},
                            "SegmentedPropertyTypeCodeSequence": {
                                "CodeValue": "39607008", "CodingSchemeDesignator": "SCT",
                                "CodeMeaning": "Lung"},
                            "recommendedDisplayRGBValue": [128, 174, 128]}])
    meta = {"ContentCreatorName": "Bench", "ClinicalTrialSeriesID": "1", "ClinicalTrialTimePointID": "1",
            "SeriesDescription": "dcmqi", "SeriesNumber": "300", "InstanceNumber": "1",
            "BodyPartExamined": "CHEST", "segmentAttributes": attributes}
    (out / "meta.json").write_text(json.dumps(meta))
    dicom_dir = out / "dicom"
    dicom_dir.mkdir(exist_ok=True)
    for path in paths:
        link = dicom_dir / path.name
        if not link.exists():
            link.symlink_to(path)
    start = time.perf_counter()
    subprocess.run([tool("itkimage2segimage"), "--inputImageList", ",".join(images),
                    "--inputDICOMDirectory", str(dicom_dir), "--inputMetadata", str(out / "meta.json"),
                    "--outputDICOM", str(out / "seg.dcm"), "--skip"], check=True, capture_output=True,
                   timeout=1200)
    dcmqi_seg.seconds = time.perf_counter() - start  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache", type=Path, help="keep the phantom series here between runs")
    parser.add_argument("--no-dcmqi", action="store_true", help="skip dcmqi (it takes a while)")
    args = parser.parse_args()
    try:
        from skimage.measure import marching_cubes
    except ImportError:
        sys.exit("scikit-image is missing: pip install -e '.[bench]' (the bench extra)")
    import highdicom as hd

    from vesalius.dicom_out import seg as seg_module
    from vesalius.dicom_out.identity import Algorithm
    from vesalius.dicom_out.seg import LABELMAP, build_seg
    from vesalius.inference.models.registry import resolve
    from vesalius.inference.series import load_series
    from vesalius.inference.surfaces import build_meshes

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        paths = series(args.slices, args.cache, tmp)
        volume = load_series(paths)
        model = resolve("builtin_ct")
        label_map = model.predict(volume)
        algorithm = Algorithm("builtin_ct", "1")
        present = [label for label in model.structures if label.mask(label_map).any()]
        results: dict[str, tuple[float, float]] = {}
        results["ours BINARY"] = measured(lambda: build_seg(volume, label_map, model.structures, algorithm),
                                          args.runs)

        def plain_stack() -> Any:
            original = seg_module.Segmentation, seg_module._binary_stack
            seg_module.Segmentation = hd.seg.Segmentation
            seg_module._binary_stack = lambda lm, labels: np.stack([lb.mask(lm) for lb in labels], axis=-1)
            try:
                return build_seg(volume, label_map, model.structures, algorithm)
            finally:
                seg_module.Segmentation, seg_module._binary_stack = original

        results["highdicom 4-D stack (before)"] = measured(plain_stack, args.runs)
        organs = [label for label in model.structures if not label.includes]  # a label array holds no overlap
        results["highdicom 3-D label array"] = measured(
            lambda: build_seg(volume, label_map, organs, algorithm), args.runs)
        results["ours LABELMAP (RLE)"] = measured(
            lambda: build_seg(volume, label_map, model.structures, algorithm, segmentation_type=LABELMAP),
            args.runs)
        if not args.no_dcmqi:
            dcmqi_seg(paths, label_map, volume, present, tmp / "dcmqi")
            results["dcmqi itkimage2segimage"] = (dcmqi_seg.seconds, float("nan"))  # type: ignore[attr-defined]
        results["ours surfaces"] = measured(lambda: build_meshes(label_map, volume.affine, model.structures),
                                            args.runs)

        def skimage_per_label() -> list[Any]:
            spacing = tuple(float(s) for s in volume.spacing)
            return [marching_cubes(label.mask(label_map).astype(np.uint8), 0.5, spacing=spacing)
                    for label in present]

        results["scikit-image marching_cubes"] = measured(skimage_per_label, 1)
    print(f"{args.slices} slices of 512x512, {len(present)} segments, best of {args.runs}; "
          f"load average {os.getloadavg()[0]:.2f} (2 cores)")
    for name, (seconds, growth) in results.items():
        print(f"  {name:>30}: {seconds:6.2f} s   peak RSS +{growth:5.0f} MB")
    ours = results["ours BINARY"][0]
    for name in ("highdicom 4-D stack (before)", "highdicom 3-D label array", "dcmqi itkimage2segimage"):
        if name in results:
            print(f"  {name} / ours BINARY: {results[name][0] / ours:.2f}x")
    print(f"  scikit-image / ours surfaces: "
          f"{results['scikit-image marching_cubes'][0] / results['ours surfaces'][0]:.2f}x")


if __name__ == "__main__":
    main()
