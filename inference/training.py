"""Fine-tune a MONAI bundle on corrected cases, and keep the result only if it does better.

The current version and the fine-tuned one are both validated on the same held-back cases, each
through the node's own inference path (``NetworkModel.predict``: the bundle's pre-processing,
sliding window, inversion to the case's grid) and scored with ``vesalius evaluate``'s metrics. A
new version (``BUNDLE/versions/X.Y.Z``: configs with the version bumped and a changelog entry, the
weights, ``training.json`` with the before/after Dice per structure) is written only when the mean
validation Dice improves by at least ``min_improvement``; otherwise nothing is written and the
result says why. Training patches go through the bundle's pre-processing; the label is sampled
(nearest) on the pre-processed grid, so the network learns in its canonical space.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from vesalius.inference.models.monai_bundle import VERSIONS_DIR, bundle_version, version_key
from vesalius.inference.models.spec import ModelSpec


class TrainingError(ValueError):
    """Training cannot start (too few cases, no structure in common); str(err) says why."""


@dataclass(frozen=True)
class TrainingCase:
    """A volume and its corrected label map on the same grid (NIfTI), with the label names."""

    name: str
    image: Path
    label: Path
    labels: dict[int, str]  # value in the label map -> structure name


@dataclass(frozen=True)
class TrainingResult:
    accepted: bool
    reason: str
    base_version: str
    version: str | None = None  # the new version, when accepted
    folder: Path | None = None
    before: dict[str, float] = field(default_factory=dict)  # mean validation Dice per structure
    after: dict[str, float] = field(default_factory=dict)
    train_cases: tuple[str, ...] = ()
    val_cases: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "reason": self.reason, "base_version": self.base_version,
                "version": self.version, "folder": str(self.folder) if self.folder else None,
                "before": self.before, "after": self.after, "mean_before": _mean(self.before),
                "mean_after": _mean(self.after), "train_cases": list(self.train_cases),
                "val_cases": list(self.val_cases)}


def split(cases: Sequence[TrainingCase],
          val_fraction: float) -> tuple[list[TrainingCase], list[TrainingCase]]:
    """Hold back the newest ``val_fraction`` of the cases (in the order given, oldest first): a new
    version must do better on the most recent corrections than the current one."""
    if not 0 < val_fraction < 1:
        raise TrainingError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if len(cases) < 2:
        raise TrainingError(f"training needs at least 2 cases (one to train on, one to validate), "
                            f"the library has {len(cases)}")
    held = min(len(cases) - 1, max(1, round(len(cases) * val_fraction)))
    return list(cases[:-held]), list(cases[-held:])


def fine_tune(root: Path, current: Path, train: Sequence[TrainingCase], val: Sequence[TrainingCase], *,
              epochs: int = 10, min_improvement: float = 0.005, learning_rate: float = 1e-3, seed: int = 0,
              device: str = "auto", model_name: str = "") -> TrainingResult:
    """Fine-tune ``current`` (a version folder of the bundle at ``root``) on ``train``, validate both
    on ``val``; write ``root/versions/<bumped>`` only if the mean validation Dice improves."""
    from vesalius.inference.models.monai_bundle import load_bundle

    base_version = bundle_version(current)
    spec = ModelSpec(name=model_name or root.name, kind="bundle", path=current, device=device)
    model: Any = load_bundle(spec)
    targets = _channel_of_name(model)
    before = validate(model, val)
    if not before:
        raise TrainingError("no structure of the validation cases matches one of the model's")
    staging = root / VERSIONS_DIR / f".training-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(current, staging, ignore=shutil.ignore_patterns(VERSIONS_DIR, "training.json"))
    try:
        network = _train(model, train, targets, epochs=epochs, learning_rate=learning_rate, seed=seed)
        _save_network(network, staging)
        tuned: Any = load_bundle(ModelSpec(name=spec.name, kind="bundle", path=staging, device=device))
        after = validate(tuned, val)
        names = (tuple(c.name for c in train), tuple(c.name for c in val))
        gain = _mean(after) - _mean(before)
        if gain < min_improvement:
            shutil.rmtree(staging, ignore_errors=True)
            return TrainingResult(False, f"validation Dice {_mean(before):.4f} -> {_mean(after):.4f} "
                                  f"({gain:+.4f}) on {len(val)} held-back case(s): below the required "
                                  f"+{min_improvement:.4f}; version {base_version} stays",
                                  base_version, before=before, after=after, train_cases=names[0],
                                  val_cases=names[1])
        version = bumped(base_version, root)
        folder = root / VERSIONS_DIR / version
        _write_version(staging, base_version, version, before, after, names, epochs)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return TrainingResult(True, f"validation Dice {_mean(before):.4f} -> {_mean(after):.4f} ({gain:+.4f}) on "
                          f"{len(val)} held-back case(s)", base_version, version, folder, before, after,
                          *names)


def validate(model: Any, cases: Sequence[TrainingCase]) -> dict[str, float]:
    """Mean Dice per structure of the model's predictions against the cases' labels."""
    from vesalius.inference.evaluation import evaluate
    from vesalius.inference.evaluation.labels import LabelImage
    from vesalius.inference.volume_files import read_volume_file

    scores: dict[str, list[float]] = {}
    names = {s.value: s.name for s in model.structures}
    for case in cases:
        volume = read_volume_file(case.image).volume
        label = np.rint(read_volume_file(case.label).volume.array).astype(np.int64)
        pred = LabelImage.from_label_map(model.predict(volume), names, volume.affine)
        ref = LabelImage.from_label_map(label, case.labels, volume.affine)
        for row in evaluate(pred, ref).structures:
            scores.setdefault(row["name"], []).append(float(row["dice"] or 0.0))
    return {name: round(float(np.mean(v)), 4) for name, v in sorted(scores.items())}


def bumped(version: str, root: Path) -> str:
    """The next minor version above ``version`` and every version the bundle already has."""
    from vesalius.inference.models.monai_bundle import bundle_versions

    highest = max([version, *bundle_versions(root)], key=version_key)
    major, minor = (list(version_key(highest)) + [0, 0])[:2]
    return f"{major}.{minor + 1}.0"


def _mean(scores: dict[str, float]) -> float:
    return round(float(np.mean(list(scores.values()))), 4) if scores else 0.0


def _channel_of_name(model: Any) -> dict[str, int]:
    """Structure name (and coded concept) -> the network's output channel."""
    from vesalius.inference.evaluation.labels import concept_of_name

    value_to_channel = {value: channel for channel, value in model.channels.items()}
    out: dict[str, int] = {}
    for structure in model.structures:
        channel = value_to_channel.get(structure.value)
        if channel is None:
            continue
        out[structure.name.lower()] = channel
        concept = concept_of_name(structure.name)
        if concept is not None:
            out[repr(concept)] = channel
    return out


