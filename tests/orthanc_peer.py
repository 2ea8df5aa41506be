"""A real Orthanc (Debian packages orthanc, orthanc-python, orthanc-dicomweb) for the tests, with
the Vesalius plugin, its own configuration, storage in a temp folder and free loopback ports.

It never touches a system Orthanc service: every instance here is our own child process, killed
when its ``with`` block ends.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, free_port
from tests.peers import running, wait_for

PLUGIN = ROOT / "orthanc" / "vesalius_plugin.py"
# The Orthanc configuration docker/compose.yaml mounts; every test Orthanc starts from it and changes
# only TEST_OVERRIDES (tests/test_compose.py holds the two to that)
COMPOSE_CONFIG = ROOT / "docker" / "orthanc" / "orthanc.json"
TEST_OVERRIDES = frozenset({"Name", "HttpPort", "DicomPort", "StorageDirectory", "IndexDirectory",
                            "Plugins", "PythonScript", "RemoteAccessAllowed", "StableAge",
                            "DicomModalities", "Vesalius"})
PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))


def plugin_library(name: str) -> Path:
    """Where Debian installs an Orthanc plugin (libOrthancPython.so, libOrthancDicomWeb.so)."""
    for folder in PLUGIN_DIRS:
        found = sorted(folder.glob(f"{name}.so*"))
        if found:
            return found[0]
    raise RuntimeError(f"{name}.so not found in {', '.join(map(str, PLUGIN_DIRS))}: "
                       "install the Debian packages orthanc-python and orthanc-dicomweb")


class HttpError(Exception):
    def __init__(self, code: int, body: str) -> None:
        super().__init__(f"HTTP {code}: {body[:500]}")
        self.code = code
        self.body = body


@dataclass
class OrthancProcess:
    http_port: int
    dicom_port: int
    aet: str
    log_path: Path
    proc: Any

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json", raw: bool = False) -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": content_type} if body is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                data = r.read()
        except urllib.error.HTTPError as err:
            raise HttpError(err.code, err.read().decode(errors="replace")) from err
        if raw:
            return data
        try:
            return json.loads(data) if data else None
        except ValueError:
            return data.decode(errors="replace")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, document: Any = None) -> Any:
        return self.request("POST", path, json.dumps(document if document is not None else {}).encode())

    def upload(self, files: Sequence[Path]) -> list[str]:
        """Store files through the REST API (POST /instances), as a user or a script would."""
        return [self.request("POST", "/instances", Path(f).read_bytes(), "application/dicom")["ID"]
                for f in files]

    def study_id(self, study_uid: str) -> str | None:
        found = self.request("POST", "/tools/lookup", study_uid.encode(), "text/plain")
        return next((f["ID"] for f in found if f["Type"] == "Study"), None)

    def series_of(self, study_id: str) -> list[dict[str, Any]]:
        """The study's series, each with the simplified tags of its first instance under "First"."""
        series = self.get(f"/studies/{study_id}/series")
        for s in series:
            s["First"] = self.get(f"/instances/{s['Instances'][0]}/simplified-tags") if s["Instances"] else {}
        return series

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def read_commented_json(path: Path) -> dict[str, Any]:
    """An Orthanc configuration file: JSON with // comments (after whitespace, so URLs survive)."""
    return json.loads(re.sub(r"(^|\s)//[^\n]*", r"\1", path.read_text()))


def orthanc_config(tmp: Path, http_port: int, dicom_port: int, *, vesalius: dict[str, Any] | None,
                   modalities: dict[str, list[Any]], stable_age: int = 1,
                   base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``base`` (default: compose's docker/orthanc/orthanc.json; or e.g. the documented example) with
    the keys a test run must have its own values for (TEST_OVERRIDES) set; no Vesalius section when
    ``vesalius`` is None."""
    storage = tmp / f"orthanc-{http_port}"
    config: dict[str, Any] = dict(base if base is not None else read_commented_json(COMPOSE_CONFIG))
    config |= {
        "Name": f"vesalius-test-{http_port}",
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "Plugins": [str(plugin_library("libOrthancPython")), str(plugin_library("libOrthancDicomWeb"))],
        "PythonScript": str(PLUGIN),
        "RemoteAccessAllowed": False,  # loopback only
        "StableAge": stable_age,
        "DicomModalities": modalities,
    }
    config.pop("Vesalius", None)
    if vesalius is not None:
        config["Vesalius"] = vesalius
    return config


@contextmanager
def orthanc_server(tmp: Path, *, vesalius: dict[str, Any] | None,
                   modalities: dict[str, list[Any]] | None = None, http_port: int | None = None,
                   dicom_port: int | None = None, stable_age: int = 1,
                   base: dict[str, Any] | None = None) -> Iterator[OrthancProcess]:
    """``Orthanc config.json`` as a child process, ready when its REST API and our plugin answer."""
    http_port, dicom_port = http_port or free_port(), dicom_port or free_port()
    config = orthanc_config(tmp, http_port, dicom_port, vesalius=vesalius, modalities=modalities or {},
                            stable_age=stable_age, base=base)
    with running_orthanc(tmp, config, plugin="python") as server:
        yield server


@contextmanager
def running_orthanc(tmp: Path, config: dict[str, Any], plugin: str) -> Iterator[OrthancProcess]:
    """Orthanc with ``config`` as a child process, ready when its REST API lists ``plugin``."""
    http_port, dicom_port = config["HttpPort"], config["DicomPort"]
    config_path = tmp / f"orthanc-{http_port}.json"
    config_path.write_text(json.dumps(config, indent=1))
    log_path = tmp / f"orthanc-{http_port}.log"
    with running(["Orthanc", "--verbose", str(config_path)], log_path) as proc:
        server = OrthancProcess(http_port, dicom_port, config["DicomAet"], log_path, proc)

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"Orthanc exited with {proc.returncode}:\n{server.log()[-3000:]}")
            try:
                return plugin in server.get("/plugins")
            except OSError:
                return False

        wait_for(ready, 30, "Orthanc's REST API")
        yield server
