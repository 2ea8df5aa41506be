"""Real processes on loopback for the tests: the node itself, DCMTK storescp (a PACS) and storescu.

Every server binds 127.0.0.1 on a free port and is killed when its ``with`` block ends, even when
the test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import free_port

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # Debian's DCMTK stalls ~40 ms per image without it


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@contextmanager
def running(cmd: Sequence[str], log_path: Path,
            env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """A child process whose output goes to ``log_path``; killed (whole group) on exit."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@dataclass
class StoreSCP:
    ae_title: str
    port: int
    folder: Path

    @property
    def address(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())


@contextmanager
def storescp(folder: Path, ae_title: str = "PACS", port: int | None = None) -> Iterator[StoreSCP]:
    """DCMTK storescp accepting every storage SOP class and transfer syntax it knows."""
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = ["storescp", "-aet", ae_title, "-od", str(folder), "+xa", "-pm", str(port)]
    with running(cmd, folder.parent / f"storescp-{port}.log", DCMTK_ENV):
        wait_for(lambda: port_open(port), 10, "storescp to listen")
        yield StoreSCP(ae_title, port, folder)


def storescu(files: Sequence[Path], port: int, ae_title: str = "VESALIUS", calling: str = "SCANNER",
             extra: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """Send files with DCMTK storescu in one association; fails the test when storescu fails."""
    cmd = ["storescu", "-aet", calling, "-aec", ae_title, *extra, "127.0.0.1", str(port), *map(str, files)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=DCMTK_ENV, timeout=300)
    assert result.returncode == 0, f"storescu failed ({result.returncode}): {result.stderr[-2000:]}"
    return result


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class NodeProcess:
    proc: subprocess.Popen
    port: int
    http_port: int
    data_dir: Path
    log_path: Path
    ae_title: str = "VESALIUS"

    def token(self) -> str:
        """The node's own API token (``local``), created in its data folder at first start; read
        through the node's own root, so a node in a private mount (a small tmpfs) works too."""
        return (Path(f"/proc/{self.proc.pid}/root") / self.data_dir.resolve().relative_to("/")
                / "http.token").read_text().strip()

    def request(self, path: str, method: str = "GET", token: str | None = "", data: bytes | None = None,
                content_type: str | None = None, timeout: float = 5) -> tuple[int, Any]:
        """(status, body) of one request; ``token`` "" = the node's own, None = no Authorization."""
        headers = {} if token is None else {"Authorization": f"Bearer {token or self.token()}"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", method=method,
                                     headers=headers, data=data)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, body = r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            status, body = err.code, err.read().decode()
        return status, (body if path == "/metrics" and status == 200 else json.loads(body))

    def get(self, path: str) -> Any:
        """An authenticated GET that must succeed; JSON decoded (text for /metrics)."""
        status, body = self.request(path)
        assert status == 200, f"GET {path}: HTTP {status} {body}"
        return body

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def jobs(self) -> list[dict]:
        return self.get("/jobs")

    def deliveries(self) -> list[dict]:
        return self.get("/deliveries")

    def delivered(self, count: int | None = None) -> bool:
        """Every delivery done (and ``count`` of them, when given), read in one request; one that
        sent only a job's first objects (part "first": its job still runs) is not done yet."""
        rows = self.deliveries()
        return (bool(rows) and all(r["state"] == "done" and r["part"] != "first" for r in rows)
                and count in (None, len(rows)))


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@contextmanager
def vesalius_node(tmp: Path, *, destinations: Sequence[str] = (), config: str = "",
                  data_dir: Path | None = None, port: int | None = None,
                  http_port: int | None = None, wrap: Sequence[str] = ()) -> Iterator[NodeProcess]:
    """``vesalius serve`` as a real child process, ready when /healthz answers; ``wrap`` is a
    command prefix (e.g. ``unshare``) that ends by exec-ing the node, so its pid is the node's."""
    port, http_port = port or free_port(), http_port or free_port()
    data_dir = data_dir or tmp / "node-data"
    config_path = write_config(tmp / f"node-{port}.toml", 'host = "127.0.0.1"\nquiet_period = 0.5\n' + config)
    cmd = [*wrap, sys.executable, "-m", "vesalius.node.cli", "serve", "--config", str(config_path),
           "--port", str(port), "--http-port", str(http_port), "--data-dir", str(data_dir)]
    for d in destinations:
        cmd += ["--destination", d]
    log_path = tmp / f"node-{port}.log"
    with running(cmd, log_path) as proc:
        node = NodeProcess(proc, port, http_port, data_dir, log_path)

        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"node exited with {proc.returncode}:\n{node.log()[-3000:]}")
            try:
                return node.request("/healthz", token=None) == (200, {"status": "ok"})
            except OSError:
                return False

        wait_for(healthy, 60, "the node's /healthz")
        yield node


def worker_pids(pid: int) -> list[int]:
    """The node's multiprocessing worker processes (not its resource tracker)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid and b"spawn_main" in cmdline:
            found.append(int(proc.name))
    return found


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, ended but not yet reaped, counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def send_seg(port: int, data: bytes, calling_ae: str = "VIEWER") -> None:
    """C-STORE one SEG (its file bytes) to the node in its own transfer syntax, as a viewer sending
    a correction does; asserts the node stored it."""
    import io

    import pydicom
    from pynetdicom import AE

    ds = pydicom.dcmread(io.BytesIO(data))
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="VESALIUS")
    assert assoc.is_established, "the node refused the association"
    try:
        status = assoc.send_c_store(ds)
        assert status.Status == 0, status
    finally:
        assoc.release()


def send_raw(port: int, path: Path, calling_ae: str = "SENDER") -> int:
    """Send a file's bytes as they are (no re-encoding: hostile or broken data sets stay so) to
    the node at ``port`` and return the C-STORE status."""
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="VESALIUS")
    assert assoc.is_established, "the node stopped accepting associations"
    try:
        status = assoc.send_c_store(path)
        assert "Status" in status, "the node sent no answer"
        return int(status.Status)
    finally:
        assoc.release()
