"""End-to-end latency of the node on 512x512 CT series (run on demand, not in CI).

    .venv/bin/python bench/e2e.py [--slices 300] [--source phantom|real] [--j2k] [--series 1]
                                  [--cache DIR]

DCMTK storescu sends the series to `vesalius serve` (``--series N``: N different series at once,
one storescu each), DCMTK storescp plays the PACS. Prints the time from the last image
acknowledged to the last result acknowledged by the PACS (after a small warm-up series, so the
worker has its libraries and model loaded), the stage breakdown the node recorded,
the peak resident memory of the node and its worker process, and the load average (2 cores).

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
import time
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


def series_files(args: argparse.Namespace, base: Path, index: int) -> list[Path]:
    folder = base / f"{args.source}{args.slices}-{index}"
    done = folder / ("done-j2k" if args.j2k else "done")
    if done.exists():
        return sorted(p for p in (folder / ("j2k" if args.j2k else "raw")).rglob("*.dcm"))
    raw = folder / "raw"
    if not (folder / "done").exists():
        make = phantom_series if args.source == "phantom" else real_series
        make(raw, args.slices, index)
        (folder / "done").write_text("")
    paths = sorted(raw.rglob("*.dcm"))
    if args.j2k:
        paths = j2k_copy(paths, folder / "j2k")
        done.write_text("")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--source", choices=("phantom", "real"), default="phantom")
    parser.add_argument("--j2k", action="store_true", help="send the series JPEG 2000 Lossless compressed")
    parser.add_argument("--series", type=int, default=1, help="this many series sent at once")
    parser.add_argument("--cache", type=Path, help="keep the written series here between runs")
    parser.add_argument("--trigger", choices=("study", "series"), default="study",
                        help="the rule's trigger: study (the default rule: waits study_quiet_period, 3 s, "
                             "for the rest of the study) or series (processed once the series is complete)")
    parser.add_argument("--verbose", action="store_true", help="print the node's completion/job/send log")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        files = [series_files(args, args.cache or tmp, i) for i in range(args.series)]
        print(f"{args.series} x {args.slices}-slice {args.source} series ready "
              f"({'JPEG 2000' if args.j2k else 'uncompressed'}) in {time.perf_counter() - t0:.1f} s")
        extra = ["-xv"] if args.j2k else []  # propose JPEG 2000 Lossless
        print(f"load average before: {os.getloadavg()[0]:.2f} (2 cores)")
        warm_up = phantom_series(tmp / "warm-up", 8, 99)
        rules = SERIES_RULE if args.trigger == "series" else ""
        with storescp(tmp / "pacs") as pacs, \
                vesalius_node(tmp, destinations=[pacs.address], config=rules) as node:
            # a small series first: the worker has imported its libraries and loaded the model
            storescu(warm_up, node.port, calling="WARMUP")
            wait_for(lambda: any(d["state"] == "done" for d in node.deliveries()), 600, "the warm-up")
            warm = {d["job_id"] for d in node.deliveries()}
            t_send = time.time()
            senders = [subprocess.Popen(["storescu", "-aet", f"SCANNER{i}", "-aec", "VESALIUS", *extra,
                                         "127.0.0.1", str(node.port), *map(str, paths)],
                                        env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                       for i, paths in enumerate(files)]
            for sender in senders:
                _, err = sender.communicate(timeout=600)
                assert sender.returncode == 0, err.decode()[-2000:]
            t_last_image = time.time()
            delivered = wait_for(lambda: len(done := [d for d in node.deliveries() if d["state"] == "done"
                                                      and d["job_id"] not in warm]) >= args.series and done,
                                 1800, "the results at the PACS", interval=0.05)
            jobs = [job for job in node.jobs() if job["id"] not in warm]
            events = [line for line in node.log().splitlines()
                      if any(k in line for k in ("released", "series complete", "job start", "job done",
                                                 "delivered", "sent "))]
            rss = peak_rss_mb(node.proc.pid)
        load = os.getloadavg()[0]

    def seconds(iso: str) -> float:
        return datetime.fromisoformat(iso).timestamp()

    last = max(seconds(d["updated_at"]) for d in delivered)
    print(f"ingest ({args.series} x {args.slices} slices, storescu): {t_last_image - t_send:.2f} s")
    print(f"last image -> all results acknowledged by the PACS: {last - t_last_image:.2f} s (goal <= 5 s)")
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
    print(f"peak RSS worst process: {max(rss.values()):.0f} MB (goal <= 1000 MB)")
    print(f"load average after: {load:.2f}")


if __name__ == "__main__":
    main()
