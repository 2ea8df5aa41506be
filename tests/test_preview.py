"""3D preview series: a dciodvfy-clean Multi-frame True Color SC whose views show the structures in
their own colours, with the patient's left on the image's right in the anterior view."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.dicom_checks import assert_dciodvfy_clean
from tests.dicom_out_inputs import phantom_volume, sphere_mesh
from vesalius.dicom_out.identity import Algorithm, derived_uid
from vesalius.dicom_out.preview import MULTIFRAME_TRUE_COLOR_SC, VIEW_COUNT, build_preview
from vesalius.dicom_out.render import direction_label, rotation_views
from vesalius.inference.measures import Measurement
from vesalius.inference.models import Label
from vesalius.inference.terminology import term_for

ALGORITHM = Algorithm("builtin_ct", "1")
# Asymmetric: the liver on the patient's right (-x in LPS), the airways (light blue, unlike any
# other colour here) on the patient's left, higher up, and a bone behind them.
LIVER, AIRWAYS, BONE = Label(1, "liver"), Label(2, "airways"), Label(3, "bone")
MESHES = (
    sphere_mesh(LIVER, (-14.0, 0.0, 0.0), 8.0, resolution=48),
    sphere_mesh(AIRWAYS, (14.0, 0.0, 6.0), 6.0, resolution=48),
    sphere_mesh(BONE, (0.0, 14.0, -6.0), 4.0, resolution=48),
)
MEASUREMENTS = (
    Measurement(LIVER, 2144, 2.14451, 8.0, 60.0, 10.0, key_slice=7),
    Measurement(AIRWAYS, 905, 0.9048, 4.5, -950.0, 20.0, key_slice=7, incomplete=True),
    Measurement(BONE, 268, 0.268, 2.0, 700.0, 30.0, key_slice=7),
)
ANTERIOR, LEFT_LATERAL, POSTERIOR = 0, VIEW_COUNT // 4, VIEW_COUNT // 2


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory):
    return phantom_volume(tmp_path_factory.mktemp("preview-phantom"))[0]


@pytest.fixture(scope="module")
def written(volume, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("preview") / "preview.dcm"
    build_preview(volume, MESHES, MEASUREMENTS, ALGORITHM).save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def frames(written: Path) -> np.ndarray:
    return pydicom.dcmread(written).pixel_array


def _pixels_of(image: np.ndarray, name: str) -> np.ndarray:
    """(row, col) of lit pixels with the structure's hue, above the legend (bottom quarter)."""
    rgb = np.asarray(term_for(name).rgb, float)
    body = image[: image.shape[0] * 3 // 4].astype(float)
    norms = np.linalg.norm(body, axis=-1)
    similarity = (body @ rgb) / np.maximum(norms * np.linalg.norm(rgb), 1e-9)
    return np.argwhere((similarity > 0.998) & (norms > 0.4 * np.linalg.norm(rgb)))


def test_preview_passes_dciodvfy(written: Path) -> None:
    assert_dciodvfy_clean(written)


def test_a_multiframe_true_colour_sc_in_the_source_study(volume, written: Path) -> None:
    ds = pydicom.dcmread(written)
    assert ds.SOPClassUID == MULTIFRAME_TRUE_COLOR_SC
    assert (ds.PhotometricInterpretation, ds.SamplesPerPixel) == ("RGB", 3)
    assert int(ds.NumberOfFrames) == VIEW_COUNT and (ds.Rows, ds.Columns) == (512, 512)
    assert ds.StudyInstanceUID == volume.study_uid
    assert ds.PatientID == volume.sources[0].PatientID
    assert ds.SeriesInstanceUID == derived_uid(volume.series_uid, ALGORITHM, "preview/series")
    assert ds.SOPInstanceUID == derived_uid(volume.series_uid, ALGORITHM, "preview/instance")
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.series_uid
    assert "anterior" in ds.DerivationDescription and ds.DerivationDescription.isascii()
    assert {item.ReferencedSOPInstanceUID for item in ds.SourceImageSequence} == {
        s.SOPInstanceUID for s in volume.sources}


def test_views_are_not_blank_and_show_every_structure_in_its_colour(frames: np.ndarray) -> None:
    for image in frames:
        assert np.count_nonzero(image.max(axis=-1) > 30) > 0.05 * image.shape[0] * image.shape[1]
    anterior = frames[ANTERIOR]
    for mesh in MESHES:
        assert len(_pixels_of(anterior, mesh.label.name)) > 200, mesh.label.name


def test_patient_left_is_on_the_image_right_from_the_front(frames: np.ndarray) -> None:
    def column(view: int, name: str) -> float:
        return float(_pixels_of(frames[view], name)[:, 1].mean())

    width = frames.shape[2]
    assert column(ANTERIOR, "airways") > width / 2 > column(ANTERIOR, "liver")
    assert column(POSTERIOR, "airways") < width / 2 < column(POSTERIOR, "liver")  # seen from behind
    # superior at the top: the airways sit higher than the liver in every view
    rows = {name: float(_pixels_of(frames[ANTERIOR], name)[:, 0].mean()) for name in ("airways", "liver")}
    assert rows["airways"] < rows["liver"]
    # from the patient's left, the bone (posterior) is on the image's right
    assert column(LEFT_LATERAL, "bone") > width / 2


def test_legend_swatches_carry_the_exact_colours(frames: np.ndarray) -> None:
    legend = frames[ANTERIOR][frames.shape[1] * 3 // 4:]
    for mesh in MESHES:
        rgb = np.asarray(term_for(mesh.label.name).rgb, np.uint8)
        assert np.count_nonzero(np.all(legend == rgb, axis=-1)) >= 25, mesh.label.name


def test_views_and_their_direction_labels() -> None:
    views = rotation_views(12)
    assert [v.name for v in views[::3]] == ["anterior", "left lateral", "posterior", "right lateral"]
    assert direction_label(np.array([1.0, 0.0, 0.0])) == "L"
    assert direction_label(np.array([0.0, -1.0, 0.0])) == "A"
    assert direction_label(np.array([-0.5, 0.866, 0.0])) == "PR"


def test_rerun_gives_the_same_uids(volume) -> None:
    views = rotation_views(2)
    first = build_preview(volume, MESHES[:1], MEASUREMENTS, ALGORITHM, views=views, size=64)
    again = build_preview(volume, MESHES[:1], MEASUREMENTS, ALGORITHM, views=views, size=64)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID,
                                                               again.SOPInstanceUID)
    assert first.PixelData == again.PixelData
    with pytest.raises(ValueError, match="nothing to render"):
        build_preview(volume, [], MEASUREMENTS, ALGORITHM)


def test_pipeline_writes_the_preview_and_an_honest_summary(tmp_path: Path) -> None:
    """A 3-slice-like chest slab through builtin_ct: every structure is cut by the first and last
    slices, the airways are declared but absent, and the preview is among the objects."""
    import json

    from tests.phantoms import Cylinder, write_phantom_series
    from vesalius.node.pipeline import OUTPUT_FILES, run_pipeline

    chest = [Cylinder((0, 0, 0), (0, 0, 1), 90, 120, 40),
             Cylinder((45, -5, 5), (0, 0, 1), 30, 80, -850),  # the patient's left lung (+x)
             Cylinder((-45, -5, 5), (0, 0, 1), 33, 80, -850),
             Cylinder((0, 55, 0), (0, 0, 1), 16, 100, 700)]
    series = write_phantom_series(tmp_path / "slab", shape=(6, 96, 96), spacing=(3.0, 2.2, 2.2),
                                  objects=chest)
    summary = run_pipeline(series.paths, tmp_path / "out", "builtin_ct")
    assert summary == json.loads((tmp_path / "out" / "summary.json").read_text())
    preview = pydicom.dcmread(tmp_path / "out" / OUTPUT_FILES["preview"])
    assert summary["objects"]["preview"]["sop_instance_uid"] == preview.SOPInstanceUID
    assert preview.SOPClassUID == MULTIFRAME_TRUE_COLOR_SC and preview.StudyInstanceUID == series.study_uid
    structures = {s["name"]: s for s in summary["structures"]}
    assert {"body", "lung_left", "lung_right", "bone"} <= set(structures)
    assert not any(s["complete"] for s in structures.values())  # the slab cuts every one
    assert "airways" in summary["not_found"] and not set(summary["not_found"]) & set(structures)
    for s in structures.values():
        assert s["volume_ml"] == round(s["volume_ml"], 1) and s["mean"] == round(s["mean"])


def test_first_objects_are_in_place_before_the_preview_is_written(tmp_path: Path) -> None:
    """``on_results`` hears of the SEG, SR and surfaces once they lie in the results folder and
    the 3D preview, STLs and meshes do not yet; then those are added, summary.json last."""
    import json

    from tests.phantoms import Cylinder, write_phantom_series
    from vesalius.node.pipeline import FIRST_OBJECTS, OUTPUT_FILES, run_pipeline

    series = write_phantom_series(tmp_path / "ct", shape=(8, 64, 64), spacing=(3.0, 3.0, 3.0), objects=[
        Cylinder((0, 0, 0), (0, 0, 1), 70, 120, 40), Cylinder((30, 0, 0), (0, 0, 1), 20, 80, -850)])
    out = tmp_path / "out"
    seen: dict[str, object] = {}

    def on_results(summary: dict) -> None:
        seen["files"] = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
        seen["summary"] = summary
        seen["on_disk"] = json.loads((out / "summary.json").read_text())

    for run in range(2):  # a re-run replaces the earlier results the same way
        final = run_pipeline(series.paths, out, "builtin_ct", labelmap=False, on_results=on_results)
        first = sorted(OUTPUT_FILES[key] for key in FIRST_OBJECTS if key != "seg_labelmap")
        assert seen["files"] == sorted([*first, "summary.json"]), run
        assert seen["summary"] == seen["on_disk"] and seen["summary"]["pending"] is True  # type: ignore[index]
        assert set(seen["summary"]["objects"]) == {"seg", "sr", "surface_segmentation"}  # type: ignore[index]
        assert "pending" not in final and final == json.loads((out / "summary.json").read_text())
        assert set(final["objects"]) == {"seg", "sr", "surface_segmentation", "preview"}
        assert final["encapsulated_stl"] and final["meshes"] and final["thumbnails"]
        rest = [*final["encapsulated_stl"], *final["meshes"], *final["thumbnails"], OUTPUT_FILES["preview"]]
        for name in rest:
            assert (out / name).is_file(), name
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "out"]  # no partial folders left
