"""Which model a name means: configured model specs, path forms and merges, loaded once per process.

A routing rule or ``--model`` names a model in one of three ways:

- a configured name (``[[models]]`` entries in the node config, parsed by ``parse_model_specs``)
  or ``builtin_ct``;
- a path form for trying a model without editing the config: ``bundle:PATH`` (MONAI bundle
  folder), ``torchscript:PATH``, ``onnx:PATH``, ``nnunet:PATH`` (trained-model folder),
  ``totalsegmentator:WEIGHTS_DIR``;
- several of those joined with ``+`` (``builtin_ct+lungs``): their labels merge into one label
  map with distinct values, later models painting over earlier ones.

``resolve`` loads a model the first time it is asked for and keeps it for the life of the
process (a worker), so weights are read and moved to the GPU once, not per job. ``check``
verifies that the weights exist without loading torch, for a clear error at start-up.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vesalius.inference.models import Label, Model
from vesalius.inference.volume import Volume

BUILTIN = "builtin_ct"
KINDS = ("builtin", "bundle", "torchscript", "onnx", "nnunet", "totalsegmentator", "merge")
PATH_FORMS = ("bundle", "torchscript", "onnx", "nnunet", "totalsegmentator")
DEVICES_HELP = "auto, cpu, cuda or cuda:N"


class ModelSpecError(ValueError):
    """A model definition or reference is wrong; the message names the key or the reference."""


@dataclass(frozen=True)
class ModelSpec:
    """One model definition (a ``[[models]]`` table, a path form, or a weights file's sidecar)."""

    name: str
    kind: str
    path: Path | None = None
    version: str | None = None
    device: str = "auto"
    precision: str = "auto"
    labels: dict[int, str] = field(default_factory=dict)  # output channel / class value -> label name
    label_map: dict[str, str] = field(default_factory=dict)  # the model's own name -> our label name
    spacing: tuple[float, ...] | None = None  # target voxel size (mm) after `orientation`
    orientation: str | None = "RAS"
    intensity: dict[str, Any] | None = None  # ScaleIntensityRange a_min/a_max/b_min/b_max/clip, or normalize
    roi_size: tuple[int, ...] | None = None
    overlap: float | None = None
    sw_batch_size: int | None = None
    members: tuple[str, ...] = ()  # kind "merge": the models, in painting order
    task: str = "total"  # totalsegmentator
    fast: bool = False  # totalsegmentator --fast (3 mm model)
    roi_subset: tuple[str, ...] = ()  # totalsegmentator --roi_subset
    folds: tuple[int, ...] = ()  # nnunet: empty = every fold_N folder present
    checkpoint: str = "checkpoint_final.pth"  # nnunet


_KEYS = {
    "name", "kind", "path", "version", "device", "precision", "labels", "label_map", "spacing",
    "orientation", "intensity", "roi_size", "overlap", "sw_batch_size", "members", "task", "fast",
    "roi_subset", "folds", "checkpoint",
}
_NEEDS_PATH = {"bundle", "torchscript", "onnx", "nnunet", "totalsegmentator"}


def _expect(key: str, value: Any, kind: Any, what: str) -> Any:
    if isinstance(value, bool) and kind is not bool:  # TOML true is not a number
        raise ModelSpecError(f"{key}: expected {what}, got {value!r}")
    if not isinstance(value, kind):
        raise ModelSpecError(f"{key}: expected {what}, got {type(value).__name__} {value!r}")
    return value


def _numbers(key: str, value: Any, size: int, integer: bool) -> tuple:
    what = f"{size} positive {'integers' if integer else 'numbers'}"
    _expect(key, value, list | tuple, what)
    if len(value) != size:
        raise ModelSpecError(f"{key}: expected {what}, got {value!r}")
    out = []
    for v in value:
        _expect(key, v, int if integer else (int, float), what)
        if v <= 0 or not math.isfinite(v):
            raise ModelSpecError(f"{key}: expected {what}, got {value!r}")
        out.append(int(v) if integer else float(v))
    return tuple(out)


def _label_table(key: str, value: Any) -> dict[int, str]:
    _expect(key, value, dict, "a table of output channel -> label name")
    table = {}
    for channel, name in value.items():
        try:
            number = int(channel)
        except ValueError:
            raise ModelSpecError(f"{key}.{channel}: keys are output channels (1..255)") from None
        if not 0 <= number <= 255:
            raise ModelSpecError(f"{key}.{channel}: keys are output channels (1..255)")
        table[number] = _expect(f"{key}.{channel}", name, str, "a label name")
    return table


def parse_model_spec(table: Mapping[str, Any], where: str = "models[0]",
                     base: Path | None = None) -> ModelSpec:
    """A ModelSpec from one TOML/JSON table; ModelSpecError names ``where.key`` on any problem.

    A relative ``path`` is taken relative to ``base`` (the config file's folder) when given.
    """
    _expect(where, table, dict, "a table")
    for key in table:
        if key not in _KEYS:
            raise ModelSpecError(f"{where}.{key}: unknown key (allowed: {', '.join(sorted(_KEYS))})")
    if "name" not in table:
        raise ModelSpecError(f"{where}.name: required")
    name = _expect(f"{where}.name", table["name"], str, "a string")
    if not name or any(c in name for c in ":+ /") or name == BUILTIN:
        raise ModelSpecError(f"{where}.name: {name!r} must be non-empty, without ':', '+', '/' or "
                             f"spaces, and not {BUILTIN!r}")
    kind = _expect(f"{where}.kind", table.get("kind", ""), str, "a string")
    if kind not in KINDS or kind == "builtin":
        raise ModelSpecError(f"{where}.kind: expected one of {', '.join(k for k in KINDS if k != 'builtin')},"
                             f" got {kind!r}")
    values: dict[str, Any] = {"name": name, "kind": kind}
    if kind in _NEEDS_PATH:
        if "path" not in table:
            raise ModelSpecError(f"{where}.path: required for kind {kind!r}")
    if "path" in table:
        path = Path(_expect(f"{where}.path", table["path"], str, "a path")).expanduser()
        values["path"] = path if path.is_absolute() or base is None else base / path
    for key in ("version", "task", "checkpoint"):
        if key in table:
            values[key] = _expect(f"{where}.{key}", table[key], str, "a string")
    if "device" in table:
        device = _expect(f"{where}.device", table["device"], str, "a string")
        if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:")
                                                         and device[5:].isdigit()):
            raise ModelSpecError(f"{where}.device: expected {DEVICES_HELP}, got {device!r}")
        values["device"] = device
    if "precision" in table:
        precision = _expect(f"{where}.precision", table["precision"], str, "a string")
        if precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ModelSpecError(f"{where}.precision: expected auto, fp32, fp16 or bf16, got {precision!r}")
        values["precision"] = precision
    if "labels" in table:
        values["labels"] = _label_table(f"{where}.labels", table["labels"])
    if "label_map" in table:
        mapping = _expect(f"{where}.label_map", table["label_map"], dict, "a table of name -> label name")
        values["label_map"] = {str(k): _expect(f"{where}.label_map.{k}", v, str, "a label name")
                               for k, v in mapping.items()}
    if "spacing" in table:
        values["spacing"] = _numbers(f"{where}.spacing", table["spacing"], 3, integer=False)
    if "orientation" in table:
        orientation = _expect(f"{where}.orientation", table["orientation"], str, "axis codes like RAS")
        letters = sorted(orientation.upper())
        if len(orientation) != 3 or not all(c in "LRAPSI" for c in letters) or len(
                {c.replace("L", "R").replace("P", "A").replace("I", "S") for c in letters}) != 3:
            raise ModelSpecError(f"{where}.orientation: expected axis codes like RAS or LPS, got "
                                 f"{orientation!r}")
        values["orientation"] = orientation.upper()
    if "intensity" in table:
        values["intensity"] = _intensity(f"{where}.intensity", table["intensity"])
    if "roi_size" in table:
        values["roi_size"] = _numbers(f"{where}.roi_size", table["roi_size"], 3, integer=True)
    if "overlap" in table:
        overlap = _expect(f"{where}.overlap", table["overlap"], (int, float), "a number in [0, 1)")
        if not 0 <= overlap < 1:
            raise ModelSpecError(f"{where}.overlap: expected a number in [0, 1), got {overlap!r}")
        values["overlap"] = float(overlap)
    if "sw_batch_size" in table:
        batch = _expect(f"{where}.sw_batch_size", table["sw_batch_size"], int, "a positive integer")
        if batch < 1:
            raise ModelSpecError(f"{where}.sw_batch_size: expected a positive integer, got {batch}")
        values["sw_batch_size"] = batch
    if "fast" in table:
        values["fast"] = _expect(f"{where}.fast", table["fast"], bool, "true or false")
    for key in ("members", "roi_subset"):
        if key in table:
            items = _expect(f"{where}.{key}", table[key], list, "a list of names")
            values[key] = tuple(_expect(f"{where}.{key}[{i}]", v, str, "a name")
                                for i, v in enumerate(items))
    if "folds" in table:
        items = _expect(f"{where}.folds", table["folds"], list, "a list of fold numbers")
        values["folds"] = tuple(_expect(f"{where}.folds[{i}]", v, int, "a fold number")
                                for i, v in enumerate(items))
    if kind == "merge" and len(values.get("members", ())) < 2:
        raise ModelSpecError(f"{where}.members: a merge needs at least two models")
    return ModelSpec(**values)


