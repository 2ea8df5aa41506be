"""``vesalius serve | process | echo | models | status | retry | resend | audit``: thin shells over the
node and the pipeline."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from vesalius.node.config import DEFAULT_AE_TITLE, ConfigError, Destination, load_config, with_overrides
from vesalius.node.store import Store


def _serve(args: argparse.Namespace) -> int:
    from vesalius.node.service import Node

    config = with_overrides(load_config(args.config), ae_title=args.ae_title, port=args.port,
                            http_host=args.http_host, http_port=args.http_port, data_dir=args.data_dir,
                            model=args.model, destinations=args.destination)
    if not config.destinations:
        logging.getLogger("vesalius").warning(
            "no destinations configured: results stay in %s/results", config.data_dir)
    check_models(config)
    Node(config).serve_forever()
    return 0


def check_models(config) -> None:
    """Every model a rule names must resolve and have its weights: a ConfigError at start-up,
    not a failed first job."""
    from vesalius.inference.models.registry import ModelSpecError, check

    specs = config.models
    for i, rule in enumerate(config.rules):
        try:
            check(rule.model, specs)
        except ModelSpecError as err:
            raise ConfigError(f"rules[{i}].model: {err}") from err


def _models(args: argparse.Namespace) -> int:
    from vesalius.inference.models.registry import ModelSpecError, describe, specs_for

    config = load_config(args.config)
    specs = config.models
    references = args.model or list(dict.fromkeys(["builtin_ct", *specs, *(r.model for r in config.rules)]))
    try:
        rows = [describe(spec) for spec in specs_for(references, specs)]
    except ModelSpecError as err:
        print(f"vesalius models: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for row in rows:
            state = "weights present" if row["weights_present"] else "WEIGHTS MISSING"
            where = f" {row['path']}" if row["path"] else ""
            print(f"{row['name']}  [{row['kind']}{where}]  device={row['device']}  {state}")
            if row["labels"]:
                print(f"    labels: {', '.join(row['labels'])}")
            for problem in row["problems"]:
                print(f"    problem: {problem}")
    return 0 if all(row["weights_present"] for row in rows) else 1


def series_files(folder: Path) -> list[Path]:
    """Every regular, non-hidden file under ``folder`` (DICOM files need no extension)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _process(args: argparse.Namespace) -> int:
    from vesalius.inference.models.registry import ModelSpecError, configure
    from vesalius.inference.volume import VolumeError
    from vesalius.node.pipeline import run_pipeline

    folder = Path(args.series_dir)
    if not folder.is_dir():
        print(f"vesalius process: {folder} is not a folder", file=sys.stderr)
        return 2
    config = load_config(args.config)
    configure(config.models, config.gpu_jobs_per_device)
    try:
        summary = run_pipeline(series_files(folder), args.out, args.model)
    except VolumeError as err:
        print(f"vesalius process: cannot place the series in space: {err}", file=sys.stderr)
        return 1
    except ModelSpecError as err:
        print(f"vesalius process: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def _echo(args: argparse.Namespace) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    peer = Destination.parse(args.peer)
    ae = AE(ae_title=args.ae_title)
    ae.add_requested_context(Verification)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        print(f"C-ECHO {args.peer}: no association", file=sys.stderr)
        return 1
    status = assoc.send_c_echo()
    assoc.release()
    ok = "Status" in status and status.Status == 0
    print(f"C-ECHO {args.peer}: {'success' if ok else 'failed'}")
    return 0 if ok else 1


def _store(args: argparse.Namespace) -> Store:

    data_dir = Path(args.data_dir or load_config(args.config).data_dir)
    if not (data_dir / "vesalius.sqlite").exists():
        raise ConfigError(f"--data-dir: no Vesalius database in {data_dir}")
    return Store(data_dir)


def _status(args: argparse.Namespace) -> int:
    from vesalius.node.api.routes import listing

    store = _store(args)
    report = {what: listing(store, what, args.limit) for what in ("series", "jobs", "deliveries")}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    columns = {
        "series": ("series_instance_uid", "modality", "instances", "state", "calling_ae"),
        "jobs": ("id", "series_instance_uid", "model", "state", "attempts", "error"),
        "deliveries": ("id", "job_id", "destination", "state", "attempts", "error"),
    }
    for what, rows in report.items():
        print(f"{what} ({len(rows)})")
        for row in rows:
            print("  " + "  ".join(str(row[c]) if row[c] is not None else "-" for c in columns[what]))
    return 0


def _audited(store: Store, command: str, job: int, ok: bool) -> None:
    """An operator command in the audit trail, under the OS user who ran it."""
    import getpass

    from vesalius.node import audit

    audit.Audit(store).record(audit.OPERATOR_ACTION, outcome=audit.SUCCESS if ok else audit.MINOR_FAILURE,
                              action="E", user=getpass.getuser(), via="cli", command=command, job=job)


def _retry(args: argparse.Namespace) -> int:
    store = _store(args)
    ok = store.retry_job(args.job)
    _audited(store, "retry", args.job, ok)
    if not ok:
        print(f"vesalius retry: job {args.job} does not exist or is still queued/running", file=sys.stderr)
        return 1
    print(f"job {args.job} queued again")
    return 0


def _resend(args: argparse.Namespace) -> int:
    store = _store(args)
    count = store.resend_job(args.job)
    _audited(store, "resend", args.job, bool(count))
    if not count:
        print(f"vesalius resend: job {args.job} has no deliveries (not finished yet?)", file=sys.stderr)
        return 1
    print(f"job {args.job}: {count} deliveries queued again")
    return 0


DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: datetime | None = None) -> str:
    """``--since``: an ISO 8601 time (naive = UTC) or a duration back from now (30m, 12h, 7d),
    as the ISO 8601 UTC text the audit table is ordered by."""
    now = now or datetime.now(UTC)
    match = DURATION.fullmatch(text.strip())
    if match:
        when = now - timedelta(seconds=float(match[1]) * SECONDS[match[2]])
    else:
        try:
            when = datetime.fromisoformat(text.strip())
        except ValueError:
            raise ConfigError(f"--since: expected an ISO 8601 time or a duration such as 30m, 12h, 7d; "
                              f"got {text!r}") from None
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    return when.isoformat(timespec="microseconds")


