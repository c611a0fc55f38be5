"""Configuration shared by every service: TOML files and the broker section.

Every service's TOML has a ``[broker]`` table::

    [broker]
    url = "amqps://broker.example.org:5671/enersis"   # vhost in the path
    user = "agent"
    password_file = "/etc/enersis/agent.password"     # or password_env = "ENERSIS_AMQP_PASSWORD"
    ca_file = "/etc/enersis/ca.pem"                   # amqps only; optional client cert_file/key_file
    heartbeat_s = 30
    prefetch = 10

Passwords are never inline: a file (first line) or an environment variable.
For development, ENERSIS_AMQP_URL (with credentials) overrides the table.
"""

from __future__ import annotations

import os
import ssl
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration problem, worded for the operator who has to fix it."""


@dataclass(frozen=True)
class BrokerSettings:
    host: str = "127.0.0.1"
    port: int = 5672
    vhost: str = "enersis"
    user: str = "guest"
    password: str = field(default="", repr=False)
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    heartbeat_s: int = 30
    prefetch: int = 10
    connection_name: str = "enersis"

    @property
    def url_for_logs(self) -> str:
        scheme = "amqps" if self.tls else "amqp"
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{self.vhost}"

    def with_(self, **changes: Any) -> "BrokerSettings":
        return BrokerSettings(**{**self.__dict__, **changes})

    def pika_parameters(self) -> Any:
        import pika  # adapters import pika, the contract does not

        ssl_options = None
        if self.tls:
            context = ssl.create_default_context(cafile=self.ca_file or None)
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file or None)
            ssl_options = pika.SSLOptions(context, self.host)
        return pika.ConnectionParameters(
            host=self.host,
            port=self.port,
            virtual_host=self.vhost,
            credentials=pika.PlainCredentials(self.user, self.password),
            heartbeat=self.heartbeat_s,
            blocked_connection_timeout=60,
            connection_attempts=1,
            socket_timeout=5,
            ssl_options=ssl_options,
            client_properties={"connection_name": self.connection_name},
        )


def parse_amqp_url(url: str) -> dict[str, Any]:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("amqp", "amqps"):
        raise ConfigError(f"broker url {url!r}: scheme must be amqp or amqps")
    tls = parsed.scheme == "amqps"
    out: dict[str, Any] = {
        "host": parsed.hostname or "127.0.0.1",
        "port": parsed.port or (5671 if tls else 5672),
        "tls": tls,
    }
    vhost = urllib.parse.unquote(parsed.path[1:]) if parsed.path and parsed.path != "/" else ""
    if vhost:
        out["vhost"] = vhost
    if parsed.username:
        out["user"] = urllib.parse.unquote(parsed.username)
    if parsed.password:
        out["password"] = urllib.parse.unquote(parsed.password)
    return out


def broker_settings(table: dict[str, Any] | None, *, connection_name: str = "enersis") -> BrokerSettings:
    """BrokerSettings from a [broker] table, ENERSIS_AMQP_URL overriding it."""
    table = dict(table or {})
    values: dict[str, Any] = {"connection_name": connection_name}
    env_url = os.environ.get("ENERSIS_AMQP_URL")
    url = env_url or table.get("url")
    if url:
        values.update(parse_amqp_url(url))
    if not env_url:
        if "password" in table:
            raise ConfigError("[broker] password must not be inline: use password_file or password_env")
        for key in ("user", "ca_file", "cert_file", "key_file"):
            if key in table:
                values[key] = str(table[key])
        if "password_file" in table:
            path = Path(table["password_file"])
            try:
                values["password"] = path.read_text().splitlines()[0].strip()
            except (OSError, IndexError) as exc:
                raise ConfigError(f"[broker] password_file {str(path)!r} cannot be read: {exc}") from None
        elif "password_env" in table:
            name = table["password_env"]
            if name not in os.environ:
                raise ConfigError(f"[broker] password_env: environment variable {name} is not set")
            values["password"] = os.environ[name]
    for key in ("heartbeat_s", "prefetch"):
        if key in table:
            if not isinstance(table[key], int) or table[key] < 0:
                raise ConfigError(f"[broker] {key} must be a non-negative integer")
            values[key] = table[key]
    return BrokerSettings(**values)


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(p)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from None


def require(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in table:
        raise ConfigError(f"{where}: missing required key {key!r}")
    value = table[key]
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value
