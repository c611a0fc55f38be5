"""The power inventory (`power.toml`): how to wake and how to shut down each node.

    [broker]                      # see enersis.common.config (user "power")
    url = "amqp://127.0.0.1:5672/enersis"
    user = "power"
    password_file = "/etc/enersis/power.password"

    [power]
    wake_timeout_s = 300          # magic packet -> NodeOnline
    shutdown_timeout_s = 120      # SSH command -> NodeOffline (or silence and SSH port closed)
    stale_after_s = 30            # telemetry older than this proves nothing
    wol_repeats = 3               # magic packets per wake ...
    wol_gap_s = 0.2               # ... this far apart
    ssh_connect_timeout_s = 10
    ssh_command_timeout_s = 30
    max_parallel = 16             # commands handled at once by this instance

    [nodes.node-1]
    mac = "52:54:00:12:34:01"
    address = "10.0.0.11"         # management address (SSH)
    wol_broadcast = "10.0.0.255"  # where the magic packet goes (no default: never the all-ones limited broadcast by accident)
    wol_port = 9
    wol_source = "10.0.0.1"       # local IP to send from (picks the interface); optional
    ssh_user = "root"
    ssh_port = 22
    ssh_key = "/etc/enersis/power_ed25519"
    known_hosts = "/etc/enersis/known_hosts"   # the node's host key must be here: unknown keys are refused
    shutdown_command = "shutdown -h now"
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enersis.common.config import BrokerSettings, ConfigError, broker_settings, load_toml
from enersis.common.messages import NAME_RE

MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}([:-]?)[0-9A-Fa-f]{2}(\1[0-9A-Fa-f]{2}){4}$")
MAX_WAIT_S = 1500.0
HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")


@dataclass(frozen=True)
class NodePower:
    """One node's power controls."""

    name: str
    mac: str  # normalised aa:bb:cc:dd:ee:ff
    address: str
    wol_broadcast: str
    ssh_key: str
    known_hosts: str
    wol_port: int = 9
    wol_source: str | None = None
    ssh_user: str = "root"
    ssh_port: int = 22
    shutdown_command: str = "shutdown -h now"

    @property
    def ssh_target(self) -> str:
        return f"{self.ssh_user}@{self.address}:{self.ssh_port}"


@dataclass(frozen=True)
class PowerSettings:
    wake_timeout_s: float = 300.0
    shutdown_timeout_s: float = 120.0
    stale_after_s: float = 30.0
    wol_repeats: int = 3
    wol_gap_s: float = 0.2
    ssh_connect_timeout_s: float = 10.0
    ssh_command_timeout_s: float = 30.0
    max_parallel: int = 16


@dataclass(frozen=True)
class PowerConfig:
    settings: PowerSettings
    nodes: dict[str, NodePower]
    broker: BrokerSettings | None = None


_FLOATS = ("wake_timeout_s", "shutdown_timeout_s", "stale_after_s", "wol_gap_s",
           "ssh_connect_timeout_s", "ssh_command_timeout_s")
_INTS = ("wol_repeats", "max_parallel")


def normalise_mac(text: str, where: str) -> str:
    if not isinstance(text, str) or not MAC_RE.match(text):
        raise ConfigError(f"{where}: mac {text!r} is not a MAC address like 52:54:00:12:34:56")
    hexdigits = re.sub(r"[:-]", "", text).lower()
    return ":".join(hexdigits[i:i + 2] for i in range(0, 12, 2))


def _host(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key!r} must be an IP address or host name")
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not HOST_RE.match(value):
        raise ConfigError(f"{where}: {key} {value!r} is not an IP address or host name")
    return value


def _port(value: Any, key: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise ConfigError(f"{where}: {key!r} must be a port number (1-65535)")
    return value


def _readable_file(value: Any, key: str, where: str, check_files: bool) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key!r} must be a file path")
    if check_files:
        p = Path(value)
        if not p.is_file():
            raise ConfigError(f"{where}: {key} {value!r} does not exist or is not a file")
        try:
            p.open("rb").close()
        except OSError as exc:
            raise ConfigError(f"{where}: {key} {value!r} cannot be read: {exc}") from None
    return value


