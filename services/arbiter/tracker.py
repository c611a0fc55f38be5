"""Commands in flight: who issued them, what they are about, and until when we wait.

Every command the arbiter sends, and every command it learns of from an
``accepted`` result it did not send (an operator's, published by hand), is a
record here until a final result or its deadline.  At most one record per VM
and one power record per node.  The log is plain data so the arbiter can
persist it and a restarted arbiter does not issue again what is already in
flight.  No I/O, no clock.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

log = logging.getLogger("enersis.arbiter.tracker")


@dataclass
class InFlight:
    command_id: str
    kind: str  # MigrateVm | WakeNode | ShutdownNode
    issued_at: float  # epoch s
    deadline: float  # epoch s: past it without a final result, the command is treated as lost
    vm: str = ""
    source: str = ""
    target: str = ""
    node: str = ""  # WakeNode / ShutdownNode
    ours: bool = True  # False: an operator's, seen through its results
    accepted: bool = False
    attempt: int = 1
    reason: str = ""

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(n for n in (self.source, self.target, self.node) if n)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InFlight":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class Failures:
    """Bounded retries: a VM whose migrations keep failing is left alone for a while."""

    count: int = 0
    held_until: float = 0.0
    last_reason: str = ""


class CommandLog:
    def __init__(self) -> None:
        self.records: dict[str, InFlight] = {}
        self.by_vm: dict[str, str] = {}
        self.by_node: dict[str, set[str]] = {}
        self.failures: dict[str, Failures] = {}
        # ids recently finished, so a duplicate or late result is recognised and ignored
        self.finished: dict[str, str] = {}
        self._finished_order: list[str] = []

    # ------------------------------------------------------------ records

    def add(self, rec: InFlight) -> None:
        self.records[rec.command_id] = rec
        if rec.vm:
            self.by_vm[rec.vm] = rec.command_id
        for n in rec.nodes:
            self.by_node.setdefault(n, set()).add(rec.command_id)

    def pop(self, command_id: str, status: str = "") -> InFlight | None:
        rec = self.records.pop(command_id, None)
        if rec is None:
            return None
        if rec.vm and self.by_vm.get(rec.vm) == command_id:
            del self.by_vm[rec.vm]
        for n in rec.nodes:
            ids = self.by_node.get(n)
            if ids:
                ids.discard(command_id)
                if not ids:
                    del self.by_node[n]
        self.finished[command_id] = status
        self._finished_order.append(command_id)
        if len(self._finished_order) > 10_000:
            for old in self._finished_order[:5_000]:
                self.finished.pop(old, None)
            del self._finished_order[:5_000]
        return rec

    def get(self, command_id: str) -> InFlight | None:
        return self.records.get(command_id)

    def for_vm(self, vm: str) -> InFlight | None:
        cid = self.by_vm.get(vm)
        return self.records.get(cid) if cid else None

    def for_node(self, node: str) -> list[InFlight]:
        return [self.records[c] for c in sorted(self.by_node.get(node, ()))]

    def power_for(self, node: str) -> InFlight | None:
        for rec in self.for_node(node):
            if rec.kind in ("WakeNode", "ShutdownNode") and rec.node == node:
                return rec
        return None

    def migrations(self) -> Iterable[InFlight]:
        return (r for r in self.records.values() if r.kind == "MigrateVm")

    def busy_vms(self) -> dict[str, str]:
        """vm -> target of its in-flight migration, for the policy's snapshot."""
        return {r.vm: r.target for r in self.records.values() if r.vm}

    def expired(self, now: float) -> list[InFlight]:
        return sorted((r for r in self.records.values() if now > r.deadline), key=lambda r: (r.deadline, r.command_id))

    # ------------------------------------------------------------ retries

    def held(self, vm: str, now: float) -> bool:
        f = self.failures.get(vm)
        return f is not None and now < f.held_until

    def record_failure(self, vm: str, reason: str, now: float, *, max_retries: int, hold_s: float,
                       backoff_s: float = 0.0) -> Failures:
        f = self.failures.setdefault(vm, Failures())
        f.count += 1
        f.last_reason = reason
        # A failure usually means our view was stale (the VM moved, a node went away):
        # wait for fresher reports before the next try instead of retrying at once.
        f.held_until = now + min(hold_s, backoff_s * 2 ** (f.count - 1))
        if f.count >= max_retries:
            f.held_until = now + hold_s
            f.count = 0
            log.error("migrations of %s failed %d times in a row (last: %s); leaving it where it is for %.0fs",
                      vm, max_retries, reason, hold_s)
        return f

    def record_success(self, vm: str) -> None:
        self.failures.pop(vm, None)

    # ------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, Any]:
        return {
            "in_flight": [r.to_dict() for r in self.records.values()],
            "failures": {vm: asdict(f) for vm, f in self.failures.items()},
            "finished": self._finished_order[-1000:],
        }

    def load(self, data: dict[str, Any]) -> None:
        for d in data.get("in_flight", []):
            self.add(InFlight.from_dict(d))
        for vm, f in data.get("failures", {}).items():
            self.failures[vm] = Failures(**f)
        for cid in data.get("finished", []):
            self.finished[cid] = ""
            self._finished_order.append(cid)
