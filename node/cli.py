"""The vesalius command: thin shells over the node (serve), the pipeline (process) and its state."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from vesalius.node.checks import ConfigError
from vesalius.node.config import DEFAULT_AE_TITLE, Config, load_config, with_overrides

if TYPE_CHECKING:
    from vesalius.node.store import Store

MODEL_FORMS = ("a configured name, builtin_ct, bundle:PATH, torchscript:PATH, onnx:PATH, nnunet:PATH, "
               "totalsegmentator:PATH, or several joined by +")


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("vesalius")
    except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
        return "unknown"


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


def check_models(config: Config) -> None:
    """Every model a rule names must resolve, have its runtime installed and its weights, and
    every structure a destination selects must be one its models produce: a ConfigError at
    start-up, not a failed first job or an STL never sent."""
    from vesalius.inference.models.backend import declared_labels
    from vesalius.inference.models.registry import ModelSpecError, check

    produced: dict[str, set[str]] = {}  # rule model -> the structure names it produces
    for i, rule in enumerate(config.rules):
        try:
            specs = check(rule.model, config.models)
            produced[rule.model] = {label.name for spec in specs for label in declared_labels(spec)}
        except (ModelSpecError, ValueError, OSError, KeyError) as err:
            raise ConfigError(f"rules[{i}].model: {err}") from err
    every = set().union(*produced.values())
    for i, destination in enumerate(config.destinations):
        wanted = destination.encapsulated_stl
        if not isinstance(wanted, tuple):
            continue
        models = [r.model for r in config.rules if destination.name in config.destination_names(r)]
        known = set().union(*(produced[m] for m in models)) if models else every
        unknown = [name for name in wanted if name not in known]
        if unknown:
            which = f"models {', '.join(dict.fromkeys(models))}" if models else "the routed models"
            raise ConfigError(f"destinations[{i}].encapsulated_stl: {', '.join(map(repr, unknown))} is not a "
                              f"structure {which} produce (known: {', '.join(sorted(known)) or 'none'})")


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
            state = ("RUNTIME MISSING" if not row["runtime_installed"] else
                     "weights present" if row["weights_present"] else "WEIGHTS MISSING")
            where = f" {row['path']}" if row["path"] else ""
            print(f"{row['name']}  [{row['kind']}{where}]  device={row['device']}  {state}")
            if row["labels"]:
                print(f"    labels: {', '.join(row['labels'])}")
            for problem in row["problems"]:
                print(f"    problem: {problem}")
    if not all(row["runtime_installed"] for row in rows):
        for row in rows:
            if not row["runtime_installed"]:
                print(f"vesalius models: {row['kind']}:{row['path'] or row['name']} {row['problems'][0]}",
                      file=sys.stderr)
        return 2
    return 0 if all(row["weights_present"] for row in rows) else 1


def series_files(folder: Path) -> list[Path]:
    """The DICOM files under ``folder``, hidden ones left out (DICOM files need no extension).
    Others (an NRRD label map, a README beside the slices) are skipped with a log line."""
    from pydicom.misc import is_dicom

    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if is_dicom(path):  # the DICM prefix, as load_series (pydicom.dcmread) requires
            files.append(path)
        else:
            logging.getLogger("vesalius.process").info("skipping %s: not a DICOM file",
                                                       path.relative_to(folder))
    return files


def _process(args: argparse.Namespace) -> int:
    from pydicom.misc import is_dicom

    from vesalius.inference.models.registry import ModelSpecError, configure
    from vesalius.inference.volume import VolumeError
    from vesalius.inference.volume_files import is_volume_file
    from vesalius.node.console import is_terminal, process_summary, stage_progress
    from vesalius.node.pipeline import run_pipeline, run_pipeline_on_file

    source = Path(args.input)
    if not source.exists():
        print(f"vesalius process: {source} does not exist", file=sys.stderr)
        return 2
    config = load_config(args.config)
    configure(config.models, config.gpu_jobs_per_device)
    volume_file = source.is_file() and is_volume_file(source)
    if source.is_file() and not volume_file and not is_dicom(source):
        print(f"vesalius process: {source.name} is neither DICOM nor NIfTI/NRRD "
              "(.nii, .nii.gz, .nrrd, .nhdr)", file=sys.stderr)
        return 2
    files = series_files(source) if source.is_dir() else [source]
    if not files:
        print(f"vesalius process: no DICOM files in {source}", file=sys.stderr)
        return 1
    key = ""
    if args.rule and not volume_file:  # the UIDs the node writes for this study-level rule
        import pydicom

        from vesalius.node.series import result_key

        key = result_key(str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), args.rule)
    try:
        with stage_progress(is_terminal() and not args.json) as on_stage:
            if volume_file:
                summary = run_pipeline_on_file(source, args.out, args.model, modality=args.modality,
                                               on_stage=on_stage)
            else:
                summary = run_pipeline(files, args.out, args.model, result_key=key, on_stage=on_stage)
    except VolumeError as err:  # a volume file's reasons name the file
        what = "" if volume_file else "cannot place the series in space: "
        print(f"vesalius process: {what}{err}", file=sys.stderr)
        return 1
    except ModelSpecError as err:
        print(f"vesalius process: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a model refusing the input (builtin_ct on an MR): one line, not a traceback
        logging.getLogger("vesalius.process").debug("process failed", exc_info=True)
        print(f"vesalius process: model {args.model} failed: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2) if args.json else process_summary(summary, Path(args.out)))
    return 0


def _echo(args: argparse.Namespace) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from vesalius.node.destinations.dicom import DicomDestination, connect_error
    from vesalius.node.tls import ClientTLS, client_context

    peer = DicomDestination.parse(args.peer)
    ae = AE(ae_title=args.ae_title)
    ae.add_requested_context(Verification)
    tls_args = None
    if bool(args.tls_certificate) != bool(args.tls_private_key):
        raise ConfigError("--tls-certificate and --tls-private-key go together (mutual TLS)")
    if args.tls or args.tls_ca or args.tls_certificate:
        files = {"ca_certificates": args.tls_ca, "certificate": args.tls_certificate,
                 "private_key": args.tls_private_key}
        tls = ClientTLS(**{k: Path(v) for k, v in files.items() if v},
                        verify_hostname=not args.no_verify_hostname)
        tls_args = (client_context(tls, "--tls"), peer.host)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        cause = connect_error(peer.host, peer.port, 10.0)
        print(f"C-ECHO {args.peer}: no association{': ' + cause if cause else ''}", file=sys.stderr)
        return 1
    status = assoc.send_c_echo()
    assoc.release()
    ok = "Status" in status and status.Status == 0
    print(f"C-ECHO {args.peer}: {'success' if ok else 'failed'}")
    return 0 if ok else 1


def _store(args: argparse.Namespace) -> Store:
    from vesalius.node.store import existing_store

    config = load_config(args.config)
    return existing_store(Path(args.data_dir or config.data_dir), config.database.url)


def _status(args: argparse.Namespace) -> int:
    from vesalius.node.api.routes import listing

    store = _store(args)
    report = {what: listing(store, what, args.limit) for what in ("studies", "series", "jobs", "deliveries")}
    from vesalius.node.pull.jobs import listing as pull_listing

    pulls = pull_listing(store, args.limit)
    if args.json:
        print(json.dumps({**report, "pulls": pulls}, indent=1))
        return 0
    from vesalius.node.console import status_text

    print(status_text(report))
    print(f"pulls ({len(pulls)})")
    for pull in pulls:  # studies per state: queried, retrieving, received, processed, failed, cancelled
        counts = "  ".join(f"{k}={v}" for k, v in pull["studies"].items() if v)
        print(f"  {pull['id']}  {pull['source']}  {pull['state']}  {counts}  {pull['error'] or ''}".rstrip())
    return 0


def _audited(store: Store, command: str, job: int, ok: bool) -> None:
    """An operator command in the audit trail, under the OS user who ran it."""
    import getpass

    from vesalius.node import audit

    audit.Audit(store).record(audit.OPERATOR_ACTION, outcome=audit.SUCCESS if ok else audit.MINOR_FAILURE,
                              action="E", user=getpass.getuser(), via="cli", command=command, job=job)


def _retry(args: argparse.Namespace) -> int:
    from vesalius.node.store import removal_of_spool

    store = _store(args)
    job = store.job(args.job)
    if job is None:
        print(f"vesalius retry: no job {args.job}", file=sys.stderr)
        return 1
    removed = removal_of_spool(store, job["series_instance_uid"])
    if removed is not None and not store.series_paths(job["series_instance_uid"]):
        print(f"vesalius retry: the series of job {args.job} was removed by retention "
              f"({removed['reason']}) at {_when(removed['removed_at'])}; send it again to process it",
              file=sys.stderr)
        return 1
    ok = store.retry_job(args.job)
    _audited(store, "retry", args.job, ok)
    if not ok:
        print(f"vesalius retry: job {args.job} is still queued or running", file=sys.stderr)
        return 1
    print(f"job {args.job} queued again")
    return 0


def _resend(args: argparse.Namespace) -> int:
    from vesalius.node.store import removal_of_results

    store = _store(args)
    if store.job(args.job) is None:
        print(f"vesalius resend: no job {args.job}", file=sys.stderr)
        return 1
    removed = removal_of_results(store, args.job)
    if removed is not None:
        print(f"vesalius resend: the results of job {args.job} were removed by retention "
              f"({removed['reason']}) at {_when(removed['removed_at'])}; `vesalius retry {args.job}` "
              "computes them again if its series is still stored", file=sys.stderr)
        return 1
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


def _when(timestamp: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _cleanup(args: argparse.Namespace) -> int:
    from vesalius.node.retention import cleanup

    store = _store(args)
    report = cleanup(store, load_config(args.config).retention, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for item in report["removed"]:
        what = f"job {item['job_id']} results" if item["kind"] == "results" else "spool of series"
        size = item["bytes"] / 2**20
        print(f"{verb} {what} {item['series_instance_uid']}  {size:.1f} MB  ({item['reason']})")
    print(f"{verb} {len(report['removed'])} item(s), {report['bytes_freed'] / 2**20:.1f} MB; "
          f"free before: {report['free_bytes'] / 2**20:.0f} MB, high-water mark "
          f"{report['high_water_bytes'] / 2**20:.0f} MB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vesalius",
        description="A PACS-integrated DICOM node: receives CT/MR series, segments them and sends back "
                    "DICOM-SEG, Surface Segmentation, a measurement SR and 3D-printable meshes.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
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
    serve.add_argument("--model", help=f"model for every rule (default builtin_ct): {MODEL_FORMS}")
    serve.set_defaults(func=_serve)

    process = sub.add_parser("process", help="process one series folder, DICOM file, or NIfTI/NRRD volume "
                             "offline")
    process.add_argument("input", metavar="SERIES_DIR_OR_FILE",
                         help="a folder holding the DICOM files of one series (other files are skipped), "
                         "one DICOM file (a multi-frame series), or a NIfTI (.nii, .nii.gz) or NRRD (.nrrd, "
                         ".nhdr) volume: then the label map is written in the same format, no DICOM objects")
    process.add_argument("--modality", default="CT", choices=("CT", "MR"),
                         help="what a NIfTI/NRRD volume holds (the file does not say; default CT)")
    process.add_argument("--out", required=True, help="folder for the output objects and meshes")
    process.add_argument("--model", default="builtin_ct", help=f"{MODEL_FORMS} (default builtin_ct)")
    process.add_argument("--config", help="TOML configuration file (for its [[models]])")
    process.add_argument("--rule", metavar="NAME", help="write the UIDs the node writes for this "
                         "study-level rule (per study and rule; default: per series)")
    process.add_argument("--json", action="store_true", help="print the machine summary (summary.json) "
                         "instead of the short one for people")
    process.set_defaults(func=_process)

    models = sub.add_parser("models", help="list the models with their labels, device and weights")
    models.add_argument("--config", help="TOML configuration file (for its [[models]] and rules)")
    models.add_argument("--model", action="append", metavar="NAME_OR_PATH_FORM",
                        help="describe only this model (repeatable)")
    models.add_argument("--json", action="store_true", help="machine-readable output")
    models.set_defaults(func=_models)

    echo = sub.add_parser("echo", help="C-ECHO a DICOM peer")
    echo.add_argument("peer", metavar="AE@HOST:PORT", help="the peer's AE title, host and DICOM port")
    echo.add_argument("--ae-title", default=DEFAULT_AE_TITLE,
                      help=f"our calling AE title (default {DEFAULT_AE_TITLE})")
    echo.add_argument("--tls", action="store_true", help="DICOM TLS (implied by the --tls-* files)")
    echo.add_argument("--tls-ca", metavar="FILE", help="CA certificates to trust (default: the system's)")
    echo.add_argument("--tls-certificate", metavar="FILE", help="our certificate, for mutual TLS")
    echo.add_argument("--tls-private-key", metavar="FILE", help="its private key")
    echo.add_argument("--no-verify-hostname", action="store_true",
                      help="accept a certificate that does not name the host")
    echo.set_defaults(func=_echo)

    for name, func, text in (("status", _status, "list studies (with why each series was chosen or "
                              "skipped), series, jobs and deliveries with their states"),
                             ("retry", _retry, "run a failed or finished job again"),
                             ("resend", _resend, "send a finished job's results to its destinations again"),
                             ("audit", _audit, "show the audit trail (associations, jobs, deliveries, "
                                               "operator actions, starts)")):
        command = sub.add_parser(name, help=text)
        if name in ("status", "audit"):
            command.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "status":
            command.add_argument("--limit", type=int, default=50, help="rows of each kind (default 50)")
        elif name == "audit":
            command.add_argument("--since", metavar="ISO|DURATION",
                                 help="events from this time (2026-12-01T08:00, UTC if no offset) or this "
                                      "long ago (30m, 12h, 7d)")
        else:
            command.add_argument("job", type=int, help="job id (see `vesalius status`)")
        command.add_argument("--config", help="TOML configuration file (for its data_dir)")
        command.add_argument("--data-dir", help="the node's data folder (default ./vesalius-data)")
        command.set_defaults(func=func)

    clean = sub.add_parser("cleanup", help="remove delivered spool and results per [retention] "
                           "(the node also does this every [retention] interval)")
    clean.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    clean.add_argument("--json", action="store_true", help="machine-readable output")
    clean.add_argument("--config", help="TOML configuration file (for [retention] and data_dir)")
    clean.add_argument("--data-dir", help="the node's data folder (default ./vesalius-data)")
    clean.set_defaults(func=_cleanup)

    from vesalius.node.evaluate_cli import add_parser as add_evaluate

    add_evaluate(sub)  # vesalius evaluate (issue 15): its code is node/evaluate_cli.py
    from vesalius.node.cases_cli import add_parser as add_cases

    add_cases(sub)  # vesalius cases (issue 16): its code is node/cases_cli.py
    from vesalius.node.train_cli import add_parser as add_train

    add_train(sub)  # vesalius train (issue 16): its code is node/train_cli.py
    from vesalius.node.pull.command import add_parser as add_pull_parser

    add_pull_parser(sub)  # `vesalius pull` (node/pull/command.py)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in ("pynetdicom", "highdicom", "uvicorn"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from vesalius.node.logs import install as redact_library_logs

    redact_library_logs()
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"vesalius: configuration error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
