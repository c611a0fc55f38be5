"""The message contract: every kind that crosses the broker, defined once.

Each message is a frozen dataclass with a KIND and a VERSION ("MAJOR.MINOR").
A consumer accepts any minor version of a major it knows: a newer minor may
only add optional fields, which older consumers ignore.  Changing, removing
or retyping a field needs a major bump; tests/test_contract.py pins every
kind's field fingerprint so an unversioned change fails.

Conventions that keep telemetry small and the JSON form readable:
- points in time are integer epoch milliseconds (fields ending in ``_ms``);
- durations and percentages are floats;
- nested records (a domain inside telemetry) travel as positional lists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

RESULT_STATUSES = ("accepted", "succeeded", "failed", "skipped", "rejected")
FINAL_STATUSES = frozenset({"succeeded", "failed", "skipped", "rejected"})
ResultStatus = Literal["accepted", "succeeded", "failed", "skipped", "rejected"]

# libvirt's virDomainState numbers, kept as ints on the wire.
DOMAIN_STATES = {
    0: "nostate",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutdown",
    5: "shutoff",
    6: "crashed",
    7: "pmsuspended",
}
RUNNING_STATES = frozenset({1, 2})  # blocked = running but idle right now


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_NAME_FIELDS = ("node", "source", "target", "vm")


class ContractError(ValueError):
    """A message whose fields have the right types but impossible values."""


class Message:
    """Base of every wire message."""

    KIND: ClassVar[str]
    VERSION: ClassVar[str]
    CATEGORY: ClassVar[str]  # "telemetry" | "lifecycle" | "command" | "operator" | "result" | "advice"

    def validate(self) -> None:
        """Raise ContractError when a value is impossible (called on decode and before publish)."""
        cid = getattr(self, "command_id", None)
        if cid is not None and not (0 < len(cid) <= 128 and cid.isprintable()):
            raise ContractError(f"{self.KIND}: command_id must be 1-128 printable characters")
        for name in _NAME_FIELDS:
            value = getattr(self, name, None)
            # Results may leave node/vm empty when a command was about neither.
            if value is None or (value == "" and self.CATEGORY == "result"):
                continue
            if not NAME_RE.match(value):
                raise ContractError(
                    f"{self.KIND}: {name} {value!r} is not a valid name (letters, digits, '.', '_', '-'; at most 64)"
                )
        self._check()

    def _check(self) -> None:
        pass


class Record:
    """Base of nested records (travel as positional lists)."""


# ---------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class DomainSample(Record):
    """One domain as its node's agent saw it."""

    name: str
    uuid: str
    state: int  # libvirt virDomainState, see DOMAIN_STATES
    vcpus: int
    mem_max_kib: int
    mem_kib: int
    cpu_node_pct: float  # share of the whole node's CPU capacity
    cpu_vcpu_pct: float  # share of its own vCPUs (100 = every vCPU busy)

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES


# ---------------------------------------------------------------- telemetry and lifecycle


@dataclass(frozen=True, slots=True)
class NodeTelemetry(Message):
    KIND: ClassVar[str] = "NodeTelemetry"
    VERSION: ClassVar[str] = "1.0"
    CATEGORY: ClassVar[str] = "telemetry"

    node: str
    seq: int
    boot_id: str
    hypervisor_ok: bool
    hypervisor_type: str
    cpus: int
    mhz: int
    mem_total_kib: int
    mem_free_kib: int
    cpu_pct: float  # mean over the window
    cpu_pct_latest: float  # latest sample
    window_s: float
    sample_interval_s: float
    publish_interval_s: float
    domains: list[DomainSample]
    agent_version: str = ""
    error: str = ""  # why the hypervisor is unreachable, when it is


@dataclass(frozen=True, slots=True)
class NodeOnline(Message):
    """A node's agent is up and its hypervisor answers: the node can take work."""

    KIND: ClassVar[str] = "NodeOnline"
    VERSION: ClassVar[str] = "1.0"
    CATEGORY: ClassVar[str] = "lifecycle"

    node: str
    boot_id: str
    hypervisor_ok: bool
    hypervisor_type: str
    domain_count: int
    agent_version: str = ""
    publish_interval_s: float = 5.0


