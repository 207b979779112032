"""CLI: ``python -m training run --config configs/synthetic.toml [--set key=value ...]``.

Runs the staged pipeline (see ``training.pipeline``); every stage resumes from its artifacts.
``python -m training import-original --config C --onnx PKG/original.onnx`` fills stage 1 from a
shipped package instead of retraining the original (hours on a CPU).
``torchrun --nproc_per_node N -m training run …`` trains data-parallel on N processes
(``training.distributed``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from training import distributed as ddp
from training.config import load_config
from training.pipeline import STAGES, Run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) the pipeline")
    run.add_argument("--config", help="TOML file; sections mirror training.config.RunConfig")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set original.epochs=5 (repeatable)")
    run.add_argument("--stages", default=",".join(STAGES),
                     help=f"comma-separated subset of {','.join(STAGES)}")
    run.add_argument("--force", action="store_true", help="redo the given stages")
    run.add_argument("--log-level", default="INFO")
    imp = sub.add_parser("import-original",
                         help="stage 1 from an exported original.onnx (skips training the original)")
    imp.add_argument("--config", help="TOML file whose [model] matches the graph")
    imp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    imp.add_argument("--onnx", required=True, help="path to original.onnx, e.g. models/<name>/original.onnx")
    imp.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ddp.setup()
    if not ddp.is_main():  # one log: rank 0's (the others' warnings and errors still show)
        logging.getLogger().setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "import-original":
            Run(cfg).import_original(args.onnx)
            return 0
        stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
        Run(cfg).run(stages, force=args.force)
    except (ValueError, FileNotFoundError) as e:
        logging.getLogger("training").error("%s", e)
        return 2
    finally:
        ddp.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
