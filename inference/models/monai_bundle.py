"""A MONAI bundle from a local folder, run with its own pre-processing and sliding-window settings.

Layout (the MONAI Bundle specification)::

    BUNDLE/configs/metadata.json         version, network_data_format.outputs.pred.channel_def
    BUNDLE/configs/inference.json|yaml   preprocessing, inferer, network_def
    BUNDLE/models/model.ts               TorchScript (preferred) ... or
    BUNDLE/models/model.pt               a state dict for network_def

The bundle's ``preprocessing`` Compose is instantiated from its config (its file loader dropped:
we hand it the volume), its ``inferer`` gives the ROI size and overlap, and its channel names
become our labels (``label_map`` in the model's config maps names that differ from ours).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vesalius.inference.models import Model
from vesalius.inference.models.backend import Backend
from vesalius.inference.models.spec import ModelSpec, ModelSpecError
from vesalius.inference.models.structures import Structures, coded_structures

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
WEIGHT_NAMES = ("model.ts", "model.pt")


def _inference_config(folder: Path) -> Path | None:
    return next((folder / "configs" / n for n in CONFIG_NAMES if (folder / "configs" / n).is_file()),
                None)


def bundle_problems(folder: Path) -> list[str]:
    """What a bundle folder lacks (empty when complete); reads no weights."""
    if not folder.is_dir():
        return [f"bundle folder {folder} does not exist"]
    problems = []
    if not (folder / "configs" / "metadata.json").is_file():
        problems.append(f"{folder}/configs/metadata.json is missing")
    if _inference_config(folder) is None:
        problems.append(f"{folder}/configs/inference.json (or .yaml) is missing")
    if not any((folder / "models" / n).is_file() for n in WEIGHT_NAMES):
        problems.append(f"weights {folder}/models/model.ts (or model.pt) are missing")
    return problems


VERSIONS_DIR = "versions"  # BUNDLE/versions/X.Y.Z: the versions `vesalius train` accepted


def bundle_version(folder: Path) -> str:
    """The semantic version a bundle folder's metadata.json states."""
    return str(_metadata(folder).get("version", "0.0.0"))


def version_key(version: str) -> tuple[int, ...]:
    """A semantic version as sortable numbers (non-numeric parts count 0)."""
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("+")[0].split("-")[0].split("."))


def bundle_versions(root: Path) -> dict[str, Path]:
    """Every version of a bundle: the folder itself and each accepted ``versions/X.Y.Z``."""
    found = {bundle_version(root): root} if (root / "configs" / "metadata.json").is_file() else {}
    versions = root / VERSIONS_DIR
    for folder in sorted(versions.iterdir()) if versions.is_dir() else ():
        if (folder / "configs" / "metadata.json").is_file() and not folder.name.startswith("."):
            found[bundle_version(folder)] = folder
    return found


def bundle_folder(spec: ModelSpec) -> Path:
    """The folder of the version the spec selects (``bundle_version``: "", "latest" or "X.Y.Z")."""
    root = Backend.path(spec)
    if not spec.bundle_version:
        return root
    versions = bundle_versions(root)
    if spec.bundle_version == "latest":
        return versions[max(versions, key=version_key)] if versions else root
    if spec.bundle_version not in versions:
        raise ModelSpecError(f"model {spec.name!r}: bundle_version {spec.bundle_version!r} is not one of "
                             f"{', '.join(sorted(versions, key=version_key)) or 'none'} in {root}")
    return versions[spec.bundle_version]


def _metadata(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "configs" / "metadata.json").read_text())


def bundle_labels(spec: ModelSpec) -> Structures:
    """Labels from the spec's ``labels`` or the bundle's ``channel_def``, mapped to coded names."""
    names = dict(spec.labels)
    if not names:
        meta = _metadata(bundle_folder(spec))
        try:
            channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
        except KeyError:
            raise ModelSpecError(f"bundle {spec.path}: metadata.json has no network_data_format."
                                 "outputs.pred.channel_def; give labels in the model config") from None
        names = {int(k): str(v) for k, v in channel_def.items()}
    return coded_structures(names, spec.label_map, spec.name)


def load_bundle(spec: ModelSpec) -> Model:
    """The bundle as a NetworkModel on this worker's device."""
    from monai.bundle import ConfigParser

    from vesalius.inference.device import select_device
    from vesalius.inference.models.network import NetworkModel, without_loader

    folder = bundle_folder(spec)
    device = select_device(spec.device)
    meta = _metadata(folder)
    parser = ConfigParser()
    parser.read_meta(str(folder / "configs" / "metadata.json"))
    parser.read_config(str(_inference_config(folder)))
    parser["bundle_root"] = str(folder)
    parser["device"] = f"$torch.device('{device.torch_name}')"
    try:
        preprocessing = without_loader(parser.get_parsed_content("preprocessing"))
        window = _window(parser, spec)
    except Exception as err:  # a config MONAI cannot instantiate: name the bundle and the reason
        raise ModelSpecError(f"bundle {folder}: cannot build its preprocessing/inferer: {err}") from err
    network = _network(folder, parser, device.torch_name)
    labels, channels = bundle_labels(spec)
    name = spec.name if spec.name != folder.name else str(meta.get("name") or folder.name)
    return NetworkModel(name=_safe_name(name), version=spec.version or str(meta.get("version", "1")),
                        structures=labels, channels=channels, preprocessing=preprocessing,
                        window=window, runner=network, device=device, precision=spec.precision)


def _safe_name(name: str) -> str:
    return "_".join(name.split()).replace("/", "_") or "bundle"


def _window(parser: Any, spec: ModelSpec) -> Any:
    from vesalius.inference.models.network import Window

    inferer = parser.get_parsed_content("inferer") if "inferer" in parser else None
    roi = spec.roi_size or tuple(int(v) for v in getattr(inferer, "roi_size", ()) or ())
    if not roi:
        raise ModelSpecError(f"bundle {spec.path}: no inferer.roi_size; set roi_size in the model config")
    overlap = spec.overlap if spec.overlap is not None else float(getattr(inferer, "overlap", 0.25))
    batch = spec.sw_batch_size or int(getattr(inferer, "sw_batch_size", 1))
    mode = getattr(inferer, "mode", "constant")
    return Window(roi_size=tuple(roi), overlap=overlap, sw_batch_size=batch,
                  mode=str(getattr(mode, "value", mode)))


def _network(folder: Path, parser: Any, device: str) -> Any:
    import torch

    scripted = folder / "models" / "model.ts"
    if scripted.is_file():
        network = torch.jit.load(str(scripted), map_location=device)
    else:
        network = parser.get_parsed_content("network_def")
        state = torch.load(folder / "models" / "model.pt", map_location=device, weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        network.load_state_dict(state)
        network = network.to(device)
    return network.eval()


class BundleBackend(Backend):
    """``bundle``: a MONAI bundle folder with its own pre-processing, inferer and channel names."""

    kind = "bundle"
    requires = ("monai", "torch")
    extra = "ai"

    def weight_problems(self, spec: ModelSpec) -> list[str]:
        try:
            return bundle_problems(bundle_folder(spec))
        except ModelSpecError as err:
            return [str(err)]

    def revision(self, spec: ModelSpec) -> str:
        """The folder a spec resolves to now: a newly accepted version is loaded on the next job."""
        return str(bundle_folder(spec))

    def structures(self, spec: ModelSpec) -> Structures:
        return bundle_labels(spec)

    def load(self, spec: ModelSpec) -> Model:
        return load_bundle(spec)


backend = BundleBackend()
