"""`enersis`: one console command, a subcommand per job.

Each subcommand lives in its service's module, which provides
`add_arguments(parser)` and `run(args) -> int` and whose docstring's first
line is the help text.  A subcommand appears here only once its module exists.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

SUBCOMMANDS = (
    ("agent", "enersis.agent.main"),
    ("arbiter", "enersis.arbiter.main"),
    ("power", "enersis.power.main"),
    ("send", "enersis.ops.send"),
    ("status", "enersis.ops.status"),
    ("simulate", "enersis.simulator.main"),
    ("demo", "enersis.demo.main"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enersis",
        description="Energy saving for virtualised clusters: pack VMs, power idle nodes off, wake them on demand.",
    )
    parser.add_argument("--log-level", default=os.environ.get("ENERSIS_LOG_LEVEL", "INFO"),
                        help="DEBUG, INFO, WARNING or ERROR (default INFO, or $ENERSIS_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # not built yet: no stub pretends to work
            raise
        doc = (module.__doc__ or "").strip().splitlines()
        p = sub.add_parser(name, help=doc[0] if doc else name, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
