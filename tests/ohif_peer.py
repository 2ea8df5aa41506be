"""OHIF Viewer (npm @ohif/app, its prebuilt ``dist``) and a real Orthanc on one loopback origin.

OHIF's DICOMweb client and the viewer must share an origin (no CORS set-up), and OHIF's built
pages load their scripts from "/". So a small HTTP server of our own serves the viewer's files at
"/", its ``app-config.js`` pointing the DICOMweb data source at "/dicom-web", and forwards
"/dicom-web/..." to the Orthanc given (GET only: the browser only reads). Unknown paths get
``index.html``, as OHIF's client-side routes (``/viewer?StudyInstanceUIDs=...``) need.
"""

from __future__ import annotations

import http.server
import mimetypes
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import ROOT, free_port
from tests.orthanc_peer import OrthancProcess, orthanc_config, plugin_library, running_orthanc

OHIF_DIST = ROOT / "tests" / "ohif" / "node_modules" / "@ohif" / "app" / "dist"
OHIF_VERSION = "3.13.2"  # tests/ohif/package.json pins the same

# OHIF's configuration, shared with docker/compose.yaml's viewer: Orthanc's DICOMweb, same origin
APP_CONFIG_JS = ROOT / "docker" / "ohif" / "app-config.js"
mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")


def _dist() -> Path:
    if not (OHIF_DIST / "index.html").is_file():
        raise RuntimeError(f"OHIF's viewer is not installed at {OHIF_DIST}: run scripts/setup.sh test "
                           "(npm ci in tests/ohif)")
    return OHIF_DIST.resolve()


class _Handler(http.server.BaseHTTPRequestHandler):
    dist: Path
    orthanc_url: str

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
        pass  # hundreds of requests per page; the test reports what fails

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        path = self.path.split("?", 1)[0]
        if path.startswith("/dicom-web/"):
            self._forward()
        elif path == "/app-config.js":
            self._send(200, "text/javascript", APP_CONFIG_JS.read_bytes())
        else:
            self._file(path)

    def _file(self, path: str) -> None:
        candidate = (self.dist / path.lstrip("/")).resolve()
        if not candidate.is_relative_to(self.dist) or not candidate.is_file():
            candidate = self.dist / "index.html"  # a client-side route of the single-page app
        kind = mimetypes.guess_type(candidate.name)[0] or "application/octet-stream"
        self._send(200, kind, candidate.read_bytes())

    def _forward(self) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "range")}
        request = urllib.request.Request(self.orthanc_url + self.path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                status, kind, body = answer.status, answer.headers.get("Content-Type", ""), answer.read()
        except urllib.error.HTTPError as err:
            status, kind, body = err.code, err.headers.get("Content-Type", "text/plain"), err.read()
        self._send(status, kind, body)

    def _send(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def ohif_server(orthanc_url: str) -> Iterator[str]:
    """Serve OHIF with Orthanc's DICOMweb under it on a free loopback port; yields the base URL."""
    handler = type("Handler", (_Handler,), {"dist": _dist(), "orthanc_url": orthanc_url.rstrip("/")})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextmanager
def orthanc_dicomweb(tmp: Path) -> Iterator[OrthancProcess]:
    """A plain Orthanc, as a site runs it under OHIF: storage plus the DICOMweb plugin only."""
    http_port, dicom_port = free_port(), free_port()
    config = orthanc_config(tmp, http_port, dicom_port, vesalius=None, modalities={})
    config["Plugins"] = [str(plugin_library("libOrthancDicomWeb"))]
    del config["PythonScript"], config["PythonVerbose"]
    with running_orthanc(tmp, config, plugin="dicom-web") as server:
        yield server
