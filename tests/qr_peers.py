"""Query/Retrieve peers for the pull tests: DCMTK dcmqrscp with its own configuration and
database in a temp folder, and a listener that accepts connections and never answers (a source
that times out). Both on 127.0.0.1, free ports, stopped when their ``with`` block ends."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port
from tests.peers import DCMTK_ENV, port_open, running, wait_for


@dataclass
class QRSCP:
    ae_title: str
    port: int
    log_path: Path

    @property
    def table(self) -> dict[str, object]:
        """A ``[[sources]]`` table for the node."""
        return {"name": "dcmqr", "kind": "dimse", "ae_title": self.ae_title, "host": "127.0.0.1",
                "port": self.port}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def move_requests(self) -> list[float]:
        """When dcmqrscp received each C-MOVE request (seconds since midnight, from its log)."""
        found = re.findall(r"^(\d\d:\d\d:\d\d\.\d+) .*Received Move SCP:", self.log(), re.M)
        return [_seconds(t) for t in found]

    def most_moves_at_once(self) -> int:
        """The most C-MOVE requests dcmqrscp was answering at the same time (from its log: each
        starts with "Received Move SCP:" and ends with its final, non-pending response)."""
        most = now = 0
        for line in self.log().splitlines():
            if "Received Move SCP:" in line:
                now += 1
                most = max(most, now)
            elif re.search(r"Move SCP Response \d+ \[status: (?!Pending)", line):
                now -= 1
        return most

    def stores_sent(self, since: int = 0) -> int:
        """C-STORE sub-operation requests dcmqrscp sent, in its log from character ``since`` on."""
        return len(re.findall(r"Store SCU RQ: MsgID", self.log()[since:]))

    def stores_acknowledged(self) -> int:
        """C-STORE sub-operations the move destination acknowledged with success."""
        return len(re.findall(r"Move SCP: Received Store SCU RSP \[Status=Success\]", self.log()))


def _seconds(text: str) -> float:
    h, m, s = text.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


# dcmqrscp's log lines with the time they were written (log4cplus, which DCMTK logs through)
LOG_CONFIG = """log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%H:%M:%S.%q} %p: %m%n
"""


def dcmqrscp_config(folder: Path, ae_title: str, port: int, peers: dict[str, tuple[str, int]]) -> Path:
    """dcmqrscp.cfg with one storage area and the move destinations it may send to."""
    storage = folder / "db"
    storage.mkdir(parents=True, exist_ok=True)
    hosts = "\n".join(f"{name.lower()} = ({ae}, {host}, {p})" for name, (host, p) in peers.items()
                      for ae in [name])
    config = folder / "dcmqrscp.cfg"
    config.write_text(f"""NetworkTCPPort = {port}
MaxPDUSize = 16384
MaxAssociations = 16

HostTable BEGIN
{hosts}
HostTable END

VendorTable BEGIN
VendorTable END

AETable BEGIN
{ae_title} {storage} RW (200, 1024mb) ANY
AETable END
""")
    return config


@contextmanager
def dcmqrscp(folder: Path, files: Sequence[Path], peers: dict[str, tuple[str, int]],
             ae_title: str = "DCMQR") -> Iterator[QRSCP]:
    """dcmqrscp serving ``files`` (indexed with dcmqridx) and moving to ``peers`` (AE -> host, port)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = dcmqrscp_config(folder, ae_title, port, peers)
    if files:
        subprocess.run(["dcmqridx", str(folder / "db"), *map(str, files)], check=True, capture_output=True,
                       env=DCMTK_ENV, timeout=120)
    log_path = folder / f"dcmqrscp-{port}.log"
    log_config = folder / "logger.cfg"
    log_config.write_text(LOG_CONFIG)
    cmd = ["dcmqrscp", "-lc", str(log_config), "-c", str(config), str(port)]
    with running(cmd, log_path, DCMTK_ENV):
        wait_for(lambda: port_open(port), 10, "dcmqrscp to listen")
        yield QRSCP(ae_title, port, log_path)


@contextmanager
def silent_listener() -> Iterator[int]:
    """A port that accepts TCP connections and never sends a byte: a source that times out."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=2)
        for conn in held:
            conn.close()
        server.close()
