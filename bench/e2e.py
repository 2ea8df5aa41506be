"""End-to-end latency of the node on 512x512 CT series (run on demand, not in CI).

    .venv/bin/python bench/e2e.py [--slices 300 [600 ...]] [--source phantom|real] [--j2k]
                                  [--series 1] [--cache DIR]

DCMTK storescu sends the series to `vesalius serve` (``--series N``: N different series at once,
one storescu each), DCMTK storescp plays the PACS. Prints the time from the last image
acknowledged to the last result acknowledged by the PACS (after a small warm-up series, so the
worker has its libraries and model loaded), the stage breakdown the node recorded,
the peak resident memory of the node (the listener, also per phase: ingest, jobs, delivery) and
of its worker process, the peak PSS of the workers together with the children that write their
SEGs (node.forked: copy-on-write pages counted once), and the load average (2 cores).
Several ``--slices``: one run each, one after another, and a summary table.

``--source phantom``: the synthetic chest of CHEST; ``--source real``: the TotalSegmentator example
CT from the shared test data, resampled to 512x512 and ``--slices`` slices (real anatomy and noise).
``--j2k``: the series is sent JPEG 2000 Lossless compressed. ``--cache``: keep the written series.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.peers import DCMTK_ENV, storescp, storescu, vesalius_node, wait_for  # noqa: E402
from tests.phantoms import Cylinder, Sphere, write_phantom_series  # noqa: E402

CHEST = [
    Cylinder((0, 0, 0), (0, 0, 1), 160, 420, 40),
    Cylinder((80, -10, 0), (0, 0, 1), 60, 260, -850),
    Cylinder((-80, -10, 0), (0, 0, 1), 65, 260, -850),
    Cylinder((0, -20, 60), (0, 0, 1), 9, 200, -1000),
    Cylinder((0, 110, 0), (0, 0, 1), 18, 400, 700),
    Sphere((30, 0, -120), 40, 60),
]
SERIES_RULE = '[[rules]]\nname = "ct"\ntrigger = "series"\nselect = "all"\n'
REAL_CT = ROOT.parent / "shared" / "data" / "totalseg-examples" / "example_ct.nii.gz"


def peak_rss_mb(pid: int) -> dict[str, float]:
    """VmHWM of a process and of its children, from /proc."""
    found = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        ppid, me = int(fields["PPid"]), int(fields["Pid"])
        if (me == pid or ppid == pid) and "VmHWM" in fields:
            found[f"{fields['Name'].strip()}[{me}]"] = int(fields["VmHWM"].split()[0]) / 1024
    return found


class Sampler:
    """A memory figure (MB) every ``interval`` seconds, to tell in which phase it peaked."""

    def __init__(self, measure: Callable[[], float | None], interval: float) -> None:
        self.measure = measure
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            mb = self.measure()
            if mb is None:
                return
            self.samples.append((time.time(), mb))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, start: float = 0.0, end: float = float("inf")) -> float:
        return max((mb for t, mb in self.samples if start <= t <= end), default=0.0)


def vm_rss_mb(pid: int) -> float | None:
    """VmRSS of one process; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next(int(line.split()[1]) for line in text.splitlines() if line.startswith("VmRSS:")) / 1024


def workers_pss_mb(node_pid: int) -> float:
    """The proportional set size of the node's workers and their children (the forked SEG
    writers) together: pages a child shares copy-on-write with its worker count once, split
    between them, where adding their VmRSS would count them twice."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    workers = {pid for pid, ppid in parents.items() if ppid == node_pid}
    total_kb = 0
    for pid in workers | {pid for pid, ppid in parents.items() if ppid in workers}:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total_kb += next((int(line.split()[1]) for line in rollup.splitlines()
                          if line.startswith("Pss:")), 0)
    return total_kb / 1024


def phantom_series(folder: Path, slices: int, index: int) -> list[Path]:
    return write_phantom_series(folder, shape=(slices, 512, 512), spacing=(1.5, 0.75, 0.75),
                                objects=CHEST, seed=index).paths


def real_series(folder: Path, slices: int, index: int) -> list[Path]:
    """The example CT resampled (linear) to 512x512 in-plane and ``slices`` slices, as DICOM."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    from tests.realdata import write_nifti_as_dicom_series

    if not REAL_CT.exists():
        sys.exit(f"{REAL_CT} is missing: the shared test data is needed for --source real")
    image = nib.load(REAL_CT)
    data = np.asarray(image.dataobj, dtype=np.float32)
    factors = (512 / data.shape[0], 512 / data.shape[1], slices / data.shape[2])
    resampled = ndimage.zoom(data, factors, order=1).astype(np.int16)
    affine = image.affine @ np.diag([1 / factors[0], 1 / factors[1], 1 / factors[2], 1])
    folder.mkdir(parents=True, exist_ok=True)
    nifti = folder / f"real{slices}-{index}.nii.gz"
    nib.save(nib.Nifti1Image(resampled, affine), nifti)
    return write_nifti_as_dicom_series(nifti, folder / "dicom")