def _target(name: str, targets: dict[str, int]) -> int | None:
    from vesalius.inference.evaluation.labels import concept_of_name

    concept = concept_of_name(name)
    found = targets.get(repr(concept)) if concept is not None else None
    return found if found is not None else targets.get(name.lower())


def _prepared(model: Any, case: TrainingCase, targets: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """The case's image through the model's pre-processing, and its label as output channels
    sampled (nearest) on that grid."""
    from vesalius.inference.models.network import LPS_TO_RAS, to_metatensor
    from vesalius.inference.volume_files import read_volume_file

    volume = read_volume_file(case.image).volume
    label = np.rint(read_volume_file(case.label).volume.array).astype(np.int64)
    channel_of_value = np.zeros(max(case.labels, default=0) + 1, np.int64)
    for value, name in case.labels.items():
        channel = _target(name, targets)
        if channel is not None:
            channel_of_value[value] = channel
    out = model.preprocessing({"image": to_metatensor(volume)})["image"]
    shape = tuple(int(n) for n in out.shape[1:])
    lps = LPS_TO_RAS @ np.asarray(out.affine, np.float64)  # pre-processed voxel -> LPS
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    points = index @ lps[:3, :3].T + lps[:3, 3]
    to_index = np.linalg.inv(volume.affine[:3, :3]).T
    source = np.rint((points - volume.affine[:3, 3]) @ to_index).astype(np.int64)
    inside = np.all((source >= 0) & (source < np.array(label.shape)), axis=1)
    sampled = np.zeros(len(points), np.int64)
    sampled[inside] = label[tuple(source[inside].T)]
    return (np.asarray(out.as_tensor().numpy(), np.float32),
            channel_of_value[np.clip(sampled, 0, len(channel_of_value) - 1)].reshape(shape))


def _train(model: Any, cases: Sequence[TrainingCase], targets: dict[str, int], *, epochs: int,
           learning_rate: float, seed: int) -> Any:
    """The model's network trained on random ROI patches of the cases (DiceCE loss, Adam);
    one epoch is one patch batch per training case."""
    import torch
    from monai.losses import DiceCELoss

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    prepared = [_prepared(model, case, targets) for case in cases]
    network = model.runner
    channels = max(model.channels, default=0) + 1
    roi = tuple(model.window.roi_size)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=channels > 1)
    optimiser = torch.optim.Adam(network.parameters(), lr=learning_rate)
    network.train()
    torch_device = model.device.torch_name
    for _ in range(epochs * len(prepared)):
        batch_x, batch_y = [], []
        for _ in range(4):
            image, label = prepared[int(rng.integers(len(prepared)))]
            padded = [max(0, r - s) for s, r in zip(image.shape[1:], roi, strict=True)]
            if any(padded):
                image = np.pad(image, [(0, 0), *[(0, p) for p in padded]])
                label = np.pad(label, [(0, p) for p in padded])
            start = [int(rng.integers(0, s - r + 1)) for s, r in zip(image.shape[1:], roi, strict=True)]
            window = tuple(slice(a, a + r) for a, r in zip(start, roi, strict=True))
            batch_x.append(image[(slice(None), *window)])
            batch_y.append(label[window][None])
        x = torch.from_numpy(np.stack(batch_x)).to(torch_device)
        y = torch.from_numpy(np.stack(batch_y)).to(torch_device)
        optimiser.zero_grad()
        loss = loss_fn(network(x), y)
        loss.backward()
        optimiser.step()
    return network.eval()