@dataclass(frozen=True, slots=True)
class NodeOffline(Message):
    """A node's agent stops cleanly (SIGTERM, shutdown)."""

    KIND: ClassVar[str] = "NodeOffline"
    VERSION: ClassVar[str] = "1.0"
    CATEGORY: ClassVar[str] = "lifecycle"

    node: str
    boot_id: str
    reason: str = ""


# ---------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class MigrateVm(Message):
    """Live-migrate `vm` from `source` to `target`; executed by the source's executor."""

    KIND: ClassVar[str] = "MigrateVm"
    VERSION: ClassVar[str] = "1.0"
    CATEGORY: ClassVar[str] = "command"

    command_id: str
    vm: str
    source: str
    target: str
    reason: str = ""
    timeout_s: float = 300.0
    bandwidth_mib_s: int = 0  # 0 = no cap
    auto_converge: bool = False
    issued_by: str = "operator"

    def _check(self) -> None:
        if self.source == self.target:
            raise ContractError(f"MigrateVm: source and target are both {self.source!r}")
        if not 0 < self.timeout_s <= 86400:
            raise ContractError("MigrateVm: timeout_s must be in (0, 86400]")
        if self.bandwidth_mib_s < 0:
            raise ContractError("MigrateVm: bandwidth_mib_s must be >= 0 (0 = no cap)")


@dataclass(frozen=True, slots=True)
class WakeNode(Message):
    KIND: ClassVar[str] = "WakeNode"
    VERSION: ClassVar[str] = "1.0"
    CATEGORY: ClassVar[str] = "command"

    command_id: str
    node: str
    reason: str = ""
    issued_by: str = "operator"


@dataclass(frozen=True, slots=True)
class ShutdownNode(Message):
    KIND: ClassVar[str] = "ShutdownNode"
    VERSION: ClassVar[str] = "1.0"
    CATEGORY: ClassVar[str] = "command"

    command_id: str
    node: str
    force: bool = False  # only an operator may skip the "no running domain" check
    reason: str = ""
    issued_by: str = "operator"


# ---------------------------------------------------------------- operator commands (to the arbiter)


@dataclass(frozen=True, slots=True)
class PauseAutomation(Message):
    KIND: ClassVar[str] = "PauseAutomation"
    VERSION: ClassVar[str] = "1.0"
    CATEGORY: ClassVar[str] = "operator"

    command_id: str
    reason: str = ""
    issued_by: str = "operator"


@dataclass(frozen=True, slots=True)
class ResumeAutomation(Message):
    KIND: ClassVar[str] = "ResumeAutomation"
    VERSION: ClassVar[str] = "1.0"
    CATEGORY: ClassVar[str] = "operator"

    command_id: str
    reason: str = ""
    issued_by: str = "operator"


@dataclass(frozen=True, slots=True)
class SetMode(Message):
    """Switch the arbiter between executing its plans and only recommending them."""

    KIND: ClassVar[str] = "SetMode"
    VERSION: ClassVar[str] = "1.0"
    CATEGORY: ClassVar[str] = "operator"

    command_id: str
    mode: str  # "auto" | "advisory"
    issued_by: str = "operator"

    def _check(self) -> None:
        if self.mode not in ("auto", "advisory"):
            raise ContractError(f"SetMode: mode must be 'auto' or 'advisory', got {self.mode!r}")


@dataclass(frozen=True, slots=True)
class DrainNode(Message):
    """Evacuate a node for maintenance and keep it off the target list."""

    KIND: ClassVar[str] = "DrainNode"
    VERSION: ClassVar[str] = "1.0"
    CATEGORY: ClassVar[str] = "operator"

    command_id: str
    node: str
    power_off: bool = False
    reason: str = ""
    issued_by: str = "operator"


@dataclass(frozen=True, slots=True)
class UndrainNode(Message):
    KIND: ClassVar[str] = "UndrainNode"
    VERSION: ClassVar[str] = "1.0"
    CATEGORY: ClassVar[str] = "operator"

    command_id: str
    node: str
    issued_by: str = "operator"


