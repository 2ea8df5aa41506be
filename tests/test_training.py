"""Learning, guarded, end to end on CPU: a tiny MONAI bundle trained to segment every structure
two voxels too large segments phantoms sent to a running node; radiologists' corrections (the
true labels) come back over DICOM from a pynetdicom SCU, are recognised and become cases;
`vesalius train` writes a better version, the node (following the latest version) routes the next
series to it and its SEG says so; training that would make the model worse is refused."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage

from tests import tiny_bundle
from tests.peers import NodeProcess, send_seg, storescu, vesalius_node, wait_for
from tests.phantoms import write_phantom_series
from vesalius.dicom_out.identity import Algorithm
from vesalius.dicom_out.seg import build_seg
from vesalius.inference.models import Label
from vesalius.inference.models.monai_bundle import bundle_versions
from vesalius.inference.series import load_series
from vesalius.inference.training import TrainingCase, fine_tune
from vesalius.node.cli import main
from vesalius.node.store import Store

CASES = 6
LABELS = (Label(1, "liver"), Label(2, "heart"))


def _phantom(folder: Path, rng: np.random.Generator, n: int):
    scene = tiny_bundle.random_scene(rng)
    series = write_phantom_series(folder / f"ct{n}", shape=(44, 80, 80), spacing=(2.5, 1.5, 1.5),
                                  objects=scene.objects, background_hu=scene.background_hu,
                                  series_description="Abdomen phantom", patient_id=f"PAT{n % 2}")
    return scene, series


def _job_of(node: NodeProcess, series_uid: str) -> dict:
    return wait_for(lambda: next((j for j in node.jobs() if j["series_instance_uid"] == series_uid
                                  and j["state"] in ("done", "failed")), None), 180, f"job of {series_uid}")


def _algorithm_version(store: Store, job_id: int) -> str:
    seg = pydicom.dcmread(Path(store.job(job_id)["result_dir"]) / "seg.dcm", stop_before_pixels=True)
    return str(seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion)


@pytest.fixture(scope="module")
def learnt(tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[tuple[NodeProcess, Path, Path, np.random.Generator]]:
    """A node with the too-large bundle that has received CASES corrections."""
    import torch

    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("training")
    bundle = tiny_bundle.build_bundle(tmp / "models" / "tiny", grow_mm=4.0)  # 2 voxels of 2 mm
    config = (f'[[models]]\nname = "tiny"\nkind = "bundle"\npath = "{bundle}"\nbundle_version = "latest"\n'
              '[[rules]]\nname = "abdomen"\nseries_description = "abdomen"\nmodel = "tiny"\n')
    rng = np.random.default_rng(7)
    with vesalius_node(tmp, config=config) as node:
        for n in range(CASES):
            scene, series = _phantom(tmp, rng, n)
            storescu(series.paths, node.port)
            job = _job_of(node, series.series_uid)
            assert job["state"] == "done", job["error"]
            volume = load_series(series.paths)
            truth = scene.truth(tiny_bundle.grid_points(volume.affine, volume.array.shape))
            seg = build_seg(volume, truth, LABELS, Algorithm("radiologist", str(n)))
            seg.Manufacturer = "OHIF"
            out = io.BytesIO()
            seg.save_as(out, enforce_file_format=True)
            send_seg(node.port, out.getvalue())
        wait_for(lambda: len(node.get("/cases")) == CASES, 180, f"{CASES} cases")
        yield node, bundle, tmp / f"node-{node.port}.toml", rng


def test_training_on_corrections_makes_a_better_version_the_node_then_uses(learnt, capsys) -> None:
    node, bundle, config, rng = learnt
    corrections = node.get("/corrections")
    assert len(corrections) == CASES and {c["state"] for c in corrections} == {"recognised"}
    assert {c["model_version"] for c in corrections} == {"0.1.0"}
    # every structure two voxels too large: amended, the corrected volume smaller
    assert all(s["verdict"] == "amended" and s["volume_change_ml"] < 0
               for c in corrections for s in c["structures"])
    assert main(["train", "--model", "tiny", "--config", str(config), "--data-dir", str(node.data_dir),
                 "--epochs", "25", "--val-fraction", "0.34", "--learning-rate", "0.002", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accepted"] and result["version"] == "0.2.0", result
    assert len(result["val_cases"]) == 2 and len(result["train_cases"]) == 4
    assert set(result["before"]) == {"liver", "heart"} and result["mean_after"] > result["mean_before"]
    folder = bundle / "versions" / "0.2.0"
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    assert meta["version"] == "0.2.0" and "fine-tuned from 0.1.0" in meta["changelog"]["0.2.0"]
    summary = json.loads((folder / "training.json").read_text())
    assert summary["dice_before"] == result["before"] and summary["dice_after"] == result["after"]
    assert set(bundle_versions(bundle)) == {"0.1.0", "0.2.0"}
    # the node follows the latest accepted version: the next series is segmented by 0.2.0
    _, series = _phantom(node.data_dir.parent, rng, 99)
    storescu(series.paths, node.port)
    job = _job_of(node, series.series_uid)
    assert job["state"] == "done", job["error"]
    store = Store(node.data_dir)
    assert _algorithm_version(store, job["id"]) == "0.2.0"
    assert _algorithm_version(store, 1) == "0.1.0"
    # no improvement (no epoch): refused, nothing written
    assert main(["train", "--model", "tiny", "--config", str(config), "--data-dir", str(node.data_dir),
                 "--epochs", "0"]) == 1
    out = capsys.readouterr().out
    assert "no new version: validation Dice" in out and "below the required" in out
    assert set(bundle_versions(bundle)) == {"0.1.0", "0.2.0"}


def test_corrections_that_make_it_worse_are_refused(learnt, tmp_path) -> None:
    """Training cases labelled three voxels too large against correct held-back cases."""
    node, bundle, _, _ = learnt
    library = []
    for row in node.get("/cases"):
        folder = node.data_dir / "cases" / f"case-{row['id']:06d}"
        meta = json.loads((folder / "case.json").read_text())
        labels = {int(k): v["name"] for k, v in meta["labels"].items()}
        library.append(TrainingCase(f"case-{row['id']}", folder / "image.nii.gz", folder / "label.nii.gz",
                                    labels))
    worse = []
    for case in library[:4]:
        image = sitk.ReadImage(str(case.label))
        grown = ndimage.grey_dilation(sitk.GetArrayFromImage(image), size=(7, 7, 7))
        out = sitk.GetImageFromArray(grown.astype(np.uint8))
        out.CopyInformation(image)
        path = tmp_path / f"{case.name}-worse.nii.gz"
        sitk.WriteImage(out, str(path))
        worse.append(TrainingCase(case.name, case.image, path, case.labels))
    versions = bundle / "versions"
    existing = sorted(versions.iterdir()) if versions.is_dir() else []
    result = fine_tune(bundle, bundle, worse, library[4:], epochs=25, learning_rate=0.002)
    assert not result.accepted and result.version is None, result
    assert sum(result.after.values()) < sum(result.before.values())
    assert "below the required" in result.reason
    assert (sorted(versions.iterdir()) if versions.is_dir() else []) == existing  # nothing written
