"""``vesalius evaluate``: Dice, IoU, HD95, surface distance and volume difference of a segmentation
(or a cohort of them) against a reference; ``--job`` evaluates a node job's results and keeps the
figures with the job. docs/evaluate.md is the walkthrough."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    """Register the subcommand on the ``vesalius`` parser's subparsers."""
    command = sub.add_parser(
        "evaluate", help="Dice, IoU, HD95, surface distance, volume difference per structure (and per "
                         "cohort) of a segmentation against a reference",
        description="PRED and REF: a DICOM-SEG (BINARY or LABELMAP), a Vesalius results folder, a "
                    "NIfTI/NRRD label map (names from --pred-labels/--ref-labels), or two folders of cases "
                    "paired by Series Instance UID or file name. With --job ID, only REF: the job's SEG is "
                    "PRED and the figures are stored with the job.")
    command.add_argument("paths", nargs="+", metavar="PATH",
                         help="PRED REF: prediction and reference (REF alone with --job)")
    command.add_argument("--job", type=int, metavar="ID", help="evaluate this finished job's SEG and store "
                         "the figures with it (see `vesalius status`)")
    command.add_argument("--pred-labels", metavar="FILE",
                         help="JSON {\"value\": \"name\"} for a NIfTI/NRRD PRED")
    command.add_argument("--ref-labels", metavar="FILE",
                         help="JSON {\"value\": \"name\"} for a NIfTI/NRRD REF (TotalSegmentator's "
                         "label map, for one)")
    command.add_argument("--map", metavar="FILE", help="JSON {\"target\": [\"pattern\", ...]} grouping or "
                         "renaming structures before matching, e.g. {\"bone\": [\"vertebrae_*\", \"rib_*\"]}")
    output = command.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="machine-readable output")
    output.add_argument("--csv", action="store_true", help="one line per (case, structure)")
    command.add_argument("--report", metavar="FILE.html", help="also write a self-contained HTML page with "
                         "plots (Dice box plots, Bland-Altman of volumes)")
    command.add_argument("--config", help="TOML configuration file (for its data_dir, with --job)")
    command.add_argument("--data-dir", help="the node's data folder (with --job; default ./vesalius-data)")
    command.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vesalius.inference.evaluation import EvaluationError, evaluate, evaluate_cohort, is_cohort, read_map
    from vesalius.inference.evaluation.report import table, to_csv, to_html
    from vesalius.node.checks import ConfigError

    wanted = 1 if args.job is not None else 2
    if len(args.paths) != wanted:
        usage = "REF (the job's SEG is PRED)" if args.job is not None else "PRED REF"
        print(f"vesalius evaluate: expected {usage}, got {len(args.paths)} path(s)", file=sys.stderr)
        return 2
    paths = [Path(p) for p in args.paths]
    for path in paths:
        if not path.exists():
            print(f"vesalius evaluate: {path} does not exist", file=sys.stderr)
            return 2
    try:
        mapping = read_map(args.map) if args.map else None
        if args.job is not None:
            result = _evaluate_job(args, paths[0], mapping)
            if result is None:
                return 1
        elif is_cohort(paths[0]) != is_cohort(paths[1]):
            print("vesalius evaluate: PRED and REF must both be cohorts (folders of cases) or both be one "
                  "case", file=sys.stderr)
            return 2
        elif is_cohort(paths[0]):
            result = evaluate_cohort(paths[0], paths[1], mapping, pred_labels=args.pred_labels,
                                     ref_labels=args.ref_labels)
        else:
            result = evaluate(paths[0], paths[1], mapping, pred_labels=args.pred_labels,
                              ref_labels=args.ref_labels).to_json()
    except EvaluationError as err:
        print(f"vesalius evaluate: {err}", file=sys.stderr)
        return 1
    except ConfigError:
        raise  # main() reports it (no data folder for --job)
    except Exception as err:  # a library failing on these inputs: one line (-v adds the traceback)
        import logging

        logging.getLogger("vesalius.evaluate").debug("evaluate failed", exc_info=True)
        print(f"vesalius evaluate: the evaluation failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if args.report:
        Path(args.report).write_text(to_html(result), encoding="utf-8")
    if args.json:
        print(json.dumps(result, indent=1))
    elif args.csv:
        print(to_csv(result), end="")
    else:
        print(table(result))
        if args.report:
            print(f"report: {args.report}")
    return 0


def _evaluate_job(args: argparse.Namespace, reference: Path, mapping: Any) -> dict[str, Any] | None:
    """The job's SEG against REF, stored with the job and audited under the OS user."""
    import getpass

    from vesalius.node import audit
    from vesalius.node.config import load_config
    from vesalius.node.evaluations import NotEvaluable, evaluate_job
    from vesalius.node.store import existing_store

    config = load_config(args.config)
    store = existing_store(Path(args.data_dir or config.data_dir), config.database.url)
    try:
        stored = evaluate_job(store, args.job, reference.resolve(), reference.name, via="cli",
                              mapping=mapping, ref_labels=Path(args.ref_labels) if args.ref_labels else None)
    except NotEvaluable as err:
        print(f"vesalius evaluate: {err}", file=sys.stderr)
        ok = False
    else:
        ok = True
    audit.Audit(store).record(audit.OPERATOR_ACTION, outcome=audit.SUCCESS if ok else audit.MINOR_FAILURE,
                              action="E", user=getpass.getuser(), via="cli", command="evaluate", job=args.job)
    if not ok:
        return None
    figures: dict[str, Any] = stored["figures"]
    return figures
