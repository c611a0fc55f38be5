"""Run the arbiter: fold telemetry, decide, migrate VMs and power nodes (or convert a 2012 config).

    enersis arbiter --config arbiter.toml
    enersis arbiter --import-legacy /etc/enersis/enersis-frontend.conf [--output arbiter.toml]

See enersis.arbiter.config for the TOML keys.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from enersis.common.config import ConfigError

log = logging.getLogger("enersis.arbiter")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="arbiter.toml")
    parser.add_argument("--import-legacy", metavar="FILE",
                        help="read a 2012 enersis-frontend.conf and write the equivalent arbiter.toml")
    parser.add_argument("--output", metavar="FILE", help="with --import-legacy: where to write (default: stdout)")
    parser.add_argument("--force", action="store_true", help="with --output: overwrite an existing file")


def run(args: argparse.Namespace) -> int:
    if args.import_legacy:
        return _import_legacy(args)
    if not args.config:
        print("enersis arbiter: give --config arbiter.toml (or --import-legacy FILE)", file=sys.stderr)
        return 2
    from .config import load
    from .runner import ArbiterService

    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"enersis arbiter: {exc}", file=sys.stderr)
        return 2
    assert cfg.broker is not None
    service = ArbiterService(cfg, cfg.broker)
    signal.signal(signal.SIGTERM, lambda *_: service.request_stop())
    signal.signal(signal.SIGINT, lambda *_: service.request_stop())
    service.start()
    try:
        service.wait()
    finally:
        service.stop()
        log.info("arbiter stopped")
    return 0


def _import_legacy(args: argparse.Namespace) -> int:
    from .legacy import LegacyFormatError, convert_file

    try:
        text = convert_file(args.import_legacy)
    except FileNotFoundError:
        print(f"enersis arbiter: {args.import_legacy}: no such file", file=sys.stderr)
        return 2
    except (LegacyFormatError, ValueError) as exc:
        print(f"enersis arbiter: {exc}", file=sys.stderr)
        return 2
    if not args.output:
        sys.stdout.write(text)
        return 0
    out = Path(args.output)
    if out.exists() and not args.force:
        print(f"enersis arbiter: {out} exists; add --force to overwrite it", file=sys.stderr)
        return 2
    out.write_text(text)
    print(f"wrote {out}", file=sys.stderr)
    return 0