def _save_network(network: Any, folder: Path) -> None:
    import torch

    scripted = folder / "models" / "model.ts"
    if scripted.is_file():
        torch.jit.save(network if isinstance(network, torch.jit.ScriptModule) else torch.jit.script(network),
                       str(scripted))
    else:
        torch.save(network.state_dict(), folder / "models" / "model.pt")


def _write_version(folder: Path, base: str, version: str, before: dict[str, float], after: dict[str, float],
                   names: tuple[tuple[str, ...], tuple[str, ...]], epochs: int) -> None:
    """metadata.json with the new version and a changelog entry; training.json beside the configs."""
    meta_path = folder / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["version"] = version
    when = datetime.now(UTC).isoformat(timespec="seconds")
    change = (f"fine-tuned from {base} on {len(names[0])} corrected case(s), {epochs} epoch(s); validation "
              f"Dice {_mean(before):.4f} -> {_mean(after):.4f} on {len(names[1])} held-back case(s) "
              f"(vesalius train, {when})")
    meta["changelog"] = {version: change, **dict(meta.get("changelog") or {})}
    meta_path.write_text(json.dumps(meta, indent=2))
    (folder / "training.json").write_text(json.dumps({
        "version": version, "base_version": base, "trained_at": when, "epochs": epochs,
        "train_cases": list(names[0]), "val_cases": list(names[1]),
        "dice_before": before, "dice_after": after, "mean_before": _mean(before), "mean_after": _mean(after),
    }, indent=2))
