"""How the operator tools find the broker, and the exit codes scripts rely on.

Precedence, first match wins:
  1. --broker-url (credentials in the URL, or --user / --password-file /
     $ENERSIS_AMQP_PASSWORD);
  2. $ENERSIS_AMQP_URL;
  3. the [broker] table of --config (default /etc/enersis/operator.toml when it exists).
The user defaults to `operator`, the role allowed to publish commands and
watch telemetry and results.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from enersis.common.config import BrokerSettings, ConfigError, broker_settings, load_toml, parse_amqp_url

DEFAULT_CONFIG = "/etc/enersis/operator.toml"

# Exit codes, documented in --help and the README.
EXIT_OK = 0  # succeeded or skipped
EXIT_FAILED = 1  # failed or rejected
EXIT_USAGE = 2  # bad arguments, unknown node or VM, bad configuration
EXIT_TIMEOUT = 3  # no final result in time (the command may still complete)
EXIT_BROKER = 4  # broker unreachable or refused the credentials

EXIT_CODES_HELP = """exit codes:
  0  succeeded or skipped
  1  failed or rejected
  2  usage error: bad arguments, unknown node or VM, bad configuration
  3  timeout: no final result in time (the command may still complete)
  4  broker unreachable, or it refused the credentials
"""


class UsageError(Exception):
    """Exit 2 with this message."""


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("broker")
    g.add_argument("--config", metavar="FILE",
                   help=f"TOML file with a [broker] table (default {DEFAULT_CONFIG} when it exists)")
    g.add_argument("--broker-url", metavar="URL",
                   help="amqp[s]://[user[:password]@]host:port/vhost (overrides $ENERSIS_AMQP_URL and --config)")
    g.add_argument("--user", default=None, help="broker user when the URL has none (default: operator)")
    g.add_argument("--password-file", metavar="FILE",
                   help="file whose first line is the password (else $ENERSIS_AMQP_PASSWORD)")
    g.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                   help="give up reaching the broker after S seconds (default 10)")


def operator_settings(args: argparse.Namespace, connection_name: str) -> BrokerSettings:
    try:
        return _settings(args, connection_name)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _settings(args: argparse.Namespace, connection_name: str) -> BrokerSettings:
    if args.broker_url:
        values = parse_amqp_url(args.broker_url)
        values.setdefault("vhost", "enersis")
        values["user"] = values.get("user") or args.user or "operator"
        if "password" not in values:
            values["password"] = _password(args)
        return BrokerSettings(connection_name=connection_name, **values)
    config = args.config or (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).exists() else None)
    table = load_toml(config).get("broker", {}) if config else {}
    if not config and not os.environ.get("ENERSIS_AMQP_URL"):
        raise ConfigError(
            "no broker configured: pass --broker-url, set ENERSIS_AMQP_URL, or write "
            f"{DEFAULT_CONFIG} (see deploy/config/operator.toml)"
        )
    settings = broker_settings(table, connection_name=connection_name)
    if settings.user == "guest" and "user" not in table:
        settings = settings.with_(user=args.user or "operator")
    if not settings.password and (args.password_file or os.environ.get("ENERSIS_AMQP_PASSWORD")):
        settings = settings.with_(password=_password(args))
    return settings


def _password(args: argparse.Namespace) -> str:
    if args.password_file:
        try:
            return Path(args.password_file).read_text().splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            raise ConfigError(f"--password-file {args.password_file!r} cannot be read: {exc}") from None
    if "ENERSIS_AMQP_PASSWORD" in os.environ:
        return os.environ["ENERSIS_AMQP_PASSWORD"]
    raise ConfigError("no password: put it in the URL, pass --password-file, or set ENERSIS_AMQP_PASSWORD")


def quiet_plumbing() -> None:
    """A command-line tool says what went wrong once, in its own words: no pika tracebacks or retry chatter."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("pika").setLevel(logging.CRITICAL)
        logging.getLogger("enersis.bus").setLevel(logging.ERROR)
