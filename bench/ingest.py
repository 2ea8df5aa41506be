"""Ingest throughput: the node against a minimal pynetdicom SCP and DCMTK storescp, in one run.

    .venv/bin/python bench/ingest.py [--slices 300] [--runs 3] [--max-pdu 4194304 ...]

DCMTK storescu sends one uncompressed 512x512 CT series (128 KiB PDUs, TCP_NODELAY=1) to
(a) `vesalius serve` (the spool file fsynced, renamed into its series folder and the folder
fsynced before each acknowledgement; the row committed without an fsync of its own),
(b) a minimal pynetdicom SCP that only writes the received bytes (the practical floor for Python),
(c) DCMTK storescp. Prints the median wall time of each and the ratios; goal: (a) <= 1.3 x (b).

``--experiments`` also runs the node with its folder fsync, and with every fsync, patched out
(bench only, never a setting of the node): what each costs, beside the node's other work; and
with its C-STORE handler replaced by one that only closes the received file (fsyncing it, or
not) and answers success: the node's receive path without the checks and the record, its floor.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port  # noqa: E402
from tests.peers import port_open, running, storescp, storescu, vesalius_node, wait_for  # noqa: E402
from tests.phantoms import Cylinder, write_phantom_series  # noqa: E402

PDU = ["-pdu", "131072"]
# `vesalius serve` with fsyncs patched out, for --experiments: argv[1] is what to drop, the rest
# the node's own command line (`python -m vesalius.node.cli serve ...`)
PATCHED_NODE = textwrap.dedent("""
    import os, runpy, sys
    from vesalius.node import receive, store
    drop = sys.argv[1]
    if drop in ("folder", "all"):
        store.fsync_dir = lambda path: None
    if drop == "all":
        os.fsync = lambda fd: None
    if drop.startswith("handler"):
        def answer_at_once(self, event):
            event.request._dataset_file.close()
            if drop == "handler-fsync":
                fd = os.open(event.dataset_path, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            return 0
        receive.Receiver.handle_store = answer_at_once
    sys.argv = ["vesalius", *sys.argv[5:]]
    runpy.run_module("vesalius.node.cli", run_name="__main__")
""")
MINIMAL_SCP = textwrap.dedent("""
    import sys
    from pathlib import Path
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    out = Path(sys.argv[2])
    def store(event):
        (out / event.request.AffectedSOPInstanceUID).write_bytes(event.encoded_dataset())
        return 0
    ae = AE("MINIMAL")
    ae.maximum_pdu_size = 131072
    ae.supported_contexts = AllStoragePresentationContexts
    ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, store)])
""")


def timed_send(files: list[Path], port: int, ae_title: str) -> float:
    start = time.perf_counter()
    storescu(files, port, ae_title=ae_title, extra=PDU)
    return time.perf_counter() - start


def minimal_scp_time(files: list[Path], out: Path) -> float:
    port = free_port()
    out.mkdir()
    script = out / "minimal_scp.py"
    script.write_text(MINIMAL_SCP)
    with running([sys.executable, str(script), str(port), str(out)], out / "minimal.log"):
        wait_for(lambda: port_open(port), 30, "the minimal SCP")
        return timed_send(files, port, "MINIMAL")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-pdu", type=int, nargs="*", default=[],
                        help="also run the node with these max_pdu values (bytes)")
    parser.add_argument("--experiments", action="store_true",
                        help="also the node without its folder fsync, and without any fsync")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        phantom = write_phantom_series(tmp / "ct", shape=(args.slices, 512, 512), spacing=(1, 0.7, 0.7),
                                       objects=[Cylinder((0, 0, 0), (0, 0, 1), 150, 1000, 40)])
        megabytes = sum(p.stat().st_size for p in phantom.paths) / 1e6
        times: dict[str, list[float]] = {"node": [], "pynetdicom minimal": [], "storescp": []}
        times.update({f"node max_pdu={n}": [] for n in args.max_pdu})
        patched = tmp / "patched_node.py"
        patched.write_text(PATCHED_NODE)
        variants = [("node", "", ()), *((f"node max_pdu={n}", f"max_pdu = {n}\n", ()) for n in args.max_pdu)]
        if args.experiments:
            variants += [(label, "", (sys.executable, str(patched), drop)) for label, drop in (
                ("node, no folder fsync", "folder"), ("node, no fsync", "all"),
                ("receive path + 1 fsync", "handler-fsync"), ("receive path only", "handler"))]
            times.update({label: [] for label, _, _ in variants})
        no_jobs = '[[rules]]\nname = "none"\nmodality = ["NONE"]\n'
        for run in range(args.runs):
            for n, (label, config, wrap) in enumerate(variants):
                folder = tmp / f"node{run}-{n}"
                folder.mkdir()
                with vesalius_node(folder, config=config + no_jobs, wrap=wrap) as node:
                    times[label].append(timed_send(phantom.paths, node.port, "VESALIUS"))
            times["pynetdicom minimal"].append(minimal_scp_time(phantom.paths, tmp / f"minimal{run}"))
            with storescp(tmp / f"storescp{run}") as scp:
                times["storescp"].append(timed_send(phantom.paths, scp.port, scp.ae_title))
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.slices} slices, {megabytes:.0f} MB, median of {args.runs} runs:")
    for name, seconds in medians.items():
        print(f"  {name.replace('  ', ' '):>24}: {seconds:6.2f} s  {megabytes / seconds:6.0f} MB/s  "
              f"({seconds / medians['pynetdicom minimal']:.2f}x minimal)")
    ratio = medians["node"] / medians["pynetdicom minimal"]
    print(f"node / minimal pynetdicom SCP: {ratio:.2f}x (goal <= 1.3x)")
    print(f"node / DCMTK storescp:         {medians['node'] / medians['storescp']:.2f}x")


if __name__ == "__main__":
    main()
