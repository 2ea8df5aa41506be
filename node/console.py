"""What the command line shows people: stage progress of `vesalius process` on a terminal, its
short summary, and `vesalius status` as tables with headers, states in plain words and local times.
(`--json` prints the machine summary instead; nothing here is parsed by programs.)"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from vesalius.node.pipeline import STAGES, OnStage


@contextmanager
def stage_progress(enabled: bool) -> Iterator[OnStage | None]:
    """A rich progress bar on stderr, one step per pipeline stage, named as each starts; None
    (no progress) when ``enabled`` is false (stderr is no terminal)."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description:<24}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task("starting", total=len(STAGES))

        def on_stage(stage: str, n: int, of: int) -> None:
            progress.update(task, completed=n - 1, total=of, description=f"stage {n}/{of}: {stage}")
            progress.refresh()  # drawn now: a stage shorter than the refresh interval is still shown

        yield on_stage
        progress.update(task, completed=len(STAGES), description="done")


def local_time(iso: str | None) -> str:
    """An ISO 8601 time of the API as this machine's local time, to the second."""
    if not iso:
        return "-"
    return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def process_summary(summary: dict[str, Any], out: Path) -> str:
    """A few lines for a person: the model, each structure's volume, what was written where."""
    model = summary["model"]
    lines = [f"{model['name']} {model['version']}: {len(summary['structures'])} structure(s) in {out}"]
    width = max((len(s["name"]) for s in summary["structures"]), default=0)
    for s in summary["structures"]:
        cut = "" if s["complete"] else "  (incomplete: the scan cuts it)"
        lines.append(f"  {s['name']:<{width}}  {s['volume_ml']:>10} ml{cut}")
    if summary["not_found"]:
        lines.append(f"  not found: {', '.join(summary['not_found'])}")
    written = [o["file"] for o in summary["objects"].values()] + summary.get("encapsulated_stl", [])
    if written:
        lines.append(f"DICOM objects: {', '.join(written)}")
    if summary["meshes"]:
        lines.append(f"meshes: {', '.join(summary['meshes'])}")
    if summary.get("input"):
        lines.append(f"label map: {summary['input']['label_map']}")
    seconds = sum(summary["stages_s"].values())
    stages = ", ".join(f"{k} {v:.1f}" for k, v in summary["stages_s"].items())
    lines.append(f"{seconds:.1f} s ({stages})")
    return "\n".join(lines)


def job_words(job: dict[str, Any]) -> str:
    """A job's state as the dashboard says it: running: stage n of m (name), failed: reason."""
    if job["state"] == "running" and job.get("progress"):
        p = job["progress"]
        return f"running: stage {p['n']} of {p['of']} ({p['stage']})"
    if job["state"] == "failed":
        return f"failed: {job['error'] or 'no reason recorded'}"
    return str(job["state"])


def aligned(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> list[str]:
    """Columns padded to their widest cell, two spaces apart, the header row first."""
    cells = [list(headers)] + [["-" if v is None or v == "" else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))).rstrip()
            for row in cells]


def status_text(report: dict[str, list[dict[str, Any]]]) -> str:
    """`vesalius status` for a person: studies with their selection reasons, then tables."""
    out = [f"studies ({len(report['studies'])})"]
    for study in report["studies"]:  # each with why its series were chosen or skipped
        out.append(f"  {study['study_instance_uid']}  {study['series']} series")
        for item in study["selection"]:
            out.append(f"    {item['rule']}  {item['series_instance_uid']}  {item['reason']}")
    series = [(s["series_instance_uid"], s["modality"], s["instances"], s["calling_ae"],
               local_time(s["last_received"]), s["state"], s["reason"]) for s in report["series"]]
    jobs = [(j["id"], j["series_instance_uid"], j["model"], j["attempts"], local_time(j["created_at"]),
             job_words(j)) for j in report["jobs"]]
    deliveries = [(d["id"], d["job_id"], d["destination"], d["state"], d["attempts"],
                   local_time(d["next_try_at"]) if d["state"] == "pending" else "", d["error"])
                  for d in report["deliveries"]]
    for title, headers, rows in (
            ("series", ("SERIES", "MODALITY", "INSTANCES", "AE", "LAST RECEIVED", "STATE", "REASON"), series),
            ("jobs", ("JOB", "SERIES", "MODEL", "TRIES", "CREATED", "STATE"), jobs),
            ("deliveries", ("DELIVERY", "JOB", "DESTINATION", "STATE", "TRIES", "NEXT TRY", "CAUSE"),
             deliveries)):
        out.append(f"{title} ({len(rows)})")
        if not rows:
            continue
        lines = aligned(headers, rows)
        out.append(lines[0])
        for i, line in enumerate(lines[1:]):
            out.append(line)
            evaluation = report[title][i].get("evaluation") if title == "jobs" else None
            if evaluation:  # the job's latest `vesalius evaluate` figures
                from vesalius.node.evaluations import headline

                out.append(f"    {headline(evaluation)}")
            correction = report[title][i].get("correction") if title == "jobs" else None
            if correction:  # a radiologist's correction received back (issue 16)
                from vesalius.node.corrections import headline as correction_headline

                out.append(f"    {correction_headline(correction)}")
    return "\n".join(out)


def is_terminal() -> bool:
    return sys.stderr.isatty()
