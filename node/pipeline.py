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
from vesalius.node.store import fsync_dir

if TYPE_CHECKING:
    import numpy as np

    from vesalius.inference.volume import Volume
    from vesalius.inference.volume_files import VolumeFile

# The DICOM objects of a job, by role; Encapsulated STL instances go to STL_DIR/<structure>.dcm.
OUTPUT_FILES = {"seg": "seg.dcm", "seg_labelmap": "seg_labelmap.dcm",
                "surface_segmentation": "surfaces.dcm", "sr": "sr.dcm", "preview": "preview.dcm"}
STL_DIR = "stl"
# Written first and delivered as soon as they are (OnResults): what every destination waits for.
FIRST_OBJECTS = ("seg", "seg_labelmap", "surface_segmentation", "sr")
GLB_FILE = "meshes/structures.glb"
THUMBNAIL_DIR = "thumbnails"  # axial.png, coronal.png, sagittal.png: key slices with the labels drawn
# The stages of a job, in order: progress reports "stage n of len(STAGES)". "writers": the SEG, SR
# and Surface Segmentation (the SEG is built from the start of "surfaces" on, beside them and the
# measures: "writers" is what is left of it); "preview": the 3D preview, STLs, meshes, thumbnails.
STAGES = ("volume", "model", "surfaces", "measures", "writers", "preview")
# Told each stage's name, number (from 1) and the count, as the stage starts.
OnStage = Callable[[str, int, int], None]
# Told (with the summary so far, "pending": true) once the results folder holds the SEG, SR and
# Surface Segmentation, so they are delivered while the "preview" stage still runs.
OnResults = Callable[[dict[str, Any]], None]


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
                 labelmap: bool = True, on_results: OnResults | None = None) -> dict[str, Any]:
    """Process one DICOM series into ``out_dir`` (replaced atomically) and return the summary.
    ``result_key`` (a study-level rule's) makes the output UIDs per study and rule. ``priors``
    (node.longitudinal.priors: plain data, by structure concept) go into the SR; ``labelmap``
    False leaves out the Label Map SEG (no destination of the job takes it: 2-3 s of writing).
    ``on_results``: the folder is replaced once the SEG, SR and surfaces are written, then told;
    the rest is added to it file by file, summary.json last."""
    from vesalius.inference.series import load_series

    timer = StageTimer(on_stage)
    with timer.stage("volume"):
        volume = load_series(paths)
    return _process(volume, None, timer, out_dir, model_name, max_triangles, result_key, priors,
                    labelmap, on_results)


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
             labelmap: bool = True, on_results: OnResults | None = None) -> dict[str, Any]:
    """Labels, meshes, measures and the output files of a volume; DICOM objects only for a DICOM
    series (``volume_file`` None), else the label map beside the input's format."""
    # Imported here, not at module level, so the listener process never loads VTK, highdicom and
    # the models: only the worker processes (and `vesalius process`) pay for them.
    import pydicom

    from vesalius.dicom_out.encapsulated_stl import build_encapsulated_stls
    from vesalius.dicom_out.gltf import write_glb
    from vesalius.dicom_out.identity import ARTIFICIAL_INTELLIGENCE, MORPHOLOGICAL_OPERATIONS, Algorithm
    from vesalius.dicom_out.preview import build_preview
    from vesalius.dicom_out.seg import BINARY, LABELMAP, build_seg, check_reference, seg_reference
    from vesalius.dicom_out.sr import Prior, build_sr
    from vesalius.dicom_out.stl import write_stl
    from vesalius.dicom_out.surface_segmentation import build_surface_segmentation
    from vesalius.dicom_out.thumbnails import write_thumbnails
    from vesalius.inference.measures import measure
    from vesalius.inference.models.registry import resolve
    from vesalius.inference.surfaces import build_meshes
    from vesalius.inference.volume_files import label_map_name
    from vesalius.node.forked import ForkedCall

    out = Path(out_dir)
    dicom = volume_file is None
    model = resolve(model_name)  # loaded once per process, reused by every later job
    family = MORPHOLOGICAL_OPERATIONS if model.family == "morphology" else ARTIFICIAL_INTELLIGENCE
    algorithm = Algorithm(name=model.name, version=model.version, family=family, result_key=result_key)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    objects: dict[str, Any] = {}
    seg: Any = None  # the BINARY SEG the surfaces, STLs and SR reference; none when nothing was measured
    files: dict[str, list[str]] = {"encapsulated_stl": [], "meshes": [], "thumbnails": []}

    def write(folder: Path, key: str, ds: Any) -> Any:
        ds.save_as(folder / OUTPUT_FILES[key], enforce_file_format=True)
        objects[key] = ds
        return ds

    def fork_seg(label_map: np.ndarray, key: str) -> ForkedCall:
        """Build and write a SEG in a child process (node.forked): it holds the GIL for seconds."""
        kind = LABELMAP if key == "seg_labelmap" else BINARY
        return ForkedCall(lambda: build_seg(volume, label_map, model.structures, algorithm,
                                            segmentation_type=kind).save_as(
            tmp / OUTPUT_FILES[key], enforce_file_format=True), name=f"the {kind} SEG writer")

    def written_seg(writer: ForkedCall, key: str) -> Any:
        """The header of a SEG its child wrote: what later objects reference (no pixel data)."""
        writer.result()
        objects[key] = pydicom.dcmread(tmp / OUTPUT_FILES[key], stop_before_pixels=True)
        return objects[key]

    def summary(pending: bool) -> dict[str, Any]:
        return _summary(volume, volume_file, model, measurements, objects, files, timer, pending)

    with timer.stage("model"):
        label_map = model.predict(volume)
    # The BINARY SEG needs only the label map: its child writes it while the surfaces and
    # measures run here, so the two cores share them. Unused (its error unraised) when nothing
    # is measured. The Label Map SEG follows it, not beside it (their memory would add up).
    seg_writer = fork_seg(label_map, "seg") if dicom and label_map.any() else None
    labelmap_writer: ForkedCall | None = None
    try:
        with timer.stage("surfaces"):
            meshes = build_meshes(label_map, volume.affine, model.structures, max_triangles=max_triangles)
        with timer.stage("measures"):
            measurements = measure(volume, label_map, model.structures, meshes)
        with timer.stage("writers"):  # nothing found: no objects
            if measurements and seg_writer is not None:
                # the SR and surfaces reference the BINARY SEG (the one every destination
                # receives) by what is known of it before its child has written it: its segments
                # are the measured structures
                seg = seg_reference(volume, [m.label for m in measurements], algorithm)
                write(tmp, "sr", build_sr(volume, seg, measurements, algorithm, label_map=label_map, priors={
                    concept: Prior(float(p["volume_ml"]), str(p["study_date"]))
                    for concept, p in (priors or {}).items()}))
                if meshes:
                    write(tmp, "surface_segmentation",
                          build_surface_segmentation(volume, meshes, algorithm, seg=seg))
                check_reference(seg, written_seg(seg_writer, "seg"))
                labelmap_writer = fork_seg(label_map, "seg_labelmap") if labelmap else None
                if labelmap_writer is not None:
                    written_seg(labelmap_writer, "seg_labelmap")
    finally:  # a failed job leaves no child writing
        for writer in (seg_writer, labelmap_writer):
            if writer is not None:
                writer.close()
    rest = tmp
    if on_results is not None and objects:  # the first objects go out while the rest is written
        first = summary(pending=True)
        _write_summary(tmp, first)
        _replace_dir(tmp, out)
        on_results(first)
        rest = out.with_name(f".{out.name}.rest")
        shutil.rmtree(rest, ignore_errors=True)
        rest.mkdir()
    with timer.stage("preview"), ThreadPoolExecutor(1) as pool:
        # the 3D preview renders (VTK, off-screen) while the meshes and STLs are written
        preview = pool.submit(lambda: write(rest, "preview", build_preview(
            volume, meshes, measurements, algorithm))) if meshes and dicom else None
        files["thumbnails"] = [f"{THUMBNAIL_DIR}/{path.name}" for path in write_thumbnails(
            volume, label_map, model.structures, rest / THUMBNAIL_DIR)]
        if volume_file is not None:  # research input: the label map in its own format, on its own grid
            volume_file.write_label_map(label_map, rest / label_map_name(volume_file.path))
        del label_map  # what is left needs the meshes and headers only (79 MB at 300 slices)
        if meshes and dicom:
            (rest / STL_DIR).mkdir()
            for mesh, ds in zip(meshes, build_encapsulated_stls(volume, meshes, algorithm, seg=seg),
                                strict=True):
                name = f"{safe_name(mesh.label.name)}.dcm"
                ds.save_as(inside(rest / STL_DIR, name), enforce_file_format=True)
                files["encapsulated_stl"].append(f"{STL_DIR}/{name}")
        (rest / "meshes").mkdir()
        for mesh in meshes:
            name = f"{safe_name(mesh.label.name)}.stl"
            write_stl(mesh, inside(rest / "meshes", name))
            files["meshes"].append(f"meshes/{name}")
        if meshes:
            write_glb(meshes, rest / GLB_FILE)
            files["meshes"].append(GLB_FILE)
        if preview is not None:
            preview.result()
    final = summary(pending=False)
    _write_summary(rest, final)
    if rest is tmp:
        _replace_dir(tmp, out)
    else:
        _move_into(rest, out)
    return final


