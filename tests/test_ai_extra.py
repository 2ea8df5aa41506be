"""`pip install vesalius[ai]` alone runs a typical MONAI bundle: a fresh virtual environment with
only that extra (no test extra) runs a bundle whose pre-processing uses Orientationd, Spacingd and
ScaleIntensityRanged with a SlidingWindowInferer, through `vesalius process`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import tiny_bundle
from tests.conftest import ROOT
from tests.phantoms import write_phantom_series

SCENE = tiny_bundle.Scene(tiny_bundle.Sphere((16.0, -8.0, 6.0), 18.0, 60.0),
                          tiny_bundle.Box((-18.0, 10.0, -4.0), (24.0, 20.0, 22.0), 450.0), -100.0)


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a command with nothing of this environment's Python path (only the venv's own packages)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def ai_only_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv holding vesalius[ai] and nothing else (the CPU torch first, as setup.sh does)."""
    folder = tmp_path_factory.mktemp("ai-venv")
    run([sys.executable, "-m", "venv", str(folder / "venv")], 600)
    python = folder / "venv" / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], 600)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(folder / "wheel"), str(ROOT)],
        300)
    (wheel,) = (folder / "wheel").glob("vesalius-*.whl")
    run([str(python), "-m", "pip", "install", "-q", f"vesalius[ai] @ {wheel.as_uri()}"], 600)
    return python


@pytest.mark.timeout(1200)  # installing a fresh venv dominates: about 2 min on a quiet 2-core machine
def test_a_bundle_runs_with_only_the_ai_extra(tmp_path: Path, ai_only_python: Path) -> None:
    import torch

    torch.set_num_threads(2)
    bundle = tiny_bundle.build_bundle(tmp_path / "bundle", steps=40)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    targets = {t["_target_"] for t in config["preprocessing"]["transforms"]}
    assert {"Orientationd", "Spacingd", "ScaleIntensityRanged"} <= targets
    assert config["inferer"]["_target_"] == "SlidingWindowInferer"
    series = write_phantom_series(tmp_path / "series", shape=(24, 64, 60), spacing=(3.0, 1.5, 1.5),
                                  orientation="axial", objects=SCENE.objects,
                                  background_hu=SCENE.background_hu)
    probe = run([str(ai_only_python), "-c", "import importlib.util as u; "
                 "print(*(m for m in ('pytest', 'hypothesis', 'trimesh') if u.find_spec(m)))"], 60)
    assert probe.stdout.split() == [], "the venv must hold the ai extra only, not the test extra"
    result = run([str(ai_only_python), "-m", "vesalius.node.cli", "process", str(series.paths[0].parent),
                  "--out", str(tmp_path / "out"), "--model", f"bundle:{bundle}", "--json"], 600)
    summary = json.loads(result.stdout)
    assert summary["model"]["name"] == "tiny_phantom_segmentation"
    assert {s["name"] for s in summary["structures"]} == {"liver", "heart"}
    assert (tmp_path / "out" / "seg.dcm").exists()