def _audit(args: argparse.Namespace) -> int:
    from vesalius.node.audit import read_events

    events = read_events(_store(args), parse_since(args.since) if args.since else None)
    if args.json:
        print(json.dumps(events, indent=1))
        return 0
    for e in events:
        details = " ".join(f"{k}={json.dumps(v)}" for k, v in e["details"].items())
        kind = f" [{e['event_type']}]" if e["event_type"] else ""
        print(f"{e['time']}  {e['event']}{kind}  outcome={e['outcome']}  user={e['user'] or '-'}  "
              f"address={e['address'] or '-'}  {details}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vesalius", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the DICOM node")
    serve.add_argument("--config", help="TOML configuration file")
    serve.add_argument("--ae-title", help=f"our AE title (default {DEFAULT_AE_TITLE})")
    serve.add_argument("--port", type=int, help="DICOM port (default 11112)")
    serve.add_argument("--http-host", help="address the HTTP API binds to (default 127.0.0.1: this machine "
                       "only)")
    serve.add_argument("--http-port", type=int, help="HTTP port for /healthz, /metrics and the API "
                       "(default 8080)")
    serve.add_argument("--data-dir", help="spool, database and results (default ./vesalius-data)")
    serve.add_argument("--destination", action="append", metavar="AE@HOST:PORT",
                       help="send results here (repeatable; adds to the config file's destinations)")
    serve.add_argument("--model", help="model for every rule (default builtin_ct): a configured name, "
                       "bundle:PATH, torchscript:PATH, onnx:PATH, nnunet:PATH, or several joined by +")
    serve.set_defaults(func=_serve)

    process = sub.add_parser("process", help="process one series folder offline")
    process.add_argument("series_dir")
    process.add_argument("--out", required=True, help="folder for the output objects and meshes")
    process.add_argument("--model", default="builtin_ct",
                         help="a configured name, bundle:PATH, torchscript:PATH, onnx:PATH, "
                              "nnunet:PATH, or several joined by + (default builtin_ct)")
    process.add_argument("--config", help="TOML configuration file (for its [[models]])")
    process.set_defaults(func=_process)

    models = sub.add_parser("models", help="list the models with their labels, device and weights")
    models.add_argument("--config", help="TOML configuration file (for its [[models]] and rules)")
    models.add_argument("--model", action="append", metavar="NAME_OR_PATH_FORM",
                        help="describe only this model (repeatable)")
    models.add_argument("--json", action="store_true", help="machine-readable output")
    models.set_defaults(func=_models)

    echo = sub.add_parser("echo", help="C-ECHO a DICOM peer")
    echo.add_argument("peer", metavar="AE@HOST:PORT")
    echo.add_argument("--ae-title", default=DEFAULT_AE_TITLE)
    echo.set_defaults(func=_echo)

    for name, func, text in (("status", _status, "list series, jobs and deliveries with their states"),
                             ("retry", _retry, "run a failed or finished job again"),
                             ("resend", _resend, "send a finished job's results to its destinations again"),
                             ("audit", _audit, "show the audit trail (associations, jobs, deliveries, "
                                               "operator actions, starts)")):
        command = sub.add_parser(name, help=text)
        if name in ("status", "audit"):
            command.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "status":
            command.add_argument("--limit", type=int, default=50)
        elif name == "audit":
            command.add_argument("--since", metavar="ISO|DURATION",
                                 help="events from this time (2026-12-01T08:00, UTC if no offset) or this "
                                      "long ago (30m, 12h, 7d)")
        else:
            command.add_argument("job", type=int, help="job id (see `vesalius status`)")
        command.add_argument("--config", help="TOML configuration file (for its data_dir)")
        command.add_argument("--data-dir", help="the node's data folder (default ./vesalius-data)")
        command.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in ("pynetdicom", "highdicom", "uvicorn"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"vesalius: configuration error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
