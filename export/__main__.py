"""CLI: ``python -m export {package,card,evaluate,diagnose} …``.

- ``package RUN_DIR`` (or ``--config C [--set k=v]``): a trained run to a model package — ONNX
  files checked against PyTorch, FLOPs counted from the graphs and cross-checked with torch's
  counter, every candidate head timed, the τ sweep on the run's validation split through the
  serving runner, the card, ``manifest.json`` (``export.build``).
- ``card PACKAGE [--notes FILE]``: re-render a package's card from its manifest.
- ``evaluate PACKAGE``: the sweep with other activator options or another backend, printed
  (``export.evaluate``).
- ``diagnose RUN_DIR``: what limits a package: clustifier, heads or combination rule
  (``export.diagnose``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from export import diagnose, evaluate
from export.build import build_package, rewrite_card
from training.config import load_config
from training.pipeline import Run


def _package(args: argparse.Namespace) -> int:
    if (args.run_dir is None) == (args.config is None):
        raise ValueError("give a run directory or --config (the run it names), not both")
    if args.run_dir:
        run = Run.open(args.run_dir)
    else:  # the run the config names, with the config's package settings (they may differ)
        cfg = load_config(args.config, args.overrides)
        run = Run.open(cfg.run_dir)
        run.cfg = dataclasses.replace(run.cfg, package=cfg.package)
    changes = {k: v for k, v in {"out_dir": args.out and str(Path(args.out)), "name": args.name,
                                 "version": args.version, "default_tau": args.default_tau}.items()
               if v is not None}
    run.cfg = dataclasses.replace(run.cfg, package=dataclasses.replace(run.cfg.package, **changes))
    build_package(run.artifacts(), sweep=not args.no_sweep, notes=args.notes)
    return 0


def _card(args: argparse.Namespace) -> int:
    rewrite_card(args.package_dir, args.notes)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    pkg = sub.add_parser("package", help="export a trained run to a model package")
    pkg.add_argument("run_dir", nargs="?", help="a run directory written by `python -m training run`")
    pkg.add_argument("--config", help="the training config instead (its run_dir)")
    pkg.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="config overrides, as given to training")
    pkg.add_argument("--out", help="package directory (default: the run's package.out_dir)")
    pkg.add_argument("--name", help="package name in the manifest")
    pkg.add_argument("--version", help="package version in the manifest")
    pkg.add_argument("--default-tau", type=float, help="default τ written to the manifest")
    pkg.add_argument("--no-sweep", action="store_true", help="skip the τ sweep")
    pkg.add_argument("--notes", type=Path, help="markdown appended to the card as 'Status "
                     "against the targets'")
    pkg.set_defaults(func=_package)
    card = sub.add_parser("card", help="re-render a package's card from its manifest")
    card.add_argument("package_dir", type=Path)
    card.add_argument("--notes", type=Path, help="markdown appended as 'Status against the targets'")
    card.set_defaults(func=_card)
    ev = sub.add_parser("evaluate", help="the τ sweep with other activator options, printed")
    evaluate.add_arguments(ev)
    ev.set_defaults(func=evaluate.run)
    dg = sub.add_parser("diagnose", help="what limits a package: clustifier, heads or rule")
    diagnose.add_arguments(dg)
    dg.set_defaults(func=diagnose.run)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        logging.getLogger("export").error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
