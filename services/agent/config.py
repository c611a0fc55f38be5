"""The agent's node.toml, checked with errors an operator can act on.

    node = "node-1"
    [broker]                      # see enersis.common.config
    [hypervisor]
    uri = "qemu:///system"        # any libvirt URI, or "sim:///abs/path/to/cluster-dir"
    [telemetry]
    sample_interval_s = 1.0
    publish_interval_s = 5.0
    window_s = 10.0               # the mean published as cpu_pct (the seed's CPU window)
    [executor] / [peers.<node>]   # the migration executor's tables (migration.py / executor.py)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from enersis.common.config import BrokerSettings, ConfigError, broker_settings, load_toml
from enersis.common.messages import NAME_RE

log = logging.getLogger("enersis.agent.config")

KNOWN_TABLES = ("node", "broker", "hypervisor", "telemetry", "executor", "peers", "logging")
TELEMETRY_KEYS = {"sample_interval_s": 1.0, "publish_interval_s": 5.0, "window_s": 10.0}
HYPERVISOR_KEYS = ("uri",)


@dataclass(frozen=True)
class TelemetrySettings:
    sample_interval_s: float = 1.0
    publish_interval_s: float = 5.0
    window_s: float = 10.0


@dataclass(frozen=True)
class AgentConfig:
    node: str
    broker: BrokerSettings
    hypervisor_uri: str
    telemetry: TelemetrySettings
    source: str = ""  # the file it came from, for messages
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # whole file: other tables are read by their owners


def load_agent_config(path: str | os.PathLike[str]) -> AgentConfig:
    return parse_agent_config(load_toml(path), source=str(path))


def parse_agent_config(data: dict[str, Any], *, source: str = "node.toml") -> AgentConfig:
    unknown = sorted(set(data) - set(KNOWN_TABLES))
    if unknown:
        # Other parts of the agent may add tables; a typo should still be visible.
        log.warning("%s: ignoring unknown key(s) %s (known: %s)", source, ", ".join(unknown), ", ".join(KNOWN_TABLES))

    node = data.get("node")
    if not isinstance(node, str) or not node:
        raise ConfigError(f"{source}: missing `node = \"<name>\"` at the top (this node's name, e.g. \"node-1\")")
    if not NAME_RE.match(node):
        raise ConfigError(f"{source}: node {node!r} is not a valid name (letters, digits, '.', '_', '-'; at most 64)")

    hv = _table(data, "hypervisor", source)
    _no_unknown(hv, HYPERVISOR_KEYS, f"{source} [hypervisor]")
    uri = hv.get("uri")
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError(f"{source}: [hypervisor] uri is required, e.g. \"qemu:///system\", \"xen:///system\" "
                          f"or \"sim:///abs/path/to/cluster-dir\"")
    uri = uri.strip()
    if uri.startswith("sim://") and not uri.startswith("sim:///"):
        raise ConfigError(f"{source}: [hypervisor] uri {uri!r}: a simulated cluster needs an absolute path, sim:///abs/path")
    if "://" not in uri:
        raise ConfigError(f"{source}: [hypervisor] uri {uri!r} is not a URI (e.g. qemu:///system)")

    tel = _table(data, "telemetry", source)
    _no_unknown(tel, tuple(TELEMETRY_KEYS), f"{source} [telemetry]")
    values: dict[str, float] = {}
    for key, default in TELEMETRY_KEYS.items():
        value = tel.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{source}: [telemetry] {key} must be a positive number of seconds, got {value!r}")
        values[key] = float(value)
    t = TelemetrySettings(**values)
    if t.sample_interval_s < 0.05:
        raise ConfigError(f"{source}: [telemetry] sample_interval_s must be at least 0.05 s")
    if t.publish_interval_s < t.sample_interval_s:
        raise ConfigError(f"{source}: [telemetry] publish_interval_s ({t.publish_interval_s:g}) must be >= "
                          f"sample_interval_s ({t.sample_interval_s:g})")
    if t.window_s < t.sample_interval_s:
        raise ConfigError(f"{source}: [telemetry] window_s ({t.window_s:g}) must be >= sample_interval_s "
                          f"({t.sample_interval_s:g}): a mean needs at least one sample")

    try:
        broker = broker_settings(_table(data, "broker", source), connection_name=f"agent-{node}")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return AgentConfig(node, broker, uri, t, source, data)


def _table(data: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: `{name}` must be a table ([{name}])")
    return value


def _no_unknown(table: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(known)})")
