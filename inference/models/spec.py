"""A model definition (``ModelSpec``): a ``[[models]]`` table, a path form or a sidecar, validated once.

The dataclass is the schema: ``inference.fields`` checks each value against its annotation, and
``__post_init__`` adds what types cannot say (choices, ranges), so a spec that exists is valid
however it was built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vesalius.inference.fields import FieldError, check_types, from_table
from vesalius.inference.models.kinds import BUILTIN, CONFIG_KINDS, MERGE

DEVICES_HELP = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


class ModelSpecError(FieldError):
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
    # bundle: "" the folder as given; "latest" the newest version `vesalius train` accepted
    # (BUNDLE/versions/X.Y.Z, or the folder itself); "X.Y.Z" pins one (docs/learning.md)
    bundle_version: str = ""

    def __post_init__(self) -> None:
        try:
            self._validate()
        except FieldError as err:
            raise ModelSpecError(str(err)) from None

    def _validate(self) -> None:
        if isinstance(self.labels, dict):  # TOML and JSON keys are strings: "1" = "liver"
            object.__setattr__(self, "labels", _channel_table(self.labels))
        check_types(self)
        if self.kind == "builtin" and self.name == BUILTIN:
            return
        if not self.name or any(c in self.name for c in ":+ /") or self.name == BUILTIN:
            raise FieldError(f"name: {self.name!r} must be non-empty, without ':', '+', '/' or "
                             f"spaces, and not {BUILTIN!r}")
        if self.kind not in CONFIG_KINDS:
            raise FieldError(f"kind: expected one of {', '.join(CONFIG_KINDS)}, got {self.kind!r}")
        if self.kind != MERGE and self.path is None:
            raise FieldError(f"path: required for kind {self.kind!r}")
        if self.kind == MERGE and len(self.members) < 2:
            raise FieldError("members: a merge needs at least two models")
        if self.device not in ("auto", "cpu", "cuda") and not (
                self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise FieldError(f"device: expected {DEVICES_HELP}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise FieldError(f"precision: expected {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.spacing is not None:
            object.__setattr__(self, "spacing", tuple(float(v) for v in _positive("spacing", self.spacing)))
        if self.roi_size is not None:
            _positive("roi_size", self.roi_size)
        if self.orientation is not None:
            object.__setattr__(self, "orientation", _orientation(self.orientation))
        if self.intensity is not None:
            _check_intensity(self.intensity)
        if self.overlap is not None and not 0 <= self.overlap < 1:
            raise FieldError(f"overlap: expected a number in [0, 1), got {self.overlap!r}")
        if self.sw_batch_size is not None and self.sw_batch_size < 1:
            raise FieldError(f"sw_batch_size: expected a positive integer, got {self.sw_batch_size}")


def _channel_table(table: Mapping[Any, Any]) -> dict[Any, Any]:
    out = {}
    for channel, name in table.items():
        try:
            number = int(channel)
        except (TypeError, ValueError):
            raise FieldError(f"labels.{channel}: keys are output channels (1..255)") from None
        if not 0 <= number <= 255:
            raise FieldError(f"labels.{channel}: keys are output channels (1..255)")
        out[number] = name
    return out


def _positive(key: str, values: tuple[float, ...]) -> tuple[float, ...]:
    if len(values) != 3 or not all(v > 0 and math.isfinite(v) for v in values):
        raise FieldError(f"{key}: expected 3 positive numbers, got {list(values)!r}")
    return values


def _orientation(text: str) -> str:
    letters = sorted(text.upper())
    if len(text) != 3 or not all(c in "LRAPSI" for c in letters) or len(
            {c.replace("L", "R").replace("P", "A").replace("I", "S") for c in letters}) != 3:
        raise FieldError(f"orientation: expected axis codes like RAS or LPS, got {text!r}")
    return text.upper()


def _check_intensity(value: Mapping[str, Any]) -> None:
    if value.get("normalize") is not None:
        if dict(value) != {"normalize": "zscore"}:
            raise FieldError("intensity: normalize must be \"zscore\" and stand alone")
        return
    allowed = {"a_min", "a_max", "b_min", "b_max", "clip"}
    for k, v in value.items():
        if k not in allowed:
            raise FieldError(f"intensity.{k}: unknown key (allowed: {', '.join(sorted(allowed))}, "
                             "or normalize = \"zscore\")")
        wanted = bool if k == "clip" else float
        if isinstance(v, bool) != (wanted is bool) or not isinstance(v, int | float):
            raise FieldError(f"intensity.{k}: expected {'true or false' if k == 'clip' else 'a number'}, "
                             f"got {v!r}")
    for k in ("a_min", "a_max"):
        if k not in value:
            raise FieldError(f"intensity.{k}: required")
    if value["a_max"] <= value["a_min"]:
        raise FieldError("intensity: a_max must be greater than a_min")


def parse_model_spec(table: Any, where: str = "models[0]", base: Path | None = None) -> ModelSpec:
    """A ModelSpec from one TOML/JSON table; ModelSpecError names ``where.key`` on any problem.

    A relative ``path`` is taken relative to ``base`` (the config file's folder) when given.
    """
    if isinstance(table, Mapping) and isinstance(table.get("path"), str):
        path = Path(table["path"]).expanduser()
        table = {**table, "path": path if path.is_absolute() or base is None else base / path}
    try:
        return from_table(ModelSpec, table)
    except FieldError as err:  # ModelSpecError included
        raise ModelSpecError(f"{where}.{err}" if not str(err).startswith(":") else f"{where}{err}") from None


def builtin_spec() -> ModelSpec:
    return ModelSpec(name=BUILTIN, kind="builtin")

