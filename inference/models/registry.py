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
verifies that the kind's runtime is installed and the weights exist without loading torch, for a
clear error at start-up. What each kind loads and needs is its backend's business
(``backend.backend_for``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vesalius.inference.models import Model
from vesalius.inference.models.backend import backend_for
from vesalius.inference.models.kinds import BUILTIN, MERGE, PATH_FORMS
from vesalius.inference.models.merge import MergedModel
from vesalius.inference.models.spec import ModelSpec, ModelSpecError, builtin_spec, parse_model_spec

__all__ = ["MergedModel", "ModelSpec", "ModelSpecError", "check", "configure", "describe", "expand",
           "load", "parse_model_spec", "parse_model_specs", "resolve", "spec_from_path_form", "specs_for"]


def parse_model_specs(tables: Sequence[Any], base: Path | None = None) -> dict[str, ModelSpec]:
    """``[[models]]`` tables -> {name: ModelSpec}; ModelSpecError names ``models[i].key``."""
    if not isinstance(tables, list):
        raise ModelSpecError(f"models: expected a list of [[models]] tables, got {tables!r}")
    specs: dict[str, ModelSpec] = {}
    for i, table in enumerate(tables):
        spec = parse_model_spec(table, f"models[{i}]", base)
        if spec.name in specs:
            raise ModelSpecError(f"models[{i}].name: {spec.name!r} is defined twice")
        specs[spec.name] = spec
    for i, spec in enumerate(specs.values()):
        if spec.kind == MERGE:
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
        return [builtin_spec()]
    if _is_path_form(ref):
        return [spec_from_path_form(ref)]
    if ref in specs:
        spec = specs[ref]
        if spec.kind == MERGE:
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
_LOADED: dict[str, Model] = {}
_LOCK = threading.Lock()


def configure(specs: Mapping[str, ModelSpec] | None = None, gpu_slots: int = 1) -> None:
    """Set the configured models (and GPU slots) of this process; forgets loaded models."""
    from vesalius.inference import device

    device.set_gpu_slots(gpu_slots)
    with _LOCK:
        _SPECS.clear()
        _SPECS.update(specs or {})
        _LOADED.clear()


def resolve(reference: str) -> Model:
    """The model a reference names, loaded on first use and then reused by this process."""
    models = [_load_cached(spec) for spec in expand(reference, _SPECS)]
    if len(models) == 1:
        return models[0]
    return MergedModel(models)


def _load_cached(spec: ModelSpec) -> Model:
    key = repr(spec) + backend_for(spec.kind).revision(spec)  # every setting, and the version folder
    with _LOCK:
        if key not in _LOADED:
            _LOADED[key] = load(spec)
        return _LOADED[key]


def load(spec: ModelSpec) -> Model:
    """Build the model of one spec (no caching); a missing runtime or missing weights raise
    ModelSpecError."""
    backend = backend_for(spec.kind)
    problems = backend.runtime_problems() or backend.weight_problems(spec)
    if problems:
        raise ModelSpecError(f"model {spec.name!r}: " + "; ".join(problems))
    return backend.load(spec)


def check(reference: str, specs: Mapping[str, ModelSpec] | None = None) -> list[ModelSpec]:
    """The specs ``reference`` names, after checking their runtime and weights; ModelSpecError otherwise.

    Cheap (reads no weights, imports no torch): run at start-up for every model a rule names, so
    a missing file stops the node with a clear message instead of failing the first job.
    """
    parts = expand(reference, _SPECS if specs is None else specs)
    for spec in parts:
        backend = backend_for(spec.kind)
        problems = backend.runtime_problems() + backend.weight_problems(spec)  # all at once
        if problems:
            raise ModelSpecError(f"model {reference!r} ({spec.kind} {spec.name}): " + "; ".join(problems))
    return parts


def describe(spec: ModelSpec) -> dict[str, Any]:
    """What ``vesalius models`` shows: kind, path, labels, device, runtime installed, weights present
    (no loading)."""
    backend = backend_for(spec.kind)
    runtime = backend.runtime_problems()
    problems = backend.weight_problems(spec)
    labels: list[str] = []
    if not problems:
        try:
            labels = [label.name for label in backend.structures(spec)[0]]
        except (ValueError, OSError, KeyError) as err:
            problems = [str(err)]
    return {"name": spec.name, "kind": spec.kind, "path": str(spec.path) if spec.path else None,
            "device": backend.device(spec), "labels": labels, "weights_present": not problems,
            "runtime_installed": not runtime, "problems": runtime + problems}


def specs_for(references: Iterable[str], specs: Mapping[str, ModelSpec]) -> list[ModelSpec]:
    """Every distinct spec the references name, in order (for `vesalius models` and start-up)."""
    seen: dict[str, ModelSpec] = {}
    for reference in references:
        for spec in expand(reference, specs):
            seen.setdefault(f"{spec.kind}:{spec.name}:{spec.path}", spec)
    return list(seen.values())
