"""The arbiter's picture of the cluster, folded from telemetry, lifecycle events and results.

No I/O and no clock: every method that needs the time is given `now`
(epoch seconds).  Level-triggered: each NodeTelemetry carries the node's full
domain list, so a lost message heals at the next one.

Power states kept here: ``unknown`` (configured, not heard from yet), ``online``,
``off``, ``waking``, ``shutting_down``, ``quarantined``.  ``stale`` and
``draining`` are derived when a view is built: a node silent for more than
`stale_after_intervals` publish intervals, or whose hypervisor does not answer,
is stale — never a target, never shut down, its VMs never moved.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Iterable

from enersis.common.messages import DomainSample, NodeOffline, NodeOnline, NodeTelemetry

from .policy import NodeView, Snapshot, VmView

log = logging.getLogger("enersis.arbiter.state")

HISTORY_LEN = 32
POWER_EVENT_WINDOW_S = 3600.0


@dataclass
class NodeRecord:
    name: str
    power: str = "unknown"
    frontend: bool = False
    configured: bool = False
    was_up: bool = False  # known online before the arbiter restarted
    first_seen_wait_until: float = 0.0  # an unknown node counts as off after this
    # last telemetry
    last_seen: float = 0.0  # arbiter clock when telemetry / lifecycle last arrived
    last_ts_ms: int = 0  # the sender's timestamp of the last telemetry folded
    boot_id: str = ""
    hypervisor_ok: bool = False
    error: str = ""
    cpus: int = 0
    mhz: int = 0
    cpu_pct: float = 0.0
    mem_total_kib: int = 0
    publish_interval_s: float = 5.0
    domains: dict[str, DomainSample] = field(default_factory=dict)
    vm_views: tuple[VmView, ...] = ()
    view_cache: tuple | None = None  # (key, NodeView): rebuilt only when something it shows changed
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY_LEN))  # (load %, ts_ms of its report)
    # lifecycle bookkeeping
    power_events: deque = field(default_factory=lambda: deque(maxlen=64))  # epoch s of completed shutdowns
    quarantine_reason: str = ""
    quarantined_at: float = 0.0
    drained: bool = False
    drain_power_off: bool = False
    hold_until: float = 0.0  # an operator changed its power by hand: leave its power alone until then
    power_deadline: float = 0.0  # waking / shutting_down: by when it should have got there
    last_outgoing_done_ms: int = 0  # when a migration away from it last finished (results' clock)

    @property
    def capacity(self) -> float:
        return float(self.cpus * self.mhz)

    @property
    def cpu_used(self) -> float:
        return self.capacity * self.cpu_pct / 100.0

    def fresh(self, now: float, stale_after_intervals: float) -> bool:
        return self.last_seen > 0 and now - self.last_seen <= stale_after_intervals * max(self.publish_interval_s, 0.1)

    def view_state(self, now: float, stale_after_intervals: float) -> str:
        if self.power == "quarantined":
            return "quarantined"
        if self.power in ("waking", "shutting_down", "off"):
            if self.power == "off" and (self.drained or now < self.hold_until):
                # Out of service (maintenance, or an operator powered it off by hand): never woken by the policy.
                return "quarantined"
            return self.power
        if self.power == "unknown":
            return "stale"
        if not self.hypervisor_ok or not self.fresh(now, stale_after_intervals):
            return "stale"
        return "draining" if self.drained else "online"

    def cycles_last_hour(self, now: float) -> int:
        if not self.power_events:
            return 0
        return sum(1 for t in self.power_events if now - t <= POWER_EVENT_WINDOW_S)


class ClusterState:
    """Nodes and where each VM runs, as last reported."""

    def __init__(self, *, stale_after_intervals: float = 3.0, frontend: str = "",
                 managed_vms: Iterable[str] = (), unknown_grace_s: float = 10.0):
        self.nodes: dict[str, NodeRecord] = {}
        self.stale_after_intervals = stale_after_intervals
        self.frontend = frontend
        self.managed_vms = frozenset(managed_vms)  # empty = every VM is ours to move
        self.unknown_grace_s = unknown_grace_s
        # vm -> (target, result ts_ms): a migration finished; older telemetry that still lists it elsewhere is ignored
        self.moved: dict[str, tuple[str, int]] = {}
        self.where: dict[str, set[str]] = {}  # vm -> nodes whose last report lists it

    # ------------------------------------------------------------ nodes

    def node(self, name: str, now: float = 0.0) -> NodeRecord:
        rec = self.nodes.get(name)
        if rec is None:
            rec = self.nodes[name] = NodeRecord(name=name, frontend=(name == self.frontend),
                                                first_seen_wait_until=now + self.unknown_grace_s)
        return rec

    def configure_node(self, name: str, now: float) -> NodeRecord:
        rec = self.node(name, now)
        rec.configured = True
        return rec

    # ------------------------------------------------------------ folding

    def fold_telemetry(self, msg: NodeTelemetry, ts_ms: int, now: float) -> tuple[float, float]:
        """Fold one report; returns (load % before, load % now) so callers can react to a crossing."""
        rec = self.node(msg.node, now)
        before = rec.cpu_pct if rec.power == "online" else 0.0
        if ts_ms and ts_ms < rec.last_ts_ms:
            return before, rec.cpu_pct  # reordered: an older report never overwrites a newer one
        # Freshness by when the report was made, not when it reached us: a restarted arbiter first reads up
        # to a minute of queued reports, which must not make a dead node look alive (node clocks: NTP).
        rec.last_seen = min(now, ts_ms / 1000.0) if ts_ms else now
        rec.last_ts_ms = ts_ms
        if rec.boot_id and msg.boot_id != rec.boot_id:
            log.info("node %s rebooted (boot id %s -> %s)", msg.node, rec.boot_id, msg.boot_id)
        rec.boot_id = msg.boot_id
        rec.hypervisor_ok = msg.hypervisor_ok
        rec.error = msg.error
        rec.cpus, rec.mhz = msg.cpus, msg.mhz
        rec.mem_total_kib = msg.mem_total_kib
        rec.publish_interval_s = msg.publish_interval_s or rec.publish_interval_s
        adjust = 0.0
        if msg.hypervisor_ok:
            domains = {}
            for d in msg.domains:
                guard = self.moved.get(d.name)
                if guard and guard[0] != msg.node and ts_ms <= guard[1]:
                    adjust -= d.cpu_node_pct  # sampled before the migration finished: it has left already
                    continue
                domains[d.name] = d
            if self.moved:
                # Sampled before a VM finished arriving here: it is here now, with its load.
                for name, (target, done_ms) in self.moved.items():
                    if target == msg.node and ts_ms <= done_ms and name not in domains and name in rec.domains:
                        domains[name] = rec.domains[name]
                        adjust += rec.domains[name].cpu_node_pct
            self._set_domains(rec, domains)
        rec.cpu_pct = max(0.0, min(100.0, msg.cpu_pct + adjust))
        if msg.hypervisor_ok:
            if rec.power in ("unknown", "off", "waking", "quarantined"):
                if rec.power in ("off", "quarantined"):
                    log.info("node %s reports in while %s: it is up (powered on by hand?)", msg.node, rec.power)
                rec.power = "online"
                rec.quarantine_reason = ""
            if self.moved:
                listed = {d.name for d in msg.domains}
                for name in [n for n, (t, _) in self.moved.items() if t == msg.node and n in listed]:
                    del self.moved[name]  # its target reports it: confirmed
        else:
            self._rebuild_views(rec)  # capacity may have changed; the domain list is kept, unverified
        return before, rec.cpu_pct

    def fold_online(self, msg: NodeOnline, now: float, ts_ms: int = 0) -> None:
        rec = self.node(msg.node, now)
        rec.last_seen = max(rec.last_seen, min(now, ts_ms / 1000.0) if ts_ms else now)
        rec.boot_id = msg.boot_id
        rec.hypervisor_ok = msg.hypervisor_ok
        rec.publish_interval_s = msg.publish_interval_s or rec.publish_interval_s
        if rec.power != "online":
            log.info("node %s is online (was %s)", msg.node, rec.power)
        rec.power = "online"
        rec.quarantine_reason = ""

    def fold_offline(self, msg: NodeOffline, now: float) -> None:
        rec = self.node(msg.node, now)
        rec.last_seen = 0.0  # nothing fresh from it any more
        if rec.power == "shutting_down" or not rec.domains:
            rec.power = "off"
            log.info("node %s went offline (%s): off", msg.node, msg.reason or "no reason given")
        else:
            # Its agent stopped but VMs may still run there: unknown, not off.
            log.warning("node %s's agent stopped (%s) while it hosted %d domain(s): treated as stale",
                        msg.node, msg.reason or "no reason given", len(rec.domains))

    def tick(self, now: float) -> None:
        """Per cycle: record load history, give up waiting for configured nodes that never reported."""
        for rec in self.nodes.values():
            if rec.power == "unknown" and now >= rec.first_seen_wait_until:
                if rec.was_up:
                    # Up before our restart and silent since: stale like any silent node, never woken blindly.
                    log.warning("node %s was up before the restart and has not reported since: stale", rec.name)
                    rec.power = "online"
                else:
                    log.info("node %s has not reported since start: assumed off", rec.name)
                    rec.power = "off"
            if rec.power == "online" and rec.fresh(now, self.stale_after_intervals):
                # One entry per report: a cycle shorter than the publish interval must not count one sample twice.
                if not rec.history or rec.history[-1][1] != rec.last_ts_ms:
                    rec.history.append((rec.cpu_pct, rec.last_ts_ms))

    # ------------------------------------------------------------ changes the arbiter knows first

    def migration_done(self, vm: str, source: str, target: str, ts_ms: int) -> None:
        """A migration succeeded: the VM is on its target now, whatever older telemetry says."""
        src = self.nodes.get(source)
        dst = self.nodes.get(target)
        sample = src.domains.get(vm) if src else None
        if src:
            src.last_outgoing_done_ms = max(src.last_outgoing_done_ms, ts_ms)
            if sample is not None:
                self._set_domains(src, {k: v for k, v in src.domains.items() if k != vm})
                src.cpu_pct = max(0.0, src.cpu_pct - sample.cpu_node_pct)
        if dst and sample is not None and vm not in dst.domains:
            # Its share of the target's capacity, until the target's own report says better.
            pct = sample.cpu_node_pct * src.capacity / dst.capacity if src and dst.capacity > 0 else sample.cpu_node_pct
            self._set_domains(dst, {**dst.domains, vm: replace(sample, cpu_node_pct=pct)})
            dst.cpu_pct = min(100.0, dst.cpu_pct + pct)
        self.moved[vm] = (target, ts_ms)

    def clear_domains(self, name: str) -> None:
        """A node confirmed off hosts nothing."""
        rec = self.nodes.get(name)
        if rec is not None:
            self._set_domains(rec, {})

    def confirmed_empty(self, name: str, now: float) -> bool:
        """Fresh telemetry, sampled after the last migration away finished, lists no domain at all."""
        rec = self.nodes.get(name)
        if rec is None or not rec.fresh(now, self.stale_after_intervals) or not rec.hypervisor_ok:
            return False
        return not rec.domains and rec.last_ts_ms > rec.last_outgoing_done_ms

    def _set_domains(self, rec: NodeRecord, domains: dict[str, DomainSample]) -> None:
        for name in rec.domains.keys() - domains.keys():
            nodes = self.where.get(name)
            if nodes is not None:
                nodes.discard(rec.name)
                if not nodes:
                    del self.where[name]
        for name in domains.keys() - rec.domains.keys():
            self.where.setdefault(name, set()).add(rec.name)
        rec.domains = domains
        self._rebuild_views(rec)

    def vm_location(self, vm: str) -> str | None:
        best: tuple[bool, int, str] | None = None
        for node in self.where.get(vm, ()):
            rec = self.nodes[node]
            d = rec.domains.get(vm)
            if d is not None:
                key = (d.running, rec.last_ts_ms, rec.name)
                if best is None or key > best:
                    best = key
        return best[2] if best else None

    # ------------------------------------------------------------ views for the policy

    def _rebuild_views(self, rec: NodeRecord) -> None:
        cap = rec.capacity
        managed = self.managed_vms
        views = []
        for d in rec.domains.values():
            views.append(VmView(
                name=d.name,
                node=rec.name,
                cpu=cap * d.cpu_node_pct / 100.0,
                mem_mib=max(d.mem_max_kib, d.mem_kib) // 1024,
                pinned=bool(managed) and d.name not in managed,
                busy=not d.running,  # paused / crashed: never moved, still keeps its node on
            ))
        rec.vm_views = tuple(views)

    def snapshot(self, now: float, *, pinned: frozenset[str] | set[str] = frozenset(),
                 busy: dict[str, str] | None = None, busy_nodes: frozenset[str] | set[str] = frozenset()) -> Snapshot:
        """The policy's input. `busy`: vm -> target of an in-flight migration ("" if not a migration);
        `busy_nodes`: nodes with a power command in flight."""
        busy = busy or {}
        nodes = []
        vms: list[VmView] = []
        for rec in self.nodes.values():
            state = rec.view_state(now, self.stale_after_intervals)
            cycles = rec.cycles_last_hour(now)
            nbusy = rec.name in busy_nodes
            key = (rec.last_ts_ms, rec.cpu_pct, rec.cpus, rec.mhz, rec.mem_total_kib, state, nbusy, cycles,
                   rec.drain_power_off, len(rec.history), rec.history[-1][1] if rec.history else 0)
            if rec.view_cache is None or rec.view_cache[0] != key:
                last = rec.last_ts_ms
                rec.view_cache = (key, NodeView(
                    name=rec.name,
                    state=state,
                    cpu_capacity=rec.capacity,
                    cpu_used=rec.cpu_used,
                    mem_mib=rec.mem_total_kib // 1024,
                    busy=nbusy,
                    frontend=rec.frontend,
                    # The policy wants past loads; the current report is cpu_used.
                    history=tuple(p for p, ts in rec.history if ts != last) if rec.history else (),
                    power_cycles_last_hour=cycles,
                    power_off_when_empty=rec.drain_power_off,
                ))
            nodes.append(rec.view_cache[1])
            vms.extend(rec.vm_views)
        # The few VMs that need more than their node's cached view: in flight, pinned, or listed twice.
        special = set(pinned) | set(busy)
        if len(self.where) != len(vms):  # some VM is listed by two nodes (the end of a migration)
            special |= {vm for vm, where in self.where.items() if len(where) > 1}
        if special:
            vms = [v for v in vms if v.name not in special]
            for name in special:
                loc = self.vm_location(name)
                if loc is None:
                    continue
                v = next(x for x in self.nodes[loc].vm_views if x.name == name)
                vms.append(replace(v, pinned=v.pinned or name in pinned, busy=v.busy or name in busy,
                                   target=busy.get(name, v.target)))
        return Snapshot(nodes=tuple(nodes), vms=tuple(vms))
