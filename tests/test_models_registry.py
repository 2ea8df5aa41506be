"""Model definitions, references and the per-process cache: no torch needed for any of this."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

import numpy as np
import pytest

from vesalius.inference.device import (
    Device,
    DeviceError,
    cpu_threads,
    device_slot,
    select_device,
    set_gpu_slots,
)
from vesalius.inference.models import Label
from vesalius.inference.models.builtin_ct import BuiltinCT
from vesalius.inference.models.registry import (
    MergedModel,
    ModelSpecError,
    check,
    configure,
    parse_model_specs,
    resolve,
    spec_from_path_form,
)
from vesalius.inference.volume import Volume


@pytest.fixture(autouse=True)
def fresh_registry():
    configure({})
    yield
    configure({})


def write_bundle_skeleton(folder: Path, weights: bool = True) -> Path:
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "configs" / "metadata.json").write_text(json.dumps({"version": "2.0", "network_data_format": {
        "outputs": {"pred": {"channel_def": {"0": "background", "1": "Liver", "2": "Heart"}}}}}))
    (folder / "configs" / "inference.json").write_text("{}")
    if weights:
        (folder / "models" / "model.ts").write_bytes(b"not loaded by these tests")
    return folder


def test_a_full_models_table_parses(tmp_path: Path) -> None:
    specs = parse_model_specs([
        {"name": "abdomen", "kind": "bundle", "path": "bundles/abdomen", "device": "cuda:1",
         "label_map": {"Spleen": "spleen"}, "overlap": 0.5, "roi_size": [96, 96, 96]},
        {"name": "lungs", "kind": "onnx", "path": "/models/lungs.onnx", "labels": {"1": "lung_left"},
         "spacing": [1.5, 1.5, 2.0], "intensity": {"a_min": -1000, "a_max": 400}, "precision": "fp16"},
        {"name": "total", "kind": "totalsegmentator", "path": "/opt/totalseg", "fast": True,
         "roi_subset": ["liver", "spleen"]},
        {"name": "chest", "kind": "merge", "members": ["builtin_ct", "lungs"]},
    ], base=tmp_path)
    assert specs["abdomen"].path == tmp_path / "bundles" / "abdomen"  # relative to the config file
    assert specs["abdomen"].device == "cuda:1" and specs["abdomen"].roi_size == (96, 96, 96)
    assert specs["lungs"].labels == {1: "lung_left"} and specs["lungs"].spacing == (1.5, 1.5, 2.0)
    assert specs["total"].fast and specs["total"].roi_subset == ("liver", "spleen")
    assert specs["chest"].members == ("builtin_ct", "lungs")


@pytest.mark.parametrize(("table", "message"), [
    ({"name": "a", "kind": "bundle", "path": "x", "colour": 1}, "models[0].colour: unknown key"),
    ({"name": "a", "kind": "bundle"}, "models[0].path: required"),
    ({"name": "a", "kind": "keras", "path": "x"}, "models[0].kind: expected one of"),
    ({"name": "a+b", "kind": "onnx", "path": "x"}, "models[0].name:"),
    ({"name": "a", "kind": "onnx", "path": "x", "roi_size": [96, 96]}, "models[0].roi_size: expected 3"),
    ({"name": "a", "kind": "onnx", "path": "x", "device": "gpu"}, "models[0].device: expected auto"),
    ({"name": "a", "kind": "onnx", "path": "x", "overlap": 1.5}, "models[0].overlap:"),
    ({"name": "a", "kind": "onnx", "path": "x", "intensity": {"a_min": 5}}, "models[0].intensity.a_max"),
    ({"name": "a", "kind": "onnx", "path": "x", "labels": {"one": "liver"}}, "models[0].labels.one"),
    ({"name": "a", "kind": "onnx", "path": "x", "fast": 1}, "models[0].fast: expected true or false"),
    ({"name": "a", "kind": "merge", "members": ["builtin_ct"]}, "models[0].members: a merge needs"),
    ({"name": "a", "kind": "merge", "members": ["builtin_ct", "nope"]}, "unknown model 'nope'"),
])
def test_mistakes_are_named_by_key(table: dict, message: str) -> None:
    with pytest.raises(ModelSpecError, match=message.replace("[", r"\[").replace("]", r"\]")
                       .replace("+", r"\+")):
        parse_model_specs([table])


def test_duplicate_names_are_refused() -> None:
    table = {"name": "a", "kind": "onnx", "path": "x"}
    with pytest.raises(ModelSpecError, match=r"models\[1\].name: 'a' is defined twice"):
        parse_model_specs([table, table])


def test_path_forms_and_sidecar_settings(tmp_path: Path) -> None:
    onnx = tmp_path / "lungs.onnx"
    onnx.write_bytes(b"")
    onnx.with_suffix(".json").write_text(json.dumps({"labels": {"1": "lung_left", "2": "lung_right"},
                                                     "roi_size": [64, 64, 64], "version": "3"}))
    spec = spec_from_path_form(f"onnx:{onnx}")
    assert (spec.name, spec.kind, spec.path, spec.version) == ("lungs", "onnx", onnx, "3")
    assert spec.labels == {1: "lung_left", 2: "lung_right"} and spec.roi_size == (64, 64, 64)
    bundle = spec_from_path_form(f"bundle:{tmp_path}/abdomen_ct")
    assert (bundle.name, bundle.kind) == ("abdomen_ct", "bundle")
    with pytest.raises(ModelSpecError, match="path forms are bundle:PATH"):
        spec_from_path_form("bundle:")


def test_unknown_reference_lists_what_is_known() -> None:
    specs = parse_model_specs([{"name": "lungs", "kind": "onnx", "path": "/x.onnx"}])
    with pytest.raises(ModelSpecError, match=r"unknown model 'livr'; known models: builtin_ct, lungs; "
                                             r"or a path form: bundle:PATH"):
        check("livr", specs)


def test_missing_weights_are_found_without_loading(tmp_path: Path) -> None:
    complete = write_bundle_skeleton(tmp_path / "ok")
    incomplete = write_bundle_skeleton(tmp_path / "no-weights", weights=False)
    assert [s.kind for s in check(f"builtin_ct+bundle:{complete}")] == ["builtin", "bundle"]
    with pytest.raises(ModelSpecError, match=r"weights .*no-weights/models/model.ts .*missing"):
        check(f"bundle:{incomplete}")
    with pytest.raises(ModelSpecError, match="absent.onnx does not exist"):
        check(f"onnx:{tmp_path / 'absent.onnx'}")
    specs = parse_model_specs([{"name": "abdomen", "kind": "bundle", "path": str(incomplete)}])
    with pytest.raises(ModelSpecError, match="model 'abdomen'"):
        check("abdomen", specs)


def test_bundle_labels_map_to_coded_names(tmp_path: Path) -> None:
    from vesalius.inference.models.monai_bundle import bundle_labels
    from vesalius.inference.models.registry import describe

    folder = write_bundle_skeleton(tmp_path / "b")
    labels, channels = bundle_labels(spec_from_path_form(f"bundle:{folder}"))
    assert [(label.value, label.name) for label in labels] == [(1, "liver"), (2, "heart")]
    assert channels == {1: 1, 2: 2}
    row = describe(spec_from_path_form(f"bundle:{folder}"))
    assert row["labels"] == ["liver", "heart"] and row["weights_present"]
    (folder / "configs" / "metadata.json").write_text(json.dumps({"network_data_format": {
        "outputs": {"pred": {"channel_def": {"0": "background", "1": "tumour blob"}}}}}))
    with pytest.raises(ModelSpecError, match="'tumour blob' maps to label 'tumour_blob', which has no"):
        bundle_labels(spec_from_path_form(f"bundle:{folder}"))


class Threshold:
    """A stand-in model: every voxel above ``hu`` gets label 1 (named ``name``)."""

    family = "morphology"
    version = "1"

    def __init__(self, name: str, hu: float, label: str) -> None:
        self.name = name
        self.hu = hu
        self.structures = (Label(1, label),)

    def predict(self, volume: Volume) -> np.ndarray:
        return (volume.array > self.hu).astype(np.uint8)


def test_merge_renumbers_paints_in_order_and_keeps_enclosures() -> None:
    array = np.array([[[-1000.0, 0.0, 100.0, 500.0]]], np.float32)
    volume = Volume(array, np.eye(4), ())
    merged = MergedModel([Threshold("soft", -500, "liver"), Threshold("dense", 300, "heart"),
                          Threshold("soft2", 50, "liver")])
    assert merged.name == "soft+dense+soft2" and merged.family == "morphology"
    assert [(label.value, label.name) for label in merged.structures] == [(1, "heart"), (2, "liver")]
    # the later "liver" wins over the first one; it paints over the heart where they overlap
    assert merged.predict(volume).tolist() == [[[0, 0, 2, 2]]]


def test_merge_with_builtin_extends_the_body() -> None:
    merged = MergedModel([BuiltinCT(), Threshold("organ", 30, "liver")])
    body = next(label for label in merged.structures if label.name == "body")
    liver = next(label for label in merged.structures if label.name == "liver")
    assert liver.value == 6 and liver.value in body.includes
    assert len({label.value for label in merged.structures}) == 6


def test_models_are_loaded_once_per_process() -> None:
    assert resolve("builtin_ct") is resolve("builtin_ct")
    configure({})
    first = resolve("builtin_ct")
    assert first is resolve("builtin_ct") and isinstance(first, BuiltinCT)


def test_cpu_leaves_a_core_for_the_listener() -> None:
    import torch

    if torch.cuda.is_available():
        assert select_device("auto").kind == "cuda"
    else:
        device = select_device("auto")
        assert device == Device("cpu", threads=cpu_threads())
        assert torch.get_num_threads() == device.threads
        with pytest.raises(DeviceError, match="no CUDA device"):
            select_device("cuda")
    cores = len(__import__("os").sched_getaffinity(0))
    assert 1 <= cpu_threads() and (cpu_threads() < cores or cores == 1)  # one core stays free
    with pytest.raises(DeviceError, match="device must be"):
        select_device("tpu")


def test_gpu_jobs_take_one_slot_per_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VESALIUS_LOCK_DIR", str(tmp_path))
    gpu = Device("cuda", index=0, threads=1)
    lock = tmp_path / "vesalius-gpu" / "cuda0-slot0.lock"

    def busy() -> bool:
        with open(lock, "a+") as other:  # what a second worker process would try
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False

    set_gpu_slots(1)
    with device_slot(gpu):
        assert busy()
    assert not busy()
    with device_slot(Device("cpu", threads=1)):  # the CPU takes no GPU slot
        assert not busy()
    assert gpu.autocast_dtype() == "float16" and Device("cpu").autocast_dtype() is None
    assert Device("cpu").autocast_dtype("bf16") == "bfloat16"


def test_a_merge_cannot_contain_itself() -> None:
    with pytest.raises(ModelSpecError, match=r"merge 'a' contains itself \(a -> b -> a\)"):
        parse_model_specs([{"name": "a", "kind": "merge", "members": ["builtin_ct", "b"]},
                           {"name": "b", "kind": "merge", "members": ["builtin_ct", "a"]}])


def test_nothing_needs_torch_until_a_network_runs(tmp_path: Path) -> None:
    """The node, the registry and the built-in model import and run without torch/MONAI."""
    import subprocess
    import sys

    code = ("import sys; sys.modules.update(torch=None, monai=None, onnxruntime=None)\n"
            "import vesalius.node.cli, vesalius.node.jobs, vesalius.node.pipeline\n"
            "import vesalius.inference.models.monai_bundle, vesalius.inference.models.onnx_model, "
            "vesalius.inference.models.nnunet, vesalius.inference.models.totalsegmentator\n"
            "from vesalius.inference.models.registry import resolve, describe, spec_from_path_form\n"
            "print(resolve('builtin_ct').name, describe(spec_from_path_form('onnx:/x.onnx'))['device'])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["builtin_ct", "cpu"]


def test_a_spec_is_valid_however_it_is_built() -> None:
    """The dataclass validates itself: a path form or code building a ModelSpec gets the same checks."""
    from vesalius.inference.models.spec import ModelSpec

    with pytest.raises(ModelSpecError, match=r"^overlap: expected a number in \[0, 1\)"):
        ModelSpec(name="a", kind="onnx", path=Path("x.onnx"), overlap=1.5)
    with pytest.raises(ModelSpecError, match="^roi_size: expected a list of integers"):
        ModelSpec(name="a", kind="onnx", path=Path("x.onnx"), roi_size=(96.5, 96, 96))  # type: ignore[arg-type]
    with pytest.raises(ModelSpecError, match="^sw_batch_size: expected an integer, got True"):
        ModelSpec(name="a", kind="onnx", path=Path("x.onnx"), sw_batch_size=True)
    spec = ModelSpec(name="a", kind="onnx", path=Path("x.onnx"), labels={"1": "liver"},  # type: ignore[dict-item]
                     spacing=(1, 1, 2), orientation="lps")
    assert spec.labels == {1: "liver"} and spec.spacing == (1.0, 1.0, 2.0) and spec.orientation == "LPS"