@dataclass(frozen=True, slots=True)
class PinVm(Message):
    """Keep a VM where it is (pinned=true) or let the arbiter move it again."""

    KIND: ClassVar[str] = "PinVm"
    VERSION: ClassVar[str] = "1.0"
    CATEGORY: ClassVar[str] = "operator"

    command_id: str
    vm: str
    pinned: bool = True
    issued_by: str = "operator"


@dataclass(frozen=True, slots=True)
class SetThresholds(Message):
    KIND: ClassVar[str] = "SetThresholds"
    VERSION: ClassVar[str] = "1.0"
    CATEGORY: ClassVar[str] = "operator"

    command_id: str
    upper_pct: float
    lower_pct: float
    issued_by: str = "operator"

    def _check(self) -> None:
        if not (0 <= self.lower_pct < self.upper_pct <= 100):
            raise ContractError("SetThresholds: need 0 <= lower_pct < upper_pct <= 100")


@dataclass(frozen=True, slots=True)
class ApproveRecommendation(Message):
    """In advisory mode: execute a recommendation the arbiter published."""

    KIND: ClassVar[str] = "ApproveRecommendation"
    VERSION: ClassVar[str] = "1.0"
    CATEGORY: ClassVar[str] = "operator"

    command_id: str
    recommendation_id: str
    issued_by: str = "operator"


# ---------------------------------------------------------------- results and advice


@dataclass(frozen=True, slots=True)
class CommandResult(Message):
    """What happened to a command. `accepted` is the only non-final status."""

    KIND: ClassVar[str] = "CommandResult"
    VERSION: ClassVar[str] = "1.0"
    CATEGORY: ClassVar[str] = "result"

    command_id: str
    command_kind: str
    status: str  # one of RESULT_STATUSES
    reason: str = ""
    node: str = ""  # the node the command was about
    vm: str = ""
    retryable: bool = False
    details: dict[str, Any] = field(default_factory=dict)  # scalars only: duration_s, downtime_ms, boot_s, ...

    def _check(self) -> None:
        if self.status not in RESULT_STATUSES:
            raise ContractError(f"CommandResult: status must be one of {', '.join(RESULT_STATUSES)}")

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES


@dataclass(frozen=True, slots=True)
class Recommendation(Message):
    """A command the arbiter would issue, published instead of executed in advisory mode."""

    KIND: ClassVar[str] = "Recommendation"
    VERSION: ClassVar[str] = "1.0"
    CATEGORY: ClassVar[str] = "advice"

    recommendation_id: str
    command_kind: str
    summary: str
    command: dict[str, Any] = field(default_factory=dict)  # the command's body, ready to approve


ALL_MESSAGES: tuple[type[Message], ...] = (
    NodeTelemetry,
    NodeOnline,
    NodeOffline,
    MigrateVm,
    WakeNode,
    ShutdownNode,
    PauseAutomation,
    ResumeAutomation,
    SetMode,
    DrainNode,
    UndrainNode,
    PinVm,
    SetThresholds,
    ApproveRecommendation,
    CommandResult,
    Recommendation,
)
MESSAGES_BY_KIND: dict[str, type[Message]] = {m.KIND: m for m in ALL_MESSAGES}
COMMAND_KINDS = frozenset(m.KIND for m in ALL_MESSAGES if m.CATEGORY in ("command", "operator"))


def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_repr(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return "|".join(sorted(_type_repr(a) for a in typing.get_args(tp)))
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{','.join(_type_repr(a) for a in typing.get_args(tp))}]"
    if isinstance(tp, type) and issubclass(tp, Record):
        inner = ",".join(f"{f.name}:{_type_repr(type_hints(tp)[f.name])}" for f in dataclasses.fields(tp))
        return f"{tp.__name__}({inner})"
    return getattr(tp, "__name__", str(tp))


def fingerprint(cls: type[Message]) -> str:
    """A short hash of a kind's version, field names, order, types and defaults."""
    hints = type_hints(cls)
    parts = [f"{cls.KIND}@{cls.VERSION}"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "<required>"
        parts.append(f"{f.name}:{_type_repr(hints[f.name])}={default}")
    return hashlib.sha256(";".join(parts).encode()).hexdigest()[:16]