def j2k_copy(paths: list[Path], folder: Path) -> list[Path]:
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        target = folder / path.name
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


def series_files(args: argparse.Namespace, slices: int, base: Path, index: int) -> list[Path]:
    folder = base / f"{args.source}{slices}-{index}"
    done = folder / ("done-j2k" if args.j2k else "done")
    if done.exists():
        return sorted(p for p in (folder / ("j2k" if args.j2k else "raw")).rglob("*.dcm"))
    raw = folder / "raw"
    if not (folder / "done").exists():
        make = phantom_series if args.source == "phantom" else real_series
        make(raw, slices, index)
        (folder / "done").write_text("")
    paths = sorted(raw.rglob("*.dcm"))
    if args.j2k:
        paths = j2k_copy(paths, folder / "j2k")
        done.write_text("")
    return paths


def seconds(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def run_once(args: argparse.Namespace, slices: int, tmp: Path) -> dict[str, float]:
    """One node, one warm-up, ``args.series`` series of ``slices`` sent at once; prints the
    breakdown and returns the figures of the summary table."""
    t0 = time.perf_counter()
    files = [series_files(args, slices, args.cache or tmp, i) for i in range(args.series)]
    print(f"{args.series} x {slices}-slice {args.source} series ready "
          f"({'JPEG 2000' if args.j2k else 'uncompressed'}) in {time.perf_counter() - t0:.1f} s")
    extra = ["-xv"] if args.j2k else []  # propose JPEG 2000 Lossless
    load_before = os.getloadavg()[0]
    print(f"load average before: {load_before:.2f} (2 cores)")
    warm_up = phantom_series(tmp / "warm-up", 8, 99)
    rules = SERIES_RULE if args.trigger == "series" else ""
    with storescp(tmp / "pacs") as pacs, \
            vesalius_node(tmp, destinations=[pacs.address], config=rules) as node:
        # a small series first: the worker has imported its libraries and loaded the model
        storescu(warm_up, node.port, calling="WARMUP")
        wait_for(lambda: any(d["state"] == "done" for d in node.deliveries()), 600, "the warm-up")
        warm = {d["job_id"] for d in node.deliveries()}
        sampler = Sampler(lambda: vm_rss_mb(node.proc.pid), 0.05)
        workers = Sampler(lambda: workers_pss_mb(node.proc.pid), 0.1)
        t_send = time.time()
        senders = [subprocess.Popen(["storescu", "-aet", f"SCANNER{i}", "-aec", "VESALIUS", *extra,
                                     "127.0.0.1", str(node.port), *map(str, paths)],
                                    env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                   for i, paths in enumerate(files)]
        for sender in senders:
            _, err = sender.communicate(timeout=600)
            assert sender.returncode == 0, err.decode()[-2000:]
        t_last_image = time.time()
        # job -> its SEG, SR, Surface Segmentation acknowledged (no "part": code before the early delivery)
        first_at: dict[int, float] = {}

        def all_done() -> list[dict] | None:
            rows = [d for d in node.deliveries() if d["job_id"] not in warm]
            for d in rows:
                if d["state"] == "done" or d.get("part") == "rest":  # "rest" queued: "first" went out
                    first_at.setdefault(d["job_id"], seconds(d["updated_at"]))
            done = [d for d in rows if d["state"] == "done" and d.get("part") != "first"]
            return done if len(done) >= args.series else None

        delivered = wait_for(all_done, 1800, "the results at the PACS", interval=0.05)
        sampler.stop()
        workers.stop()
        jobs = [job for job in node.jobs() if job["id"] not in warm]
        events = [line for line in node.log().splitlines()
                  if any(k in line for k in ("released", "series complete", "job start", "job done",
                                             "delivery done", "delivered", "sent "))]
        rss = peak_rss_mb(node.proc.pid)
        listener = rss.pop(next(k for k in rss if k.endswith(f"[{node.proc.pid}]")))
    load = os.getloadavg()[0]
    last = max(seconds(d["updated_at"]) for d in delivered)
    jobs_done = max(seconds(j["updated_at"]) for j in jobs)
    print(f"ingest ({args.series} x {slices} slices, storescu): {t_last_image - t_send:.2f} s")
    first = max(first_at.values())
    print("last image -> SEG, SR, Surface Segmentation acknowledged by the PACS: "
          f"{first - t_last_image:.2f} s (goal <= 5 s)")
    print(f"last image -> all results (3D preview, STLs too) acknowledged: {last - t_last_image:.2f} s "
          "(goal: within 3 s after)")
    for job in sorted(jobs, key=lambda j: j["id"]):
        done_at = seconds(job["updated_at"])
        sent = [seconds(d["updated_at"]) for d in delivered if d["job_id"] == job["id"]]
        print(f"  job {job['id']}: done {done_at - t_last_image:6.2f} s after the last image; "
              f"stages " + ", ".join(f"{k} {v:.2f}" for k, v in job["stages"].items())
              + (f"; send {max(sent) - done_at:.2f}" if sent else ""))
    if args.verbose:
        print(f"last image at {datetime.fromtimestamp(t_last_image).time()}; node log:")
        print("\n".join(f"  {line[:160]}" for line in events))
    for name, mb in sorted(rss.items()):
        print(f"peak RSS {name}: {mb:.0f} MB")
    phases = {"ingest": (t_send, t_last_image), "jobs": (t_last_image, jobs_done),
              "delivery": (jobs_done, last)}
    print(f"peak RSS listener (the node's own process): {listener:.0f} MB; VmRSS peak while "
          + ", ".join(f"{k} {sampler.peak(*v):.0f} MB" for k, v in phases.items()))
    worker = max(rss.values(), default=0.0)
    print(f"peak RSS worst worker: {worker:.0f} MB (goal <= 1000 MB); peak PSS of the workers with "
          f"their SEG writer children, sampled every 0.1 s: {workers.peak():.0f} MB")
    print(f"load average after: {load:.2f}")
    return {"first": first - t_last_image, "latency": last - t_last_image, "ingest": t_last_image - t_send,
            "worker": worker, "workers pss": workers.peak(),
            "listener": listener, **{f"listener {k}": sampler.peak(*v) for k, v in phases.items()},
            "load before": load_before, "load after": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, nargs="+", default=[300],
                        help="series size(s); several: one node each, one after another, and a table")
    parser.add_argument("--source", choices=("phantom", "real"), default="phantom")
    parser.add_argument("--j2k", action="store_true", help="send the series JPEG 2000 Lossless compressed")
    parser.add_argument("--series", type=int, default=1, help="this many series sent at once")
    parser.add_argument("--cache", type=Path, help="keep the written series here between runs")
    parser.add_argument("--trigger", choices=("study", "series"), default="study",
                        help="the rule's trigger: study (the default rule: waits study_quiet_period, 3 s, "
                             "for the rest of the study) or series (processed once the series is complete)")
    parser.add_argument("--verbose", action="store_true", help="print the node's completion/job/send log")
    args = parser.parse_args()
    table = {}
    for slices in args.slices:
        with tempfile.TemporaryDirectory() as tmp_name:
            table[slices] = run_once(args, slices, Path(tmp_name))
    if len(table) > 1:
        print(f"\n| {args.series} series of | last image -> SEG, SR, SurfSeg | -> all results | ingest | "
              "worker peak RSS (PSS with SEG writers) | "
              "listener peak RSS (ingest / jobs / delivery) | load |\n"
              "|---|---|---|---|---|---|---|")
        for slices, row in table.items():
            print(f"| {slices} slices | {row['first']:.1f} s | {row['latency']:.1f} s | "
                  f"{row['ingest']:.1f} s | "
                  f"{row['worker']:.0f} MB ({row['workers pss']:.0f} MB) | "
                  f"{row['listener']:.0f} MB ({row['listener ingest']:.0f} / {row['listener jobs']:.0f} / "
                  f"{row['listener delivery']:.0f}) | {row['load before']:.1f}-{row['load after']:.1f} |")


if __name__ == "__main__":
    main()
