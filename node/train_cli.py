"""`vesalius train --model NAME`: fine-tune a configured MONAI bundle on the case library; a new
version is written only if it validates better (inference.training, docs/learning.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vesalius.node.cases import META_FILE, CaseFilter, cases
from vesalius.node.checks import ConfigError
from vesalius.node.config import load_config
from vesalius.node.store import existing_store

FILTER_KEYS = {"structure": str, "scanner": str, "since": str, "until": str, "min-agreement": float,
               "max-agreement": float}


def add_parser(sub: Any) -> None:
    """Register the subcommand on the ``vesalius`` parser's subparsers."""
    command = sub.add_parser("train", help="fine-tune a MONAI bundle on the case library; keep the new "
                                           "version only if its validation Dice improves")
    command.add_argument("--model", required=True, help="a [[models]] name of kind bundle")
    command.add_argument("--cases", default="", metavar="FILTER",
                         help="which cases: KEY=VALUE,... with keys " + ", ".join(FILTER_KEYS))
    command.add_argument("--epochs", type=int, default=20, help="passes over the training cases")
    command.add_argument("--val-fraction", type=float, default=0.25,
                         help="the newest fraction of the cases held back for validation")
    command.add_argument("--min-improvement", type=float, default=0.005,
                         help="mean validation Dice the new version must gain")
    command.add_argument("--learning-rate", type=float, default=1e-3)
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--json", action="store_true", help="machine-readable output")
    command.add_argument("--config", help="TOML configuration file (its [[models]] and data_dir)")
    command.add_argument("--data-dir", help="the node's data folder")
    command.set_defaults(func=_train)


def parse_filter(text: str) -> CaseFilter:
    """``structure=liver,min-agreement=0.5`` as a CaseFilter; ConfigError names a wrong key."""
    values: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in FILTER_KEYS or not value:
            raise ConfigError(f"--cases: expected KEY=VALUE with KEY one of {', '.join(FILTER_KEYS)}, "
                              f"got {part!r}")
        try:
            values[key.replace("-", "_")] = FILTER_KEYS[key](value)
        except ValueError:
            raise ConfigError(f"--cases: {key} needs a number, got {value!r}") from None
    return CaseFilter(**values)


def _train(args: argparse.Namespace) -> int:
    from vesalius.inference.models.monai_bundle import bundle_folder
    from vesalius.inference.training import TrainingCase, TrainingError, fine_tune, split

    config = load_config(args.config)
    spec = config.models.get(args.model)
    if spec is None or spec.kind != "bundle" or spec.path is None:
        raise ConfigError(f"--model: {args.model!r} is not a [[models]] entry of kind bundle "
                          f"(configured: {', '.join(sorted(config.models)) or 'none'})")
    data_dir = Path(args.data_dir or config.data_dir)
    library = []
    for case in cases(existing_store(data_dir, config.database.url), parse_filter(args.cases)):
        meta = json.loads((Path(case["folder"]) / META_FILE).read_text())
        library.append(TrainingCase(f"case-{case['id']:06d}", Path(case["folder"]) / "image.nii.gz",
                                    Path(case["folder"]) / "label.nii.gz",
                                    {int(k): v["name"] for k, v in meta["labels"].items()}))
    try:
        train, val = split(library, args.val_fraction)
        result = fine_tune(spec.path, bundle_folder(spec), train, val, epochs=args.epochs,
                           min_improvement=args.min_improvement, learning_rate=args.learning_rate,
                           seed=args.seed, device=spec.device, model_name=args.model)
    except TrainingError as err:
        print(f"vesalius train: {err}")
        return 1
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    elif result.accepted:
        print(f"model {args.model}: version {result.version} written to {result.folder}: {result.reason}")
    else:
        print(f"model {args.model}: no new version: {result.reason}")
    if not args.json:
        for name in sorted(set(result.before) | set(result.after)):
            print(f"  {name}  Dice {result.before.get(name, 0):.4f} -> {result.after.get(name, 0):.4f}")
    return 0 if result.accepted else 1
