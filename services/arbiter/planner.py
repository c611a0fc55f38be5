"""Intents -> ordered, safe commands.

The policy says *what*; this module says *in which order* and re-checks every
safety rule against the live state and the commands in flight, whatever the
policy said:

- wake first (a migration waits for the node's NodeOnline: the policy only
  targets online nodes, so the migration comes in a later decision);
- migrate only a VM that is where we think it is, with nothing in flight for
  it, to an online, fresh, non-frontend node with no power command pending;
- shut down only a node confirmed empty by telemetry sampled after its last
  outgoing migration finished, with nothing in flight to or from it;
- nothing is ever sent to a stale, off or quarantined node.

Pure: the caller passes `now` and an id factory, and publishes the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

from enersis.common.messages import MigrateVm, ShutdownNode, WakeNode

from .policy import Intent, Migrate, Shutdown, Wake
from .state import ClusterState
from .tracker import CommandLog, InFlight

Command = Union[MigrateVm, WakeNode, ShutdownNode]


@dataclass(frozen=True)
class PlannerSettings:
    migrate_timeout_s: float = 300.0
    migrate_deadline_slack_s: float = 120.0  # a MigrateVm may queue behind others on its source's executor
    wake_timeout_s: float = 300.0
    shutdown_timeout_s: float = 180.0
    max_in_flight_migrations: int = 32  # safety net over any policy
    bandwidth_mib_s: int = 0
    auto_converge: bool = False


@dataclass(frozen=True)
class Planned:
    command: Command
    record: InFlight


@dataclass(frozen=True)
class Dropped:
    intent: Intent
    reason: str


def _order(intent: Intent) -> int:
    return 0 if isinstance(intent, Wake) else 1 if isinstance(intent, Migrate) else 2


def plan(intents: list[Intent], state: ClusterState, log: CommandLog, settings: PlannerSettings,
         now: float, new_id: Callable[[], str], *, pinned: frozenset[str] | set[str] = frozenset(),
         issued_by: str = "arbiter") -> tuple[list[Planned], list[Dropped]]:
    planned: list[Planned] = []
    dropped: list[Dropped] = []
    vms_taken: set[str] = set()
    nodes_touched: set[str] = set()  # source or target of a migration planned now
    power_planned: set[str] = set()
    migrations = sum(1 for _ in log.migrations())
    for intent in sorted(intents, key=_order):  # stable: the policy's order within a kind
        if isinstance(intent, Wake):
            why = check_wake(intent.node, state, log, now)
            if not why and intent.node in power_planned:
                why = "a power command for it is already planned"
            if why:
                dropped.append(Dropped(intent, why))
                continue
            power_planned.add(intent.node)
            cid = new_id()
            cmd = WakeNode(command_id=cid, node=intent.node, reason=intent.reason, issued_by=issued_by)
            planned.append(Planned(cmd, InFlight(cid, cmd.KIND, now, now + settings.wake_timeout_s,
                                                 node=intent.node, reason=intent.reason)))
        elif isinstance(intent, Migrate):
            why = check_migrate(intent.vm, intent.source, intent.target, state, log, now, pinned=pinned)
            if not why and intent.vm in vms_taken:
                why = f"{intent.vm} already has a command planned"
            if not why and (intent.source in power_planned or intent.target in power_planned):
                why = "a power command is planned for its source or target"
            if not why and migrations >= settings.max_in_flight_migrations:
                why = f"{migrations} migrations already in flight (limit {settings.max_in_flight_migrations})"
            if why:
                dropped.append(Dropped(intent, why))
                continue
            vms_taken.add(intent.vm)
            nodes_touched.update((intent.source, intent.target))
            migrations += 1
            cid = new_id()
            cmd = MigrateVm(command_id=cid, vm=intent.vm, source=intent.source, target=intent.target,
                            reason=intent.reason, timeout_s=settings.migrate_timeout_s,
                            bandwidth_mib_s=settings.bandwidth_mib_s, auto_converge=settings.auto_converge,
                            issued_by=issued_by)
            deadline = now + settings.migrate_timeout_s + settings.migrate_deadline_slack_s
            planned.append(Planned(cmd, InFlight(cid, cmd.KIND, now, deadline, vm=intent.vm,
                                                 source=intent.source, target=intent.target, reason=intent.reason)))
        elif isinstance(intent, Shutdown):
            why = check_shutdown(intent.node, state, log, now)
            if not why and intent.node in nodes_touched:
                why = "a migration to or from it is planned now"
            if not why and intent.node in power_planned:
                why = "a power command for it is already planned"
            if why:
                dropped.append(Dropped(intent, why))
                continue
            power_planned.add(intent.node)
            cid = new_id()
            cmd = ShutdownNode(command_id=cid, node=intent.node, force=False, reason=intent.reason, issued_by=issued_by)
            planned.append(Planned(cmd, InFlight(cid, cmd.KIND, now, now + settings.shutdown_timeout_s,
                                                 node=intent.node, reason=intent.reason)))
        else:  # pragma: no cover - the policy returns only the three kinds
            dropped.append(Dropped(intent, f"unknown intent {type(intent).__name__}"))
    return planned, dropped


# ---------------------------------------------------------------- single checks (also used to approve recommendations)


def check_wake(node: str, state: ClusterState, log: CommandLog, now: float) -> str:
    rec = state.nodes.get(node)
    if rec is None:
        return f"{node} is not a known node"
    if rec.power != "off":
        return f"{node} is {rec.view_state(now, state.stale_after_intervals)}, not off"
    if rec.drained:
        return f"{node} is drained for maintenance"
    if now < rec.hold_until:
        return f"an operator changed {node}'s power by hand; left alone for {rec.hold_until - now:.0f}s more"
    if log.for_node(node):
        return f"a command for {node} is already in flight"
    return ""


def check_migrate(vm: str, source: str, target: str, state: ClusterState, log: CommandLog, now: float,
                  *, pinned: frozenset[str] | set[str] = frozenset()) -> str:
    stale_after = state.stale_after_intervals
    if source == target:
        return f"{vm}: source and target are both {source}"
    src = state.nodes.get(source)
    dst = state.nodes.get(target)
    if src is None or dst is None:
        return f"unknown node {source if src is None else target}"
    if vm not in src.domains:
        return f"{vm} is not reported on {source}"
    if not src.domains[vm].running:
        return f"{vm} is not running on {source}"
    if state.vm_location(vm) != source:
        return f"{vm} is reported on {state.vm_location(vm)}, not {source}"
    if vm in pinned:
        return f"{vm} is pinned"
    if log.for_vm(vm):
        return f"a command for {vm} is already in flight"
    if log.held(vm, now):
        return f"{vm}'s migrations failed repeatedly; held"
    s_state = src.view_state(now, stale_after)
    if s_state not in ("online", "draining"):
        return f"source {source} is {s_state}"
    t_state = dst.view_state(now, stale_after)
    if t_state != "online":
        return f"target {target} is {t_state}"
    if dst.frontend:
        return f"target {target} is the frontend"
    if log.power_for(source) or log.power_for(target):
        return "a power command for its source or target is in flight"
    return ""


def check_shutdown(node: str, state: ClusterState, log: CommandLog, now: float) -> str:
    rec = state.nodes.get(node)
    if rec is None:
        return f"{node} is not a known node"
    if rec.frontend:
        return f"{node} is the frontend"
    st = rec.view_state(now, state.stale_after_intervals)
    if st not in ("online", "draining"):
        return f"{node} is {st}"  # never shut down on stale data
    if rec.drained and not rec.drain_power_off:
        return f"{node} is drained without power-off"
    if now < rec.hold_until:
        return f"an operator changed {node}'s power by hand; left alone for {rec.hold_until - now:.0f}s more"
    if log.for_node(node):
        return f"a command to or from {node} is in flight"
    if any(r.target == node or r.source == node for r in log.migrations()):
        return f"a migration to or from {node} is in flight"
    if not state.confirmed_empty(node, now):
        return f"{node} is not confirmed empty by a report newer than its last migration"
    return ""
