"""One series in, every output object out: volume -> label map -> surfaces -> measures -> DICOM files.

Pure computation on files (no network, no database), shared by the worker processes of
``vesalius serve`` and by ``vesalius process``, so both paths produce the same objects.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vesalius.inference.memory import release_free_memory
from vesalius.node.paths import inside, safe_name

if TYPE_CHECKING:
    from vesalius.inference.volume import Volume
    from vesalius.inference.volume_files import VolumeFile

# The DICOM objects of a job, by role; Encapsulated STL instances go to STL_DIR/<structure>.dcm.
OUTPUT_FILES = {"seg": "seg.dcm", "seg_labelmap": "seg_labelmap.dcm",
                "surface_segmentation": "surfaces.dcm", "sr": "sr.dcm", "preview": "preview.dcm"}
STL_DIR = "stl"
GLB_FILE = "meshes/structures.glb"
THUMBNAIL_DIR = "thumbnails"  # axial.png, coronal.png, sagittal.png: key slices with the labels drawn
# The stages of a job, in order: progress reports "stage n of len(STAGES)".
STAGES = ("volume", "model", "surfaces", "measures", "writers")
# Told each stage's name, number (from 1) and the count, as the stage starts.
OnStage = Callable[[str, int, int], None]


class StageTimer:
    """Wall-clock seconds per pipeline stage, for the job row, metrics and the benchmark;
    ``on_stage`` hears each stage start (the worker's live progress, the CLI's progress bar)."""

    def __init__(self, on_stage: OnStage | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.on_stage = on_stage

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.on_stage is not None:  # a stage not in STAGES (yet) is counted, never an error
            n = STAGES.index(name) + 1 if name in STAGES else len(self.seconds) + 1
            self.on_stage(name, n, max(len(STAGES), n))
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 4)
            release_free_memory()  # the stage's freed temporaries, before the next stage's peak


def run_pipeline(paths: Sequence[str | Path], out_dir: str | Path, model_name: str,
                 max_triangles: int = 100_000, result_key: str = "",
                 on_stage: OnStage | None = None,
                 priors: Mapping[str, Mapping[str, Any]] | None = None,
                 labelmap: bool = True) -> dict[str, Any]:
    """Process one DICOM series into ``out_dir`` (replaced atomically) and return the summary.
    ``result_key`` (a study-level rule's) makes the output UIDs per study and rule. ``priors``
    (node.longitudinal.priors: plain data, by structure concept) go into the SR; ``labelmap``
    False leaves out the Label Map SEG (no destination of the job takes it: 2-3 s of writing)."""
    from vesalius.inference.series import load_series

    timer = StageTimer(on_stage)
    with timer.stage("volume"):
        volume = load_series(paths)
    return _process(volume, None, timer, out_dir, model_name, max_triangles, result_key, priors,
                    labelmap)


def run_pipeline_on_file(path: str | Path, out_dir: str | Path, model_name: str, modality: str = "CT",
                         max_triangles: int = 100_000, on_stage: OnStage | None = None) -> dict[str, Any]:
    """Process a NIfTI or NRRD volume (research data) into ``out_dir``: the label map in the
    input's format and layout, the meshes and the summary; no DICOM objects (there is no DICOM
    source for them to reference)."""
    from vesalius.inference.volume_files import read_volume_file

    timer = StageTimer(on_stage)
    with timer.stage("volume"):
        volume_file = read_volume_file(path, modality)
    return _process(volume_file.volume, volume_file, timer, out_dir, model_name, max_triangles, "")


def _process(volume: Volume, volume_file: VolumeFile | None, timer: StageTimer, out_dir: str | Path,
             model_name: str, max_triangles: int, result_key: str,
             priors: Mapping[str, Mapping[str, Any]] | None = None,
             labelmap: bool = True) -> dict[str, Any]:
    """Labels, meshes, measures and the output files of a volume; DICOM objects only for a DICOM
    series (``volume_file`` None), else the label map beside the input's format."""
    # Imported here, not at module level, so the listener process never loads VTK, highdicom and
    # the models: only the worker processes (and `vesalius process`) pay for them.
    from vesalius.dicom_out.encapsulated_stl import build_encapsulated_stls
    from vesalius.dicom_out.gltf import write_glb
    from vesalius.dicom_out.identity import ARTIFICIAL_INTELLIGENCE, MORPHOLOGICAL_OPERATIONS, Algorithm
    from vesalius.dicom_out.preview import build_preview
    from vesalius.dicom_out.seg import LABELMAP, build_seg
    from vesalius.dicom_out.sr import Prior, build_sr, concept_key
    from vesalius.dicom_out.stl import write_stl
    from vesalius.dicom_out.surface_segmentation import build_surface_segmentation
    from vesalius.dicom_out.thumbnails import write_thumbnails
    from vesalius.inference.measures import measure, not_found
    from vesalius.inference.models.registry import resolve
    from vesalius.inference.surfaces import build_meshes
    from vesalius.inference.volume_files import label_map_name

    out = Path(out_dir)
    dicom = volume_file is None
    model = resolve(model_name)  # loaded once per process, reused by every later job
    with timer.stage("model"):
        label_map = model.predict(volume)
    with timer.stage("surfaces"):
        meshes = build_meshes(label_map, volume.affine, model.structures, max_triangles=max_triangles)
    with timer.stage("measures"):
        measurements = measure(volume, label_map, model.structures, meshes)
    family = MORPHOLOGICAL_OPERATIONS if model.family == "morphology" else ARTIFICIAL_INTELLIGENCE
    algorithm = Algorithm(name=model.name, version=model.version, family=family, result_key=result_key)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "meshes").mkdir(parents=True)
    objects = {}
    seg: Any = None  # the BINARY SEG the surfaces, STLs and SR reference; none when nothing was measured

    def write(key: str, ds: Any) -> Any:
        ds.save_as(tmp / OUTPUT_FILES[key], enforce_file_format=True)
        objects[key] = ds
        return ds

    with timer.stage("writers"), ThreadPoolExecutor(3) as pool:  # nothing found: no objects
        if measurements and dicom:
            seg = write("seg", build_seg(volume, label_map, model.structures, algorithm))
        # the 3D preview renders (VTK, off-screen) while the other objects are written; after the
        # BINARY SEG, whose masks are the job's largest arrays, so their memory does not add up
        preview = pool.submit(lambda: write("preview", build_preview(
            volume, meshes, measurements, algorithm))) if meshes and dicom else None
        if measurements and dicom:
            # after the BINARY SEG, not beside it: their masks are the largest arrays of the job,
            # and its RLE encoder holds the GIL, so side by side they only added up in memory
            labelmap_seg = pool.submit(lambda: write("seg_labelmap", build_seg(
                volume, label_map, model.structures, algorithm,
                segmentation_type=LABELMAP))) if labelmap else None
            # the SR references the BINARY SEG: the one every destination receives
            write("sr", build_sr(volume, seg, measurements, algorithm, label_map=label_map, priors={
                concept: Prior(float(p["volume_ml"]), str(p["study_date"]))
                for concept, p in (priors or {}).items()}))
        if meshes and dicom:
            write("surface_segmentation", build_surface_segmentation(volume, meshes, algorithm, seg=seg))
        stls = build_encapsulated_stls(volume, meshes, algorithm, seg=seg) if meshes and dicom else []
        if dicom:
            (tmp / STL_DIR).mkdir()
        for mesh, ds in zip(meshes if dicom else [], stls, strict=True):
            ds.save_as(inside(tmp / STL_DIR, f"{safe_name(mesh.label.name)}.dcm"), enforce_file_format=True)
        mesh_files = [write_stl(m, inside(tmp / "meshes", f"{safe_name(m.label.name)}.stl")).name
                      for m in meshes]
        if meshes:
            write_glb(meshes, tmp / GLB_FILE)
        thumbnails = write_thumbnails(volume, label_map, model.structures, tmp / THUMBNAIL_DIR)
        if measurements and dicom and labelmap_seg is not None:
            labelmap_seg.result()
        if preview is not None:
            preview.result()
        if volume_file is not None:  # research input: the label map in its own format, on its own grid
            volume_file.write_label_map(label_map, tmp / label_map_name(volume_file.path))
    objects = {key: objects[key] for key in OUTPUT_FILES if key in objects}  # a stable order
    summary = {
        "series_instance_uid": volume.series_uid if dicom else None,
        "study_instance_uid": volume.study_uid if dicom else None,
        "model": {"name": model.name, "version": model.version},
        "shape": list(volume.array.shape),
        "spacing_mm": [round(float(s), 4) for s in volume.spacing],
        "objects": {key: {"file": OUTPUT_FILES[key], "sop_class_uid": str(ds.SOPClassUID),
                          "sop_instance_uid": str(ds.SOPInstanceUID),
                          "series_instance_uid": str(ds.SeriesInstanceUID)}
                    for key, ds in objects.items()},
        "encapsulated_stl": [f"{STL_DIR}/{safe_name(m.label.name)}.dcm" for m in meshes] if dicom else [],
        "meshes": [f"meshes/{name}" for name in mesh_files] + ([GLB_FILE] if meshes else []),
        "thumbnails": [f"{THUMBNAIL_DIR}/{path.name}" for path in thumbnails],
        # at reported precision; "complete": false when the scan cuts the structure
        "structures": [
            {"name": m.label.name, "concept": concept_key(m.label.name), "voxels": m.voxel_count,
             "volume_ml": m.volume_ml,
             "surface_area_cm2": m.surface_area_cm2, "mean": m.mean, "std": m.std,
             "complete": not m.incomplete}
            for m in (measurement.rounded() for measurement in measurements)
        ],
        # declared by the model, not found in this series: listed, never silently dropped
        "not_found": [label.name for label in not_found(model.structures, measurements)],
        "stages_s": timer.seconds,
    }
    if volume_file is not None:
        summary["input"] = {"file": volume_file.path.name, "modality": volume.modality,
                            "label_map": label_map_name(volume_file.path)}
        # the label map's values: what `vesalius evaluate` reads it by (includes: the body holds the lungs)
        summary["labels"] = [{"value": label.value, "name": label.name, "includes": list(label.includes)}
                             for label in model.structures]
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    _replace_dir(tmp, out)
    return summary


def _replace_dir(new: Path, target: Path) -> None:
    """Swap a finished results folder into place, so readers never see a half-written one."""
    for f in new.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