def _intensity(key: str, value: Any) -> dict[str, Any]:
    _expect(key, value, dict, "a table")
    if value.get("normalize") is not None:
        if value != {"normalize": "zscore"}:
            raise ModelSpecError(f"{key}: normalize must be \"zscore\" and stand alone")
        return dict(value)
    allowed = {"a_min", "a_max", "b_min", "b_max", "clip"}
    for k in value:
        if k not in allowed:
            raise ModelSpecError(f"{key}.{k}: unknown key (allowed: {', '.join(sorted(allowed))}, "
                                 "or normalize = \"zscore\")")
    for k in ("a_min", "a_max"):
        if k not in value:
            raise ModelSpecError(f"{key}.{k}: required")
    out = {}
    for k, v in value.items():
        out[k] = _expect(f"{key}.{k}", v, bool if k == "clip" else (int, float),
                         "true or false" if k == "clip" else "a number")
    if out["a_max"] <= out["a_min"]:
        raise ModelSpecError(f"{key}: a_max must be greater than a_min")
    return out


def parse_model_specs(tables: Sequence[Any], base: Path | None = None) -> dict[str, ModelSpec]:
    """``[[models]]`` tables -> {name: ModelSpec}; ModelSpecError names ``models[i].key``."""
    _expect("models", tables, list, "a list of [[models]] tables")
    specs: dict[str, ModelSpec] = {}
    for i, table in enumerate(tables):
        spec = parse_model_spec(table, f"models[{i}]", base)
        if spec.name in specs:
            raise ModelSpecError(f"models[{i}].name: {spec.name!r} is defined twice")
        specs[spec.name] = spec
    for i, spec in enumerate(specs.values()):
        if spec.kind == "merge":
            try:
                expand(spec.name, specs)
            except ModelSpecError as err:
                raise ModelSpecError(f"models[{i}].members: {err}") from None
    return specs