def _summary(volume: Volume, volume_file: VolumeFile | None, model: Any, measurements: Sequence[Any],
             objects: Mapping[str, Any], files: Mapping[str, list[str]], timer: StageTimer,
             pending: bool) -> dict[str, Any]:
    """summary.json: what the job made (``pending``: the first objects only, the rest to come)."""
    from vesalius.dicom_out.sr import concept_key
    from vesalius.inference.measures import not_found
    from vesalius.inference.volume_files import label_map_name

    dicom = volume_file is None
    summary: dict[str, Any] = {
        "series_instance_uid": volume.series_uid if dicom else None,
        "study_instance_uid": volume.study_uid if dicom else None,
        "model": {"name": model.name, "version": model.version},
        "shape": list(volume.array.shape),
        "spacing_mm": [round(float(s), 4) for s in volume.spacing],
        "objects": {key: {"file": OUTPUT_FILES[key], "sop_class_uid": str(ds.SOPClassUID),
                          "sop_instance_uid": str(ds.SOPInstanceUID),
                          "series_instance_uid": str(ds.SeriesInstanceUID)}
                    for key, ds in ((key, objects[key]) for key in OUTPUT_FILES if key in objects)},
        "encapsulated_stl": list(files["encapsulated_stl"]),
        "meshes": list(files["meshes"]),
        "thumbnails": list(files["thumbnails"]),
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
        "stages_s": dict(timer.seconds),
    }
    if pending:  # the 3D preview, Encapsulated STLs, meshes and thumbnails are still being written
        summary["pending"] = True
    if volume_file is not None:
        summary["input"] = {"file": volume_file.path.name, "modality": volume.modality,
                            "label_map": label_map_name(volume_file.path)}
        # the label map's values: what `vesalius evaluate` reads it by (includes: the body holds the lungs)
        summary["labels"] = [{"value": label.value, "name": label.name, "includes": list(label.includes)}
                             for label in model.structures]
    return summary


def _write_summary(folder: Path, summary: Mapping[str, Any]) -> None:
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))


def _move_into(new: Path, target: Path) -> None:
    """Add a finished folder's files to the results folder, each by an atomic rename after it is
    on disk (summary.json last, replacing the first one), so readers see whole files only."""
    entries = sorted(new.iterdir(), key=lambda p: p.name == "summary.json")
    _fsync_tree(new)
    for entry in entries:
        old = target / entry.name
        if old.is_dir():
            shutil.rmtree(old)
        os.replace(entry, old)
    fsync_dir(target)
    new.rmdir()


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _replace_dir(new: Path, target: Path) -> None:
    """Swap a finished results folder into place, so readers never see a half-written one."""
    _fsync_tree(new)
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
