"""``vesalius pull``: start a pull job (or list what it would pull), and list, pause, resume or
cancel pull jobs. The running node does the pulling (its C-STORE listener receives what C-MOVE
sends); this command only talks to the source for a dry run, and to the store otherwise."""

from __future__ import annotations

import argparse
import getpass
import json
import re
import sys
from pathlib import Path
from typing import Any

from vesalius.inference.fields import FieldError
from vesalius.node.checks import ConfigError

ISO_DATE = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})")


def _date(text: str) -> str:
    match = ISO_DATE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD or YYYYMMDD, got {text!r}")
    return "".join(match.groups())


def add_parser(sub: Any) -> None:
    """Register ``vesalius pull`` on the CLI's subparsers."""
    pull = sub.add_parser("pull", help="pull studies from a configured source (C-FIND + C-MOVE/C-GET, or "
                          "QIDO-RS + WADO-RS) into the node: they are processed like pushed ones",
                          description="Start a pull job on the running node, list what it would pull "
                          "(--dry-run), or list, show, pause, resume or cancel pull jobs. See docs/pull.md.")
    pull.add_argument("source", nargs="?", help="a [[sources]] name from the configuration")
    pull.add_argument("--level", choices=("patient", "study", "series"), default="study",
                      help="pull every series of a matching study (study, patient) or only the matching "
                      "series (series); default study")
    pull.add_argument("--modality", action="append", default=[], metavar="CT",
                      help="a series modality to match (repeatable)")
    pull.add_argument("--from", dest="date_from", type=_date, metavar="DATE",
                      help="studies from this date (YYYY-MM-DD, inclusive)")
    pull.add_argument("--to", dest="date_to", type=_date, metavar="DATE",
                      help="studies up to this date (inclusive)")
    pull.add_argument("--study-description", default="", metavar="PATTERN",
                      help="DICOM wildcard pattern (* and ?), case-insensitive")
    pull.add_argument("--series-description", default="", metavar="PATTERN", help="the same, per series")
    pull.add_argument("--body-part", action="append", default=[], metavar="CHEST",
                      help="BodyPartExamined of a series to match (repeatable)")
    pull.add_argument("--accession-number", default="", help="(never shown back)")
    pull.add_argument("--patient-id", default="", help="(never shown back); required with --level patient")
    pull.add_argument("--study-uid", action="append", default=[], dest="study_uids", metavar="UID",
                      help="only these studies (repeatable)")
    pull.add_argument("--limit", type=int, default=0, help="at most this many studies, oldest first")
    pull.add_argument("--dry-run", action="store_true", help="list the matching studies; pull nothing")
    pull.add_argument("--evaluate-against", default="", metavar="PATTERN",
                      help="score each processed study's results against its SEG series whose description "
                      "matches PATTERN (vesalius evaluate); a cohort report is written at the end")
    what = pull.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="list the pull jobs with their study counts")
    what.add_argument("--show", type=int, metavar="JOB", help="one pull job with each study's state")
    what.add_argument("--pause", type=int, metavar="JOB", help="stop starting retrievals of this job")
    what.add_argument("--resume", type=int, metavar="JOB", help="go on with a paused job")
    what.add_argument("--cancel", type=int, metavar="JOB", help="retrieve nothing more for this job")
    what.add_argument("--retry", type=int, metavar="JOB", help="retrieve the failed studies of a finished "
                      "job again (or run its failed query again)")
    pull.add_argument("--json", action="store_true", help="machine-readable output")
    pull.add_argument("--config", help="TOML configuration file (its [[sources]] and data_dir)")
    pull.add_argument("--data-dir", help="the node's data folder (default: the configuration's)")
    pull.set_defaults(func=run)


def _query(args: argparse.Namespace) -> Any:
    from vesalius.node.pull.query import parse_query

    try:
        return parse_query({"level": args.level, "modality": args.modality, "date_from": args.date_from or "",
                            "date_to": args.date_to or "", "study_description": args.study_description,
                            "series_description": args.series_description, "body_part": args.body_part,
                            "accession_number": args.accession_number, "patient_id": args.patient_id,
                            "study_uids": args.study_uids, "limit": args.limit,
                            "evaluate_against": args.evaluate_against})
    except FieldError as err:
        key, _, rest = str(err).partition(":")
        key = key.split("[")[0]
        flags = {"date_from": "from", "date_to": "to", "study_uids": "study-uid"}
        flag = flags.get(key, key.replace("_", "-"))
        raise ConfigError(f"--{flag}:{rest}") from None


