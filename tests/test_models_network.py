"""Network backends end to end: a real MONAI bundle trained here on phantoms, its TorchScript and its
ONNX export, run through the node (DICOM in -> SEG out) on an unseen series with anisotropic voxels
and an oblique orientation. Dice >= 0.9 against the analytic truth proves that the pre-processing
(orientation, spacing, intensity) and its inversion put the labels back on the right voxels.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from tests import tiny_bundle
from tests.dicom_checks import assert_dciodvfy_clean
from tests.peers import storescp, storescu, vesalius_node, wait_for
from tests.phantoms import Box, PhantomSeries, Sphere, write_phantom_series
from tests.realdata import dice
from vesalius.dicom_out.identity import Algorithm
from vesalius.dicom_out.seg import build_seg
from vesalius.inference.models.registry import MergedModel, configure, resolve
from vesalius.inference.series import load_series
from vesalius.inference.volume import Volume

LIVER, HEART = "10200004", "80891009"  # SNOMED CT codes of the bundle's two labels
SCENE = tiny_bundle.Scene(Sphere((18.0, -10.0, 8.0), 19.0, 60.0),
                          Box((-20.0, 12.0, -6.0), (26.0, 22.0, 24.0), 450.0), -100.0)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MONAI bundle trained here (TorchScript + configs), in a temp folder."""
    import torch

    torch.set_num_threads(2)
    return tiny_bundle.build_bundle(tmp_path_factory.mktemp("models") / "tiny_bundle")


@pytest.fixture(scope="module")
def unseen(tmp_path_factory: pytest.TempPathFactory) -> PhantomSeries:
    """A series the network never saw: oblique, 3 x 1.2 x 1.4 mm voxels, other sizes and places."""
    return write_phantom_series(tmp_path_factory.mktemp("unseen"), shape=(34, 84, 76),
                                spacing=(3.0, 1.2, 1.4), orientation="oblique",
                                objects=SCENE.objects, background_hu=SCENE.background_hu,
                                series_description="Abdomen phantom")


@pytest.fixture(scope="module")
def truth(unseen: PhantomSeries) -> tuple[Volume, np.ndarray]:
    volume = load_series(unseen.paths)
    assert np.allclose(volume.affine, unseen.affine, atol=1e-4)
    return volume, SCENE.truth(tiny_bundle.grid_points(volume.affine, volume.array.shape))


@pytest.fixture(autouse=True)
def fresh_registry() -> Iterator[None]:
    configure({})
    yield
    configure({})


def seg_masks(seg: pydicom.Dataset, volume: Volume) -> dict[str, np.ndarray]:
    """Each SEG segment as a boolean volume on the source slices, keyed by its SNOMED type code."""
    reader = hd.seg.Segmentation.from_dataset(seg)
    numbers = {str(s.SegmentedPropertyTypeCodeSequence[0].CodeValue): int(s.SegmentNumber)
               for s in seg.SegmentSequence}
    pixels = reader.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in volume.sources],
        segment_numbers=list(numbers.values()))
    return {code: pixels[..., i].astype(bool) for i, code in enumerate(numbers)}


