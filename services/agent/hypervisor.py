"""The node side's small interfaces to a hypervisor.

Two implementations stand behind them and are kept apart:
- the real one, over libvirt-python (any URI: qemu:///system, xen:///system,
  qemu+unix:///system?socket=…, test:///…);
- a simulated one whose domains follow PlanetLab traces, for the demo and
  tests that run a whole cluster on one machine.

Telemetry reads through `Hypervisor`; the migration executor acts through
`Migrator`.  Services wire the concrete classes in one place (their entry
point); nothing here builds its own client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class HypervisorUnavailable(RuntimeError):
    """The hypervisor connection is down; callers report it and retry later."""


@dataclass(frozen=True, slots=True)
class NodeFacts:
    hypervisor_type: str  # "QEMU", "Xen", "Test", "Simulated"
    cpus: int
    mhz: int
    mem_total_kib: int
    mem_free_kib: int


@dataclass(frozen=True, slots=True)
class DomainReading:
    """One domain at one instant: cpu_time_ns is cumulative, compare two readings."""

    name: str
    uuid: str
    state: int  # libvirt virDomainState
    vcpus: int
    mem_max_kib: int
    mem_kib: int
    cpu_time_ns: int
    # The host's own domain (Xen's Domain-0): its CPU counts in the node's load,
    # as in the seed, but it is not a VM and never appears in the inventory.
    host: bool = False


class Hypervisor(Protocol):
    def facts(self) -> NodeFacts: ...

    def read_domains(self) -> list[DomainReading]:
        """Active domains now.  Raises HypervisorUnavailable when the connection is lost."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class MigrationTarget:
    """How to reach a target node, from the executor's node inventory."""

    node: str
    uri: str  # libvirt URI of the target's daemon
    migration_uri: str = ""  # e.g. tcp://10.0.0.12 (VIR_MIGRATE_PARAM_URI)
    listen_address: str = ""  # VIR_MIGRATE_PARAM_LISTEN_ADDRESS on the target


@dataclass(frozen=True, slots=True)
class MigrationOutcome:
    ok: bool
    duration_s: float
    downtime_ms: float | None = None
    error: str = ""
    retryable: bool = False


class Migrator(Protocol):
    def has_domain(self, vm: str) -> bool:
        """Is `vm` defined and active on this node?"""
        ...

    def target_has_domain(self, vm: str, target: MigrationTarget) -> bool: ...

    def job_active(self, vm: str) -> bool:
        """Is a migration job of `vm` still running here (after an executor crash)?"""
        ...

    def migrate(
        self,
        vm: str,
        target: MigrationTarget,
        *,
        timeout_s: float,
        bandwidth_mib_s: int = 0,
        auto_converge: bool = False,
    ) -> MigrationOutcome:
        """Live-migrate; persist on the target, undefine on the source; abort the job on timeout."""
        ...

    def abort(self, vm: str) -> None: ...
