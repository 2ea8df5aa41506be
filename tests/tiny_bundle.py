"""A real, tiny MONAI bundle trained in seconds on synthetic phantoms, for the network backends' tests.

Phantoms are a sphere ("liver") and a box ("heart") of set intensity in noisy soft tissue, on grids of
random orientation (any rotation) and anisotropic spacing. Training patches go through the bundle's
own pre-processing (instantiated from its inference.json by the same code the node uses), and
the truth is evaluated analytically on the pre-processed grid, so the network learns the task in
the bundle's canonical space, as a real bundle's network does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from tests.phantoms import Box, Sphere

LABELS = {0: "background", 1: "liver", 2: "heart"}
SPACING = (2.0, 2.0, 2.0)
ROI = (32, 32, 32)
WINDOW = {"a_min": -200.0, "a_max": 600.0, "b_min": 0.0, "b_max": 1.0, "clip": True}
NETWORK = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
           "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}


@dataclass(frozen=True)
class Scene:
    """One phantom: a sphere (label 1) and a box (label 2, painted last) in soft tissue."""

    sphere: Sphere
    box: Box
    background_hu: float

    @property
    def objects(self) -> list[Sphere | Box]:
        return [self.sphere, self.box]

    def truth(self, points: np.ndarray) -> np.ndarray:
        """Label value (0, 1, 2) at LPS points (..., 3)."""
        labels = np.zeros(points.shape[:-1], np.uint8)
        labels[self.sphere.inside(points)] = 1
        labels[self.box.inside(points)] = 2
        return labels


def random_scene(rng: np.random.Generator) -> Scene:
    """Sphere and box on opposite sides of the centre, intensities varied within their tissue."""
    direction = Rotation.random(random_state=rng).apply([1.0, 0.0, 0.0])
    offset = direction * rng.uniform(22, 28)
    sphere = Sphere(tuple(offset), float(rng.uniform(15, 21)), float(rng.uniform(40, 90)))
    box = Box(tuple(-offset), tuple(float(v) for v in rng.uniform(18, 28, 3)),
              float(rng.uniform(300, 700)))
    return Scene(sphere, box, float(rng.uniform(-150, -60)))


def grid_points(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """LPS coordinates (shape..., 3) of every voxel centre of an (index -> LPS) affine."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def random_grid(rng: np.random.Generator, fov_mm: float = 112.0) -> tuple[np.ndarray, tuple[int, ...]]:
    """Any rotation, anisotropic spacing; centred on the origin; about ``fov_mm`` across."""
    spacing = np.array([rng.uniform(2.0, 3.5), rng.uniform(0.9, 1.8), rng.uniform(0.9, 1.8)])
    shape = tuple(int(round(fov_mm / s)) for s in spacing)
    affine = np.eye(4)
    affine[:3, :3] = Rotation.random(random_state=rng).as_matrix() * spacing
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return affine, shape


def render(scene: Scene, affine: np.ndarray, shape: tuple[int, ...],
           rng: np.random.Generator | None, noise_hu: float = 20.0) -> np.ndarray:
    """HU of the scene on a grid, with Gaussian noise when ``rng`` is given."""
    points = grid_points(affine, shape)
    hu = np.full(shape, scene.background_hu, np.float32)
    for obj in scene.objects:
        hu[obj.inside(points)] = obj.hu
    if rng is not None:
        hu += rng.normal(0, noise_hu, shape).astype(np.float32)
    return hu


def inference_config() -> dict:
    """configs/inference.json of the bundle, in the MONAI bundle format."""
    return {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": NETWORK,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": list(SPACING), "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", **WINDOW},
            {"_target_": "EnsureTyped", "keys": "image"},
        ]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(ROI), "sw_batch_size": 4,
                    "overlap": 0.25},
    }


def metadata() -> dict:
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
                  "0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "name": "tiny_phantom_segmentation",
        "monai_version": "1.6.1",
        "task": "Sphere and box segmentation in synthetic CT phantoms",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "num_channels": 1,
                                 "spatial_shape": list(ROI), "dtype": "float32"}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 3,
                                 "spatial_shape": list(ROI), "dtype": "float32",
                                 "channel_def": {str(k): v for k, v in LABELS.items()}}},
        },
    }


def write_bundle_configs(folder: Path) -> None:
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(parents=True, exist_ok=True)
    (folder / "configs" / "inference.json").write_text(json.dumps(inference_config(), indent=2))
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata(), indent=2))