def assert_accurate(masks: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
    scores = {code: dice(masks[code], labels == value) for code, value in ((LIVER, 1), (HEART, 2))}
    assert min(scores.values()) >= 0.9, scores
    return scores


def test_bundle_through_the_node_dicom_in_seg_out(tmp_path: Path, bundle: Path,
                                                    unseen: PhantomSeries, truth) -> None:
    volume, labels = truth
    config = f'[[rules]]\nname = "abdomen"\nseries_description = "abdomen"\nmodel = "bundle:{bundle}"\n'
    with storescp(tmp_path / "pacs") as pacs, \
            vesalius_node(tmp_path, destinations=[pacs.address], config=config) as node:
        storescu(unseen.paths, node.port)

        # a delivery is done when the PACS acknowledged every object, so its files are complete
        wait_for(lambda: node.delivered(1), 180, "the bundle's results at the PACS")
        seg = next(ds for path in pacs.files()
                   if (ds := pydicom.dcmread(path)).SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4")
        jobs = node.jobs()
    assert [(job["model"], job["state"]) for job in jobs] == [(f"bundle:{bundle}", "done")]
    assert str(seg.StudyInstanceUID) == unseen.study_uid
    assert "tiny_phantom_segmentation" in str(seg.SeriesDescription)
    assert_dciodvfy_clean(seg)
    assert_accurate(seg_masks(seg, volume), labels)


def test_onnx_export_through_vesalius_process(tmp_path: Path, bundle: Path, unseen: PhantomSeries,
                                              truth) -> None:
    volume, labels = truth
    onnx = tiny_bundle.export_onnx(bundle, tmp_path / "onnx" / "phantoms.onnx")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "vesalius.node.cli",
                             "process", str(unseen.paths[0].parent),
                             "--out", str(out), "--model", f"onnx:{onnx}", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["model"] == {"name": "phantoms", "version": "0.1.0"}
    assert {s["name"] for s in summary["structures"]} == {"liver", "heart"}
    assert_accurate(seg_masks(pydicom.dcmread(out / "seg.dcm"), volume), labels)


def test_torchscript_file_with_sidecar_settings(tmp_path: Path, bundle: Path, truth) -> None:
    volume, labels = truth
    scripted = tmp_path / "net.ts"
    scripted.write_bytes((bundle / "models" / "model.ts").read_bytes())
    scripted.with_suffix(".json").write_text(json.dumps({
        "labels": {"1": "liver", "2": "heart"}, "spacing": list(tiny_bundle.SPACING),
        "intensity": tiny_bundle.WINDOW, "roi_size": list(tiny_bundle.ROI), "overlap": 0.5}))
    model = resolve(f"torchscript:{scripted}")
    assert model is resolve(f"torchscript:{scripted}")  # loaded once, then reused
    predicted = model.predict(volume)
    assert predicted.shape == volume.array.shape and predicted.dtype == np.uint8
    for value in (1, 2):
        assert dice(predicted == value, labels == value) >= 0.9


def test_bundle_with_a_state_dict_and_network_def(tmp_path: Path, bundle: Path, truth) -> None:
    """models/model.pt (weights only) is loaded into the config's network_def."""
    import shutil

    import torch

    copy = tmp_path / "state_dict_bundle"
    shutil.copytree(bundle / "configs", copy / "configs")
    (copy / "models").mkdir()
    torch.save(torch.jit.load(str(bundle / "models" / "model.ts")).state_dict(), copy / "models" / "model.pt")
    volume, labels = truth
    predicted = resolve(f"bundle:{copy}").predict(volume)
    for value in (1, 2):
        assert dice(predicted == value, labels == value) >= 0.9


def test_wrong_geometry_would_be_caught(bundle: Path, truth) -> None:
    """The Dice check has teeth: the same labels with the slice order reversed score badly."""
    volume, labels = truth
    predicted = resolve(f"bundle:{bundle}").predict(volume)
    assert dice(predicted == 1, labels == 1) >= 0.9
    assert dice(predicted[::-1] == 1, labels == 1) < 0.5


def test_builtin_plus_bundle_merge_into_one_label_map(bundle: Path, truth) -> None:
    volume, labels = truth
    merged = resolve(f"builtin_ct+bundle:{bundle}")
    assert isinstance(merged, MergedModel)
    values = [label.value for label in merged.structures]
    assert len(set(values)) == len(values) == 7  # body, lungs x2, airways, bone + liver, heart
    by_name = {label.name: label for label in merged.structures}
    assert set(by_name["body"].includes) >= {by_name["liver"].value, by_name["heart"].value}
    predicted = merged.predict(volume)
    assert dice(by_name["liver"].mask(predicted), labels == 1) >= 0.9
    assert dice(by_name["heart"].mask(predicted), labels == 2) >= 0.9
    assert by_name["body"].mask(predicted)[labels > 0].all()  # the body still encloses the organs
    seg = build_seg(volume, predicted, merged.structures, Algorithm(merged.name, merged.version))
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    codes = {str(s.SegmentedPropertyTypeCodeSequence[0].CodeValue) for s in seg.SegmentSequence}
    assert len(set(numbers)) == len(numbers) and {LIVER, HEART, "38266002"} <= codes  # + body


def test_vesalius_models_lists_labels_device_and_weights(tmp_path: Path, bundle: Path) -> None:
    missing = tmp_path / "absent.onnx"
    result = subprocess.run([sys.executable, "-m", "vesalius.node.cli",
                             "models", "--json", "--model",
                             f"bundle:{bundle}", "--model", f"onnx:{missing}", "--model", "builtin_ct"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr  # one model's weights are missing
    rows = {row["kind"]: row for row in json.loads(result.stdout)}
    assert rows["bundle"]["labels"] == ["liver", "heart"] and rows["bundle"]["weights_present"]
    assert rows["bundle"]["device"] in ("cpu", "cuda")
    assert not rows["onnx"]["weights_present"] and str(missing) in rows["onnx"]["problems"][0]
    assert rows["builtin"]["labels"][:2] == ["body", "lung_left"]


def test_serve_refuses_to_start_with_missing_weights(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[[rules]]\nname = "ct"\nmodel = "bundle:{tmp_path / "no-such-bundle"}"\n')
    result = subprocess.run([sys.executable, "-m", "vesalius.node.cli",
                             "serve", "--config", str(config),
                             "--port", "0", "--http-port", "0", "--data-dir", str(tmp_path / "d")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "rules[0].model" in result.stderr and "no-such-bundle does not exist" in result.stderr
