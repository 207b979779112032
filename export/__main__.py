"""CLI: ``python -m export RUN_DIR [--out DIR] [--no-sweep]``.

Exports a finished training run to a model package: ONNX files checked against PyTorch, FLOPs
counted from the graphs and cross-checked with torch's counter, ``manifest.json``, and the τ sweep
on the run's validation split through the serving runner.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from training.pipeline import Run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    parser.add_argument("run_dir", help="a run directory written by `python -m training run`")
    parser.add_argument("--out", help="package directory (default: the run's package.out_dir)")
    parser.add_argument("--name", help="package name in the manifest")
    parser.add_argument("--version", help="package version in the manifest")
    parser.add_argument("--default-tau", type=float, help="default τ written to the manifest")
    parser.add_argument("--no-sweep", action="store_true", help="skip the τ sweep")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run = Run.open(args.run_dir)
        changes = {k: v for k, v in {"out_dir": args.out and str(Path(args.out)), "name": args.name,
                                     "version": args.version, "default_tau": args.default_tau}.items()
                   if v is not None}
        run.cfg = dataclasses.replace(run.cfg, package=dataclasses.replace(run.cfg.package, **changes))
        stages = ("export",) if args.no_sweep else ("export", "sweep")
        run.run(stages, force=True)
    except (ValueError, FileNotFoundError) as e:
        logging.getLogger("export").error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