def spec_from_path_form(reference: str) -> ModelSpec:
    """``kind:PATH`` -> ModelSpec, with settings from the weights' sidecar JSON when there is one.

    TorchScript and ONNX files carry no pre-processing or label names, so ``model.onnx`` reads
    them from ``model.json`` (or ``model.onnx.json``) beside it: the same keys as a ``[[models]]``
    table.
    """
    kind, _, text = reference.partition(":")
    if kind not in PATH_FORMS or not text:
        forms = ", ".join(f"{k}:PATH" for k in PATH_FORMS)
        raise ModelSpecError(f"model {reference!r}: path forms are {forms}")
    path = Path(text).expanduser()
    name = path.stem if path.suffix else path.name
    spec = ModelSpec(name=name or kind, kind=kind, path=path)
    if kind in ("torchscript", "onnx"):
        sidecar = next((p for p in (path.with_suffix(".json"), path.with_name(path.name + ".json"))
                        if p.is_file()), None)
        if sidecar is not None:
            try:
                table = json.loads(sidecar.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ModelSpecError(f"{sidecar}: not readable JSON: {err}") from err
            table = {"name": spec.name, **table, "kind": kind, "path": str(path)}
            spec = parse_model_spec(table, str(sidecar))
    return spec


def expand(reference: str, specs: Mapping[str, ModelSpec], _within: tuple[str, ...] = ()) -> list[ModelSpec]:
    """The specs a reference names (one, or several for ``a+b`` / kind ``merge``), in painting
    order; ModelSpecError naming the known models when a name is unknown. Checks no files."""
    parts = [p.strip() for p in reference.split("+")] if not _is_path_form(reference) else [reference]
    if len(parts) > 1:
        return [s for p in parts for s in expand(p, specs, _within)]
    ref = parts[0]
    if ref == BUILTIN:
        return [ModelSpec(name=BUILTIN, kind="builtin")]
    if _is_path_form(ref):
        return [spec_from_path_form(ref)]
    if ref in specs:
        spec = specs[ref]
        if spec.kind == "merge":
            if ref in _within:
                raise ModelSpecError(f"merge {ref!r} contains itself ({' -> '.join((*_within, ref))})")
            return [s for member in spec.members for s in expand(member, specs, (*_within, ref))]
        return [spec]
    known = [BUILTIN, *specs]
    raise ModelSpecError(f"unknown model {ref!r}; known models: {', '.join(known)}; or a path form: "
                         f"{', '.join(f'{k}:PATH' for k in PATH_FORMS)}")


def _is_path_form(reference: str) -> bool:
    return reference.partition(":")[0] in PATH_FORMS and ":" in reference


# -- the process-wide state of a worker: configured specs and loaded models -------------------------

_SPECS: dict[str, ModelSpec] = {}
_LOADED: dict[tuple, Model] = {}
_LOCK = threading.Lock()


def configure(specs: Mapping[str, ModelSpec] | None = None, gpu_slots: int = 1) -> None:
    """Set the configured models (and GPU slots) of this process; forgets loaded models."""
    from vesalius.inference import device

    device.set_gpu_slots(gpu_slots)
    with _LOCK:
        _SPECS.clear()
        _SPECS.update(specs or {})
        _LOADED.clear()


def configured() -> dict[str, ModelSpec]:
    return dict(_SPECS)


def resolve(reference: str) -> Model:
    """The model a reference names, loaded on first use and then reused by this process."""
    parts = expand(reference, _SPECS)
    models = [_load_cached(spec) for spec in parts]
    if len(models) == 1:
        return models[0]
    return MergedModel(models)


def _load_cached(spec: ModelSpec) -> Model:
    key = (spec.kind, spec.name, str(spec.path), repr(spec))
    with _LOCK:
        if key not in _LOADED:
            _LOADED[key] = load(spec)
        return _LOADED[key]


def load(spec: ModelSpec) -> Model:
    """Build the model of one spec (no caching); missing weights raise ModelSpecError."""
    problems = weight_problems(spec)
    if problems:
        raise ModelSpecError(f"model {spec.name!r}: " + "; ".join(problems))
    if spec.kind == "builtin":
        from vesalius.inference.models.builtin_ct import BuiltinCT

        return BuiltinCT()
    if spec.kind == "bundle":
        from vesalius.inference.models.monai_bundle import load_bundle

        return load_bundle(spec)
    if spec.kind == "torchscript":
        from vesalius.inference.models.torchscript import load_torchscript

        return load_torchscript(spec)
    if spec.kind == "onnx":
        from vesalius.inference.models.onnx_model import load_onnx

        return load_onnx(spec)
    if spec.kind == "nnunet":
        from vesalius.inference.models.nnunet import load_nnunet

        return load_nnunet(spec)
    if spec.kind == "totalsegmentator":
        from vesalius.inference.models.totalsegmentator import load_totalsegmentator

        return load_totalsegmentator(spec)
    raise ModelSpecError(f"model {spec.name!r}: kind {spec.kind!r} cannot be loaded on its own")


def weight_problems(spec: ModelSpec) -> list[str]:
    """What is missing for ``spec`` to load (empty when its files are in place); never imports torch."""
    if spec.kind == "builtin":
        return []
    path = spec.path
    if path is None:
        return [f"no path for kind {spec.kind!r}"]
    if spec.kind == "bundle":
        from vesalius.inference.models.monai_bundle import bundle_problems

        return bundle_problems(path)
    if spec.kind in ("torchscript", "onnx"):
        return [] if path.is_file() else [f"weights file {path} does not exist"]
    if spec.kind == "nnunet":
        from vesalius.inference.models.nnunet import folder_problems

        return folder_problems(path, spec.folds, spec.checkpoint)
    if spec.kind == "totalsegmentator":
        from vesalius.inference.models.totalsegmentator import weights_problems

        return weights_problems(path, spec.task, spec.fast)
    return []


def check(reference: str, specs: Mapping[str, ModelSpec] | None = None) -> list[ModelSpec]:
    """The specs ``reference`` names, after checking their weights; ModelSpecError otherwise.

    Cheap (reads no weights, imports no torch): run at start-up for every model a rule names, so
    a missing file stops the node with a clear message instead of failing the first job.
    """
    parts = expand(reference, _SPECS if specs is None else specs)
    for spec in parts:
        problems = weight_problems(spec)
        if problems:
            raise ModelSpecError(f"model {reference!r} ({spec.kind} {spec.name}): " + "; ".join(problems))
    return parts


def describe(spec: ModelSpec) -> dict[str, Any]:
    """What ``vesalius models`` shows: kind, path, labels, device, weights present (no loading)."""
    from vesalius.inference.device import cuda_available

    problems = weight_problems(spec)
    labels: list[str] = []
    if spec.kind == "builtin":
        from vesalius.inference.models.builtin_ct import BuiltinCT

        labels = [label.name for label in BuiltinCT.labels]
    elif not problems:
        try:
            labels = [label.name for label in declared_labels(spec)]
        except (ValueError, OSError, KeyError) as err:
            problems = [str(err)]
    if spec.kind == "builtin":
        device = "cpu"
    elif spec.device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    else:
        device = spec.device
    return {"name": spec.name, "kind": spec.kind, "path": str(spec.path) if spec.path else None,
            "device": device, "labels": labels, "weights_present": not problems,
            "problems": problems}


def declared_labels(spec: ModelSpec) -> tuple[Label, ...]:
    """The labels a model will produce, read from its metadata files (no weights loaded)."""
    if spec.kind == "bundle":
        from vesalius.inference.models.monai_bundle import bundle_labels

        return bundle_labels(spec)[0]
    if spec.kind in ("torchscript", "onnx"):
        return label_defs(spec.labels, spec.label_map, spec.name)[0]
    if spec.kind == "nnunet":
        from vesalius.inference.models.nnunet import nnunet_labels

        return nnunet_labels(spec)[0]
    if spec.kind == "totalsegmentator":
        from vesalius.inference.models.totalsegmentator import totalseg_labels

        return totalseg_labels(spec)[0]
    return ()


def normalise_label_name(name: str) -> str:
    """A model's class name in our label-name style: lower case, words joined by underscores."""
    return "_".join(name.strip().lower().replace("-", " ").split())


def label_defs(names: Mapping[int, str], label_map: Mapping[str, str],
               model: str) -> tuple[tuple[Label, ...], dict[int, int]]:
    """Labels (value = channel) from the model's channel names, mapped to coded label names.

    Each name goes through ``label_map`` (the model's name -> ours), else is used as it is when
    coded (``vertebrae_S1``), else normalised (``Left Lung`` -> ``left_lung``); every
    resulting name must have a DICOM code, checked here so a model with an uncoded label fails at
    load time, not when its first SEG is written.
    """
    if not names:
        raise ModelSpecError(f"model {model!r}: no labels (set labels = {{1 = \"liver\", ...}})")
    labels = []
    for channel, raw in sorted(names.items()):
        if channel == 0:
            continue
        name = label_map.get(raw) or (raw if has_code(raw) else normalise_label_name(raw))
        if not has_code(name):
            raise ModelSpecError(f"model {model!r}: output {channel} {raw!r} maps to label {name!r}, "
                                 "which has no DICOM code (add a label_map entry or a codes row)")
        labels.append(Label(channel, name))
    if len(labels) > 255:
        raise ModelSpecError(f"model {model!r}: more than 255 labels")
    return tuple(labels), {label.value: label.value for label in labels}


def has_code(name: str) -> bool:
    """True when ``name`` resolves to a coded term in ``dicom_out.codes``."""
    from vesalius.dicom_out.codes import term_for

    try:
        term_for(name)
    except KeyError:
        return False
    return True


class MergedModel:
    """Several models as one: their labels in one map, each with its own value.

    Models paint in order (a later model's voxels win where two disagree); a label that encloses
    others (``includes``, like the body) also includes every later model's labels, so the body
    still contains the liver a bundle painted over it. A name produced twice keeps the later one.
    """

    def __init__(self, models: Sequence[Model]) -> None:
        if len(models) < 2:
            raise ValueError("a merge needs at least two models")
        self.models = tuple(models)
        self.name = "+".join(m.name for m in models)[:64]  # DICOM Algorithm Name is an LO
        self.version = "+".join(m.version for m in models)[:64]
        self.family = "ai" if any(getattr(m, "family", "ai") == "ai" for m in models) else "morphology"
        self._luts: list[np.ndarray] = []
        later_names = {}
        for i, model in enumerate(models):
            for label in model.labels:
                later_names[label.name] = i  # last model producing a name wins
        next_value = 1
        plans: list[list[tuple[Label, int]]] = []
        for i, model in enumerate(models):
            lut = np.zeros(256, dtype=np.uint8)
            plan = []
            for label in model.labels:
                if later_names[label.name] != i:
                    continue
                if next_value > 255:
                    raise ValueError(f"merged model {self.name}: more than 255 labels")
                lut[label.value] = next_value
                plan.append((label, next_value))
                next_value += 1
            self._luts.append(lut)
            plans.append(plan)
        labels: list[Label] = []
        for i, plan in enumerate(plans):
            later_values = tuple(v for p in plans[i + 1:] for _, v in p)
            for label, value in plan:
                includes = tuple(int(self._luts[i][v]) for v in label.includes if self._luts[i][v])
                if label.includes:
                    includes += later_values
                labels.append(Label(value, label.name, includes))
        self.labels = tuple(labels)

    def predict(self, volume: Volume) -> np.ndarray:
        out = np.zeros(volume.array.shape, dtype=np.uint8)
        for model, lut in zip(self.models, self._luts, strict=True):
            painted = lut[model.predict(volume)]
            np.copyto(out, painted, where=painted > 0)
        return out


def specs_for(references: Iterable[str], specs: Mapping[str, ModelSpec]) -> list[ModelSpec]:
    """Every distinct spec the references name, in order (for `vesalius models` and start-up)."""
    seen: dict[str, ModelSpec] = {}
    for reference in references:
        for spec in expand(reference, specs):
            seen.setdefault(f"{spec.kind}:{spec.name}:{spec.path}", spec)
    return list(seen.values())
