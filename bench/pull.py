"""Pull and STOW-RS throughput on loopback (run on demand, not in CI).

    .venv/bin/python bench/pull.py [--studies 4] [--slices 50]

A real Orthanc (DICOMweb plugin) holds the studies (128x128 CT, 32 KiB an instance); `vesalius serve`
without rules (nothing is processed) pulls them all by C-MOVE, by C-GET and by QIDO-RS + WADO-RS,
and then takes the same instances in one STOW-RS POST. Prints instances per second for each: the
time from queueing the pull job to every study received (every instance durably in the spool).
Orthanc runs with TCP_NODELAY=1 (it is DCMTK: without it, ~40 ms per C-STORE).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import free_port  # noqa: E402
from tests.peers import vesalius_node, wait_for  # noqa: E402
from tests.phantoms import write_phantom_series  # noqa: E402
from tests.study_phantoms import CHEST  # noqa: E402
from tests.test_pull import archive, post_json, sources_toml  # noqa: E402
from tests.test_stow import post  # noqa: E402
from vesalius.node.destinations.dicomweb import multipart_related  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--slices", type=int, default=50)
    args = parser.parse_args()
    os.environ["TCP_NODELAY"] = "1"
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        series = [write_phantom_series(tmp / f"s{i}", shape=(args.slices, 128, 128), spacing=(2, 1.5, 1.5),
                                       objects=CHEST, seed=i) for i in range(args.studies)]
        files = [p for s in series for p in s.paths]
        port = free_port()
        with archive(tmp, port) as orthanc:
            orthanc.upload(files)
            dimse = {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
            tables = {
                "C-MOVE": dimse,
                "C-GET": {**dimse, "retrieve": "get"},
                "WADO-RS": {"name": "pacs", "kind": "dicomweb", "url": f"{orthanc.url}/dicom-web"},
            }
            for how, table in tables.items():
                where = tmp / how
                where.mkdir()
                with vesalius_node(where, port=port, config="rules = []\n" + sources_toml(table)) as node:
                    start = time.monotonic()
                    post_json(node, "/pulls", {"source": "pacs"})
                    wait_for(lambda n=node: (s := n.get("/pulls/1"))["study_list"] and all(
                        x["state"] not in ("queried", "retrieving") for x in s["study_list"]), 900, how)
                    seconds = time.monotonic() - start
                print(f"{how}: {len(files)} instances in {seconds:.1f} s = {len(files) / seconds:.0f}/s")
        where = tmp / "stow"
        where.mkdir()
        with vesalius_node(where, config="rules = []\n") as node:
            body, content_type = multipart_related([p.read_bytes() for p in files])
            start = time.monotonic()
            status, _ = post(node, body, content_type)
            seconds = time.monotonic() - start
        print(f"STOW-RS: {len(files)} instances ({len(body) / 2**20:.1f} MiB, one POST, HTTP {status}) "
              f"in {seconds:.1f} s = {len(files) / seconds:.0f}/s")


if __name__ == "__main__":
    main()