def grown(scene: Scene, mm: float) -> Scene:
    """The scene with every object ``mm`` larger on each side (a systematic labelling error)."""
    sphere, box = scene.sphere, scene.box
    return Scene(Sphere(sphere.center, sphere.radius + mm, sphere.hu),
                 Box(box.center, tuple(s + 2 * mm for s in box.size), box.hu), scene.background_hu)


def training_set(folder: Path, count: int, seed: int, grow_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Pre-processed images (N, 1, X, Y, Z) and labels (N, X, Y, Z), cropped to a common size;
    ``grow_mm`` labels every structure that much too large."""
    import torch
    from monai.bundle import ConfigParser
    from monai.data import MetaTensor

    from vesalius.inference.models.network import LPS_TO_RAS, without_loader

    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    preprocessing = without_loader(parser.get_parsed_content("preprocessing"))
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(count):
        scene = random_scene(rng)
        affine, shape = random_grid(rng)
        hu = render(scene, affine, shape, rng)
        image = MetaTensor(torch.from_numpy(hu), affine=torch.as_tensor(LPS_TO_RAS @ affine),
                           meta={"original_channel_dim": "no_channel", "space": "RAS"})
        out = preprocessing({"image": image})["image"]
        ras_affine = np.asarray(out.affine, dtype=np.float64)
        truth = grown(scene, grow_mm).truth(grid_points(LPS_TO_RAS @ ras_affine, tuple(out.shape[1:])))
        images.append(np.asarray(out.as_tensor().numpy(), np.float32))
        labels.append(truth)
    size = tuple(min(i.shape[d + 1] for i in images) for d in range(3))
    crop = [tuple(slice((s - n) // 2, (s - n) // 2 + n) for s, n in zip(i.shape[1:], size, strict=True))
            for i in images]
    return (np.stack([i[(slice(None), *c)] for i, c in zip(images, crop, strict=True)]),
            np.stack([t[c] for t, c in zip(labels, crop, strict=True)]))


def train(folder: Path, steps: int = 150, seed: int = 0, batch: int = 4, grow_mm: float = 0.0):
    """Train the bundle's network on random patches of a freshly generated training set."""
    import torch
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    images, labels = training_set(folder, count=10, seed=seed, grow_mm=grow_mm)
    network = UNet(**{k: v for k, v in NETWORK.items() if k != "_target_"})
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimiser = torch.optim.Adam(network.parameters(), lr=5e-3)
    rng = np.random.default_rng(seed + 1)
    network.train()
    for _ in range(steps):
        batch_x, batch_y = [], []
        for _ in range(batch):
            n = rng.integers(len(images))
            start = [rng.integers(0, s - r + 1) for s, r in zip(images.shape[2:], ROI, strict=True)]
            window = tuple(slice(a, a + r) for a, r in zip(start, ROI, strict=True))
            batch_x.append(images[n][(slice(None), *window)])
            batch_y.append(labels[n][window][None])
        x = torch.from_numpy(np.stack(batch_x))
        y = torch.from_numpy(np.stack(batch_y).astype(np.int64))
        optimiser.zero_grad()
        loss = loss_fn(network(x), y)
        loss.backward()
        optimiser.step()
    return network.eval()


def build_bundle(folder: Path, steps: int = 150, seed: int = 0, grow_mm: float = 0.0) -> Path:
    """A trained bundle at ``folder``: configs + models/model.ts (TorchScript); ``grow_mm``
    trains it to segment every structure that much too large."""
    import torch

    write_bundle_configs(folder)
    network = train(folder, steps=steps, seed=seed, grow_mm=grow_mm)
    torch.jit.script(network).save(str(folder / "models" / "model.ts"))
    return folder


def export_onnx(bundle: Path, out: Path) -> Path:
    """The bundle's network as ONNX (dynamic batch), with a model.json sidecar of its settings."""
    import torch
    from monai.networks.nets import UNet

    network = UNet(**{k: v for k, v in NETWORK.items() if k != "_target_"})
    network.load_state_dict(torch.jit.load(str(bundle / "models" / "model.ts")).state_dict())
    network.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros((1, 1, *ROI))
    torch.onnx.export(network, (example,), str(out), input_names=["image"], output_names=["pred"],
                      dynamic_axes={"image": {0: "batch"}, "pred": {0: "batch"}}, dynamo=False)
    out.with_suffix(".json").write_text(json.dumps({
        "version": "0.1.0", "labels": {str(k): v for k, v in LABELS.items() if k},
        "spacing": list(SPACING), "orientation": "RAS", "intensity": WINDOW,
        "roi_size": list(ROI), "overlap": 0.25, "sw_batch_size": 4,
    }, indent=2))
    return out
