"""scripts/setup.sh installs once: a later start (serve.sh calls it every time) needs no network."""

from __future__ import annotations

import os
import subprocess

from tests.conftest import ROOT


def test_setup_on_an_installed_tree_installs_nothing_and_needs_no_network() -> None:
    stamp = ROOT / ".venv" / ".vesalius-installed"
    assert stamp.exists(), "the test command runs scripts/setup.sh first, which writes the stamp"
    before = stamp.stat().st_mtime_ns
    # no index and no local wheels: any pip install would fail
    offline = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": os.devnull}
    for extras in ("test,ai,ray,postgres", "", "ai"):  # what test.sh, serve.sh and a model-only setup ask for
        result = subprocess.run(["bash", "scripts/setup.sh", extras], cwd=ROOT, env=offline,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
    assert stamp.stat().st_mtime_ns == before