def _print(args: argparse.Namespace, value: Any, text: str) -> None:
    print(json.dumps(value, indent=1) if args.json else text)


def run(args: argparse.Namespace) -> int:
    from vesalius.node.config import load_config
    from vesalius.node.pull import jobs
    from vesalius.node.store import Store

    config = load_config(args.config)
    data_dir = Path(args.data_dir or config.data_dir)
    url = config.database.url
    if not args.dry_run and not url and not (data_dir / "vesalius.sqlite").exists():  # not a new one
        raise ConfigError(f"--data-dir: no Vesalius database in {data_dir}")
    if args.list or args.show is not None or any(
            v is not None for v in (args.pause, args.resume, args.cancel, args.retry)):
        store = Store(data_dir, url)
        if args.list:
            rows = jobs.listing(store)
            _print(args, rows, "\n".join(
                f"{r['id']}  {r['source']}  {r['state']}  "
                + "  ".join(f"{k}={v}" for k, v in r["studies"].items() if v)
                + (f"  ({r['error']})" if r["error"] else "") for r in rows) or "no pull jobs")
            return 0
        if args.show is not None:
            found = jobs.job(store, args.show)
            if found is None:
                print(f"vesalius pull: no pull job {args.show}", file=sys.stderr)
                return 1
            _print(args, found, "\n".join(
                [f"pull job {found['id']} from {found['source']}: {found['state']}"
                 + (f" ({found['error']})" if found["error"] else "")]
                + [f"  {s['study_instance_uid']}  {s['study_date'] or '-'}  {s['state']}  "
                   f"{s['series_received']}/{s['series']} series"
                   + (f"  {s['reason']}" if s["reason"] else "")
                   for s in found["study_list"]]))
            return 0
        action, job_id = next((a, v) for a in ("pause", "resume", "cancel", "retry")
                              if (v := getattr(args, a)) is not None)
        status, answer = jobs.act(store, job_id, action)
        from vesalius.node.audit import Audit

        jobs.record_action(Audit(store), getpass.getuser(), "cli", f"pull {action}", job_id, status)
        if status != 200:
            print(f"vesalius pull: {answer['error']}", file=sys.stderr)
            return 1
        _print(args, answer, f"pull job {job_id}: {answer['state']}")
        return 0
    if not args.source:
        raise ConfigError("pull: name a source (one of: "
                          f"{', '.join(s.name for s in config.sources) or 'none configured'})")
    source = next((s for s in config.sources if s.name == args.source), None)
    if source is None:
        raise ConfigError(f"pull: no source {args.source!r} in the configuration (configured: "
                          f"{', '.join(s.name for s in config.sources) or 'none'})")
    query = _query(args)
    if args.dry_run:
        from vesalius.node.pull.dimse import SourceError
        from vesalius.node.pull.runner import matches

        try:
            listed = [m.shown() for m in matches(source, query, config.ae_title)]
        except SourceError as err:
            print(f"vesalius pull: {err}", file=sys.stderr)
            return 1
        _print(args, listed, "\n".join(
            [f"{len(listed)} studies match at {source.name} (dry run: nothing pulled)"]
            + [f"  {m['study_instance_uid']}  {m['study_date'] or '-'}  {','.join(m['modalities']) or '-'}  "
               f"{m['series']} series"
               + (f", {m['instances']} instances" if m["instances"] is not None else "")
               for m in listed]))
        return 0
    store = Store(data_dir, url)
    job_id = jobs.create_job(store, source.name, query, getpass.getuser())
    from vesalius.node.audit import Audit

    jobs.record_action(Audit(store), getpass.getuser(), "cli", "pull", job_id, 200)
    _print(args, {"pull": job_id, "state": "queued"},
           f"pull job {job_id} queued; the node retrieves it (`vesalius pull --show {job_id}`)")
    return 0
