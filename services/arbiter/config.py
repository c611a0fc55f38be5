"""arbiter.toml: what the arbiter reads at start.

::

    [broker]                      # common/config.py; user "arbiter"
    url = "amqp://127.0.0.1:5672/enersis"
    user = "arbiter"
    password_file = "/etc/enersis/arbiter.password"

    [arbiter]
    policy = "enersis-2012"       # or "enersis-hysteresis"
    upper_pct = 80                # SetThresholds changes them at run time
    lower_pct = 10
    cycle_s = 10                  # the safety-net cycle; overloads are acted on as telemetry arrives
    mode = "auto"                 # "advisory": publish Recommendations, execute only approved ones
    paused = false
    frontend = ""                 # name of the node that hosts the control plane (never a target, never shut down)
    stale_after_intervals = 3     # a node silent this many publish intervals is stale
    warmup_s = 10                 # after start, rebuild state from telemetry before deciding
    unknown_grace_s = 15          # a configured node that never reports is assumed off after this
    state_file = "/var/lib/enersis/arbiter/state.json"   # "" = keep nothing across restarts
    state_fsync = true            # false: faster commands; a host crash (not a process crash) may lose the last changes
    managed_vms = []              # empty: every VM may be moved; else only these (the seed's [MV])

    [commands]
    migrate_timeout_s = 300
    migrate_deadline_slack_s = 120
    wake_timeout_s = 300
    shutdown_timeout_s = 180
    max_retries = 3               # consecutive failed migrations of one VM before it is held
    retry_hold_s = 600
    retry_backoff_s = 10          # wait before retrying a VM whose migration failed; doubles each time
    max_in_flight_migrations = 32
    manual_hold_s = 600           # a VM or node an operator moved or powered by hand is left alone this long
    quarantine_s = 3600           # a node that failed to wake is not woken again for this long
    drain_timeout_s = 3600
    recommendation_ttl_s = 600
    bandwidth_mib_s = 0
    auto_converge = false

    [policy]                      # enersis-hysteresis tuning (see policy.Params)
    sustain_cycles = 3
    reserve_nodes = 1
    consolidate_pct = 50          # also empty nodes below this when busier nodes can take all their VMs
    mem_headroom_pct = 10         # default here 10 (host OS + QEMU overhead); the pure policy's default is 0

    [nodes."node-1"]              # optional: nodes known before they first report
    address = "192.168.1.2"       # informational (power.toml is where wake/shutdown details live)
    mac = "D4:85:64:38:BE:CC"
    cpu_window_s = 10
    frontend = false
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from enersis.common.config import BrokerSettings, ConfigError, broker_settings, load_toml
from enersis.common.messages import NAME_RE

from .planner import PlannerSettings
from .policy import Params

LIVE_MEM_HEADROOM_PCT = 10.0


@dataclass(frozen=True)
class CommandSettings:
    migrate_timeout_s: float = 300.0
    migrate_deadline_slack_s: float = 120.0
    wake_timeout_s: float = 300.0
    shutdown_timeout_s: float = 180.0
    max_retries: int = 3
    retry_hold_s: float = 600.0
    retry_backoff_s: float = 10.0
    max_in_flight_migrations: int = 32
    manual_hold_s: float = 600.0
    quarantine_s: float = 3600.0
    drain_timeout_s: float = 3600.0
    recommendation_ttl_s: float = 600.0
    bandwidth_mib_s: int = 0
    auto_converge: bool = False

    def planner(self) -> PlannerSettings:
        return PlannerSettings(
            migrate_timeout_s=self.migrate_timeout_s,
            migrate_deadline_slack_s=self.migrate_deadline_slack_s,
            wake_timeout_s=self.wake_timeout_s,
            shutdown_timeout_s=self.shutdown_timeout_s,
            max_in_flight_migrations=self.max_in_flight_migrations,
            bandwidth_mib_s=self.bandwidth_mib_s,
            auto_converge=self.auto_converge,
        )


@dataclass(frozen=True)
class NodeConfig:
    name: str
    address: str = ""
    mac: str = ""
    cpu_window_s: float = 0.0
    frontend: bool = False


@dataclass(frozen=True)
class ArbiterConfig:
    params: Params = field(default_factory=Params)
    mode: str = "auto"
    paused: bool = False
    frontend: str = ""
    stale_after_intervals: float = 3.0
    warmup_s: float = 10.0
    unknown_grace_s: float = 15.0
    state_file: str = ""
    state_fsync: bool = True
    managed_vms: tuple[str, ...] = ()
    commands: CommandSettings = field(default_factory=CommandSettings)
    nodes: tuple[NodeConfig, ...] = ()
    broker: BrokerSettings | None = None


_ARBITER_KEYS = {
    "policy": str, "upper_pct": (int, float), "lower_pct": (int, float), "cycle_s": (int, float),
    "mode": str, "paused": bool, "frontend": str, "stale_after_intervals": (int, float),
    "warmup_s": (int, float), "unknown_grace_s": (int, float), "state_file": str, "managed_vms": list,
    "state_fsync": bool,
}
_NODE_KEYS = {"address": str, "mac": str, "cpu_window_s": (int, float), "frontend": bool}


def _typed(table: dict[str, Any], key: str, kind: Any, where: str) -> Any:
    value = table[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(f"{where}: {key} must be {' or '.join(k.__name__ for k in kinds)}, not a boolean")
    if not isinstance(value, kinds):
        raise ConfigError(f"{where}: {key} must be {' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__} {value!r}")
    return value


def _unknown(table: dict[str, Any], known: Any, where: str) -> None:
    extra = sorted(set(table) - set(known))
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)}; known: {', '.join(sorted(known))}")


def parse(data: dict[str, Any], *, with_broker: bool = True) -> ArbiterConfig:
    _unknown(data, {"broker", "arbiter", "commands", "policy", "nodes"}, "arbiter.toml")
    arb = dict(data.get("arbiter", {}))
    _unknown(arb, _ARBITER_KEYS, "[arbiter]")
    for k, kind in _ARBITER_KEYS.items():
        if k in arb:
            _typed(arb, k, kind, "[arbiter]")

    pol = dict(data.get("policy", {}))
    param_fields = {f.name: f.type for f in dataclasses.fields(Params)}
    allowed_policy = set(param_fields) - {"policy", "upper_pct", "lower_pct", "cycle_s"}
    _unknown(pol, allowed_policy, "[policy]")
    values: dict[str, Any] = {}
    for k in ("policy", "upper_pct", "lower_pct", "cycle_s"):
        if k in arb:
            values[k] = arb[k]
    # A live node's reported memory also feeds its own OS and QEMU's overhead: keep a margin unless told
    # otherwise (the pure Params default of 0 is the simulator's model, where RAM is all for VMs).
    values["mem_headroom_pct"] = LIVE_MEM_HEADROOM_PCT
    for k, v in pol.items():
        default = getattr(Params(), k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(default, int) and not isinstance(v, int)):
            raise ConfigError(f"[policy]: {k} must be {'an integer' if isinstance(default, int) else 'a number'}, got {v!r}")
        values[k] = v
    params = Params(**values)
    try:
        params.validate()
    except ValueError as exc:
        raise ConfigError(f"[arbiter]/[policy]: {exc}") from None

    mode = arb.get("mode", "auto")
    if mode not in ("auto", "advisory"):
        raise ConfigError(f"[arbiter]: mode must be \"auto\" or \"advisory\", got {mode!r}")
    managed = arb.get("managed_vms", [])
    for vm in managed:
        if not isinstance(vm, str) or not NAME_RE.match(vm):
            raise ConfigError(f"[arbiter]: managed_vms entry {vm!r} is not a valid VM name")
    if arb.get("stale_after_intervals", 3.0) < 1:
        raise ConfigError("[arbiter]: stale_after_intervals must be >= 1")

    cmd_table = dict(data.get("commands", {}))
    cmd_fields = {f.name: f for f in dataclasses.fields(CommandSettings)}
    _unknown(cmd_table, cmd_fields, "[commands]")
    cmd_values: dict[str, Any] = {}
    for k, v in cmd_table.items():
        default = getattr(CommandSettings(), k)
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise ConfigError(f"[commands]: {k} must be true or false")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(default, int) and not isinstance(v, int)):
            raise ConfigError(f"[commands]: {k} must be {'an integer' if isinstance(default, int) else 'a number'}, got {v!r}")
        elif v < 0 or (k.endswith("_timeout_s") and v <= 0):
            raise ConfigError(f"[commands]: {k} must be {'> 0' if k.endswith('_timeout_s') else '>= 0'}, got {v!r}")
        cmd_values[k] = v
    commands = CommandSettings(**cmd_values)

    nodes = []
    frontend = arb.get("frontend", "")
    for name, table in sorted(data.get("nodes", {}).items()):
        where = f"[nodes.{name}]"
        if not NAME_RE.match(name):
            raise ConfigError(f"{where}: {name!r} is not a valid node name")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a table")
        _unknown(table, _NODE_KEYS, where)
        for k, kind in _NODE_KEYS.items():
            if k in table:
                _typed(table, k, kind, where)
        nodes.append(NodeConfig(name=name, **table))
        if table.get("frontend"):
            if frontend and frontend != name:
                raise ConfigError(f"{where}: frontend = true, but [arbiter] frontend is {frontend!r}")
            frontend = name
    if frontend and not NAME_RE.match(frontend):
        raise ConfigError(f"[arbiter]: frontend {frontend!r} is not a valid node name")

    broker = broker_settings(data.get("broker"), connection_name="enersis-arbiter") if with_broker else None
    return ArbiterConfig(
        params=params,
        mode=mode,
        paused=arb.get("paused", False),
        frontend=frontend,
        stale_after_intervals=float(arb.get("stale_after_intervals", 3.0)),
        warmup_s=float(arb.get("warmup_s", 10.0)),
        unknown_grace_s=float(arb.get("unknown_grace_s", 15.0)),
        state_file=arb.get("state_file", ""),
        state_fsync=arb.get("state_fsync", True),
        managed_vms=tuple(managed),
        commands=commands,
        nodes=tuple(nodes),
        broker=broker,
    )


def load(path: str) -> ArbiterConfig:
    data = load_toml(path)
    try:
        return parse(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
