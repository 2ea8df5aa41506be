"""`vesalius cases list|show|export`: the case library radiologists' corrections built (node.cases)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vesalius.node.cases import CaseFilter, case, cases, export_monai, export_nnunet
from vesalius.node.config import load_config
from vesalius.node.store import Store, existing_store


def add_parser(sub: Any) -> None:
    """Register the subcommand on the ``vesalius`` parser's subparsers."""
    command = sub.add_parser("cases", help="the de-identified case library made from radiologists' "
                                           "corrections")
    actions = command.add_subparsers(dest="action", required=True)
    for name, text in (("list", "list the cases the filters keep"), ("show", "one case's metadata"),
                       ("export", "copy the cases as a MONAI datalist or an nnU-Net raw dataset")):
        action = actions.add_parser(name, help=text)
        action.add_argument("--config", help="TOML configuration file (for its data_dir)")
        action.add_argument("--data-dir", help="the node's data folder (default ./vesalius-data)")
        if name == "show":
            action.add_argument("case", type=int, help="case id (see `vesalius cases list`)")
            continue
        add_filters(action)
        if name == "list":
            action.add_argument("--json", action="store_true", help="machine-readable output")
        else:
            action.add_argument("--format", choices=("monai", "nnunet"), required=True)
            action.add_argument("--out", required=True, help="folder to write (created)")
            action.add_argument("--dataset-id", type=int, default=501, help="nnU-Net dataset number")
        action.set_defaults(func=_run)
    actions.choices["show"].set_defaults(func=_run)


def add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--structure", default="", help="cases with this structure (name)")
    parser.add_argument("--scanner", default="", help="manufacturer or scanner model contains this")
    parser.add_argument("--since", default="", help="made on or after this date (YYYY-MM-DD)")
    parser.add_argument("--until", default="", help="made on or before this date (YYYY-MM-DD)")
    parser.add_argument("--min-agreement", type=float, help="mean Dice against the correction at least")
    parser.add_argument("--max-agreement", type=float, help="mean Dice against the correction at most")


def case_filter(args: argparse.Namespace) -> CaseFilter:
    return CaseFilter(args.structure, args.scanner, args.since, args.until, args.min_agreement,
                      args.max_agreement)


def _store(args: argparse.Namespace) -> Store:
    config = load_config(args.config)
    return existing_store(Path(args.data_dir or config.data_dir), config.database.url)


def _run(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.action == "show":
        found = case(store, args.case)
        if found is None:
            print(f"vesalius cases: no case {args.case}")
            return 1
        print(json.dumps(found, indent=1))
        return 0
    selected = cases(store, case_filter(args))
    if args.action == "list":
        if args.json:
            print(json.dumps(selected, indent=1))
            return 0
        print(f"cases ({len(selected)})")
        for c in selected:
            score = f"{c['agreement']:.3f}" if c["agreement"] is not None else "-"
            print(f"  {c['id']}  {c['created_at'][:10]}  {c['patient']}  {c['modality']} {c['manufacturer']} "
                  f"{c['scanner_model']}  {c['model']} {c['model_version'] or '-'}  agreement {score}  "
                  f"{', '.join(c['structures'])}")
        return 0
    out = Path(args.out)
    if args.format == "monai":
        written = export_monai(selected, out)
    else:
        written = export_nnunet(selected, out, args.dataset_id)
    print(f"exported {len(selected)} case(s) to {written}")
    return 0