def parse_settings(table: dict[str, Any]) -> PowerSettings:
    unknown = set(table) - set(_FLOATS) - set(_INTS)
    if unknown:
        raise ConfigError(f"[power]: unknown key(s) {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for key in _FLOATS:
        if key in table:
            v = table[key]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or (v == 0 and key != "wol_gap_s"):
                raise ConfigError(f"[power]: {key!r} must be a positive number of seconds")
            values[key] = float(v)
    for key in ("wake_timeout_s", "shutdown_timeout_s"):
        # A command stays unacked while we wait for the node; RabbitMQ closes a channel that holds a
        # delivery longer than its consumer_timeout (30 min by default).
        if values.get(key, 0) > MAX_WAIT_S:
            raise ConfigError(f"[power]: {key!r} must be at most {MAX_WAIT_S:.0f}s (the broker's consumer_timeout "
                              "is 30 min and the command stays unacknowledged while the service waits)")
    for key in _INTS:
        if key in table:
            v = table[key]
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1000:
                raise ConfigError(f"[power]: {key!r} must be an integer from 1 to 1000")
            values[key] = v
    return PowerSettings(**values)


_NODE_KEYS = {"mac", "address", "wol_broadcast", "wol_port", "wol_source", "ssh_user", "ssh_port",
              "ssh_key", "known_hosts", "shutdown_command"}


def parse_node(name: str, table: Any, *, check_files: bool = True) -> NodePower:
    where = f"[nodes.{name}]"
    if not NAME_RE.match(name):
        raise ConfigError(f"{where}: node name must be letters, digits, '.', '_', '-' (at most 64)")
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(table) - _NODE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("mac", "address", "wol_broadcast", "ssh_key", "known_hosts"):
        if key not in table:
            raise ConfigError(f"{where}: missing required key {key!r}")
    source = table.get("wol_source")
    user = table.get("ssh_user", "root")
    if not isinstance(user, str) or not re.fullmatch(r"[a-z_][a-z0-9_.-]{0,31}", user):
        raise ConfigError(f"{where}: ssh_user {user!r} is not a valid user name")
    command = table.get("shutdown_command", "shutdown -h now")
    if not isinstance(command, str) or not command.strip():
        raise ConfigError(f"{where}: shutdown_command must be a non-empty string")
    return NodePower(
        name=name,
        mac=normalise_mac(table["mac"], where),
        address=_host(table["address"], "address", where),
        wol_broadcast=_host(table["wol_broadcast"], "wol_broadcast", where),
        wol_port=_port(table.get("wol_port", 9), "wol_port", where),
        wol_source=_host(source, "wol_source", where) if source is not None else None,
        ssh_user=user,
        ssh_port=_port(table.get("ssh_port", 22), "ssh_port", where),
        ssh_key=_readable_file(table["ssh_key"], "ssh_key", where, check_files),
        known_hosts=_readable_file(table["known_hosts"], "known_hosts", where, check_files),
        shutdown_command=command,
    )


def parse_config(data: dict[str, Any], *, check_files: bool = True, with_broker: bool = True) -> PowerConfig:
    unknown = set(data) - {"broker", "power", "nodes"}
    if unknown:
        raise ConfigError(f"power config: unknown table(s) {', '.join(sorted(unknown))} (expected broker, power, nodes)")
    power = data.get("power", {})
    if not isinstance(power, dict):
        raise ConfigError("[power] must be a table")
    nodes_table = data.get("nodes")
    if not isinstance(nodes_table, dict) or not nodes_table:
        raise ConfigError("power config: no [nodes.<name>] table: the service would have nothing to control")
    nodes = {name: parse_node(name, t, check_files=check_files) for name, t in nodes_table.items()}
    macs: dict[str, str] = {}
    for n in nodes.values():
        if n.mac in macs:
            raise ConfigError(f"[nodes.{n.name}]: mac {n.mac} is also the mac of {macs[n.mac]}")
        macs[n.mac] = n.name
    broker = None
    if with_broker:
        broker = broker_settings(data.get("broker"), connection_name="enersis-power")
        if "user" not in (data.get("broker") or {}) and broker.user == BrokerSettings().user:
            broker = broker.with_(user="power")
    return PowerConfig(settings=parse_settings(power), nodes=nodes, broker=broker)


def load_config(path: str) -> PowerConfig:
    return parse_config(load_toml(path))
