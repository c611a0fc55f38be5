"""The arbiter: fold what arrives, decide, plan, send, track — behind a small Bus interface.

Handlers (telemetry, lifecycle, results, operator commands) and the decision
loop share one lock; every decision runs on the loop thread, woken at once by
telemetry that pushes a node over the upper threshold, by a node coming
online, or by a command's final result, and otherwise every cycle_s as the
safety net.  Nothing here imports pika: `runner.py` wires the real bus.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol

from enersis.common import codec
from enersis.common.messages import (
    MESSAGES_BY_KIND,
    ApproveRecommendation,
    CommandResult,
    DrainNode,
    Message,
    MigrateVm,
    NodeOffline,
    NodeOnline,
    NodeTelemetry,
    PauseAutomation,
    PinVm,
    Recommendation,
    ResumeAutomation,
    SetMode,
    SetThresholds,
    ShutdownNode,
    UndrainNode,
    WakeNode,
)

from . import planner as planner_mod
from .config import ArbiterConfig
from .planner import Planned
from .policy import Migrate, Shutdown, decide
from .state import ClusterState
from .store import StateFile
from .tracker import CommandLog, InFlight

log = logging.getLogger("enersis.arbiter")

SENDER = "arbiter"
POWER_KINDS = (WakeNode.KIND, ShutdownNode.KIND)
TRACKED_KINDS = frozenset({MigrateVm.KIND, WakeNode.KIND, ShutdownNode.KIND})


class Bus(Protocol):
    """What the arbiter needs from the broker: a confirmed publish."""

    def publish(self, message: Message, *, mandatory: bool = False) -> None: ...


class PublishFailed(Exception):
    """The bus could not deliver (broker down, or no queue for the routing key)."""

    def __init__(self, reason: str, *, unroutable: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.unroutable = unroutable


@dataclass
class DrainOrder:
    command_id: str
    power_off: bool
    deadline: float


@dataclass
class PendingRecommendation:
    kind: str
    key: str
    command: dict[str, Any]
    expires: float
    reason: str


class Arbiter:
    def __init__(self, cfg: ArbiterConfig, bus: Bus, *, clock: Callable[[], float] = time.time,
                 new_id: Callable[[], str] = codec.new_id, store: StateFile | None = None):
        self.cfg = cfg
        self.bus = bus
        self.clock = clock
        self.new_id = new_id
        self.store = store
        self.params = cfg.params
        self.mode = cfg.mode
        self.paused = cfg.paused
        self.lock = threading.RLock()
        self.trigger = threading.Event()
        now = clock()
        self.state = ClusterState(stale_after_intervals=cfg.stale_after_intervals, frontend=cfg.frontend,
                                  managed_vms=cfg.managed_vms, unknown_grace_s=cfg.unknown_grace_s)
        for n in cfg.nodes:
            self.state.configure_node(n.name, now)
        self.log = CommandLog()
        self.pinned: set[str] = set()
        self.manual_pins: dict[str, float] = {}  # vm -> until: moved by an operator, not fought
        self.unconfirmed: dict[str, int] = {}  # vm -> ms: its migration timed out; wait for a newer report
        self.drains: dict[str, DrainOrder] = {}
        self.recommendations: dict[str, PendingRecommendation] = {}
        self.operator_replies: OrderedDict[str, list[CommandResult]] = OrderedDict()
        self.next_cycle = now
        self.warm_until = now + cfg.warmup_s
        self.reacted: dict[str, float] = {}
        self.decisions = 0
        self.dirty = False  # something worth saving changed; the loop saves it
        self.last_timing = (0.0, 0.0)
        self.stats = {"sent": 0, "dropped": 0, "recommended": 0}
        if store is not None:
            self._restore(store.load(), now)

    # ================================================================ inputs

    def on_telemetry(self, msg: NodeTelemetry, ts_ms: int) -> None:
        with self.lock:
            now = self.clock()
            rec = self.state.nodes.get(msg.node)
            was = rec.power if rec else "unknown"
            before, after = self.state.fold_telemetry(msg, ts_ms, now)
            upper = self.params.upper_pct
            if after > upper and (before <= upper or now - self.reacted.get(msg.node, 0.0) >= self.params.cycle_s):
                # Act on the overload now; the cycle is only the safety net.
                self.reacted[msg.node] = now
                self.trigger.set()
            if was != "online" and self.state.nodes[msg.node].power == "online":
                self.dirty = True  # a restarted arbiter must know this node was up (saved by the loop, once)
                self.trigger.set()  # new capacity

    def on_online(self, msg: NodeOnline, ts_ms: int = 0) -> None:
        with self.lock:
            self.state.fold_online(msg, self.clock(), ts_ms)
            self.dirty = True
            self.trigger.set()  # a woken node can take the VMs waiting for it

    def on_offline(self, msg: NodeOffline) -> None:
        with self.lock:
            self.state.fold_offline(msg, self.clock())

    def on_result(self, msg: CommandResult, ts_ms: int) -> None:
        if msg.command_kind not in TRACKED_KINDS:
            return  # replies to operator commands (ours included) need no tracking
        with self.lock:
            now = self.clock()
            rec = self.log.get(msg.command_id)
            if rec is None:
                if msg.command_id in self.log.finished:
                    log.debug("late or duplicate %s result for %s ignored", msg.status, msg.command_id)
                    return
                rec = self._foreign(msg, now)
                if rec is None:
                    return
            if msg.status == "accepted":
                rec.accepted = True
                self._save()
                return
            self.log.pop(msg.command_id, msg.status)
            self._apply_final(rec, msg, ts_ms, now)
            self._save()
            self.trigger.set()

    # ---------------------------------------------------------------- results

    def _foreign(self, msg: CommandResult, now: float) -> InFlight | None:
        """A result for a command the arbiter did not send: an operator's, published by hand."""
        d = msg.details or {}
        hold = self.cfg.commands.manual_hold_s
        if msg.command_kind == MigrateVm.KIND:
            vm = msg.vm
            if not vm:
                return None
            rec = InFlight(msg.command_id, msg.command_kind, now,
                           now + self.cfg.commands.migrate_timeout_s + self.cfg.commands.migrate_deadline_slack_s,
                           vm=vm, source=str(d.get("source") or msg.node), target=str(d.get("target") or ""),
                           ours=False)
            if msg.status in ("accepted", "succeeded"):
                self.manual_pins[vm] = now + hold  # the operator put it there: do not move it back
                log.info("operator migration %s of %s seen (%s): leaving %s alone for %.0fs",
                         msg.command_id, vm, msg.status, vm, hold)
        else:
            node = msg.node
            if not node or node == "-":
                return None
            rec = InFlight(msg.command_id, msg.command_kind, now,
                           now + (self.cfg.commands.wake_timeout_s if msg.command_kind == WakeNode.KIND
                                  else self.cfg.commands.shutdown_timeout_s),
                           node=node, ours=False)
            if msg.status in ("accepted", "succeeded"):
                n = self.state.node(node, now)
                n.hold_until = now + hold
                log.info("operator %s %s of %s seen (%s): leaving its power alone for %.0fs",
                         msg.command_kind, msg.command_id, node, msg.status, hold)
        if msg.status == "accepted":
            existing = self.log.for_vm(rec.vm) if rec.vm else self.log.power_for(rec.node)
            if existing is None:
                self.log.add(rec)
                if rec.kind == WakeNode.KIND:
                    self._set_power(rec.node, "waking", rec.deadline)
                elif rec.kind == ShutdownNode.KIND:
                    self._set_power(rec.node, "shutting_down", rec.deadline)
        return rec

    def _apply_final(self, rec: InFlight, msg: CommandResult, ts_ms: int, now: float) -> None:
        who = "" if rec.ours else " (operator's)"
        if rec.kind == MigrateVm.KIND:
            d = msg.details or {}
            vm = rec.vm or msg.vm
            source = rec.source or str(d.get("source") or msg.node)
            target = rec.target or str(d.get("target") or "")
            if msg.status == "succeeded":
                log.info("migrated %s %s -> %s%s", vm, source, target, who)
                if target:
                    self.state.migration_done(vm, source, target, ts_ms or int(now * 1000))
                self.log.record_success(vm)
            elif msg.status == "skipped":
                # The executor skips only a VM that already runs on the target.
                log.info("migration of %s skipped%s: %s", vm, who, msg.reason)
                if target and source != target:
                    self.state.migration_done(vm, source, target, ts_ms or int(now * 1000))
            else:
                log.warning("migration of %s %s -> %s %s%s: %s", vm, source, target, msg.status, who, msg.reason)
                if rec.ours:
                    self.log.record_failure(vm, msg.reason, now, max_retries=self.cfg.commands.max_retries,
                                            hold_s=self.cfg.commands.retry_hold_s,
                                        backoff_s=self.cfg.commands.retry_backoff_s)
        elif rec.kind == WakeNode.KIND:
            node = rec.node or msg.node
            if msg.status == "succeeded":
                log.info("node %s woke%s", node, who)
                n = self.state.node(node, now)
                n.power_events.append(now)
            elif msg.status in ("failed", "rejected"):
                self._quarantine(node, f"wake {msg.status}: {msg.reason}", now)
            else:
                # The power service skips a wake only for a node it sees online; our own telemetry decides
                # whether it is usable (stale until it reports), never "off" (that would wake it again and again).
                log.info("wake of %s skipped%s: %s", node, who, msg.reason)
                n = self.state.node(node, now)
                if n.power == "waking":
                    n.power = "online"
        elif rec.kind == ShutdownNode.KIND:
            node = rec.node or msg.node
            n = self.state.node(node, now)
            if msg.status in ("succeeded", "skipped"):  # skipped: the power service saw it off already
                log.info("node %s is off%s%s", node, who, "" if msg.status == "succeeded" else f" ({msg.reason})")
                n.power = "off"
                n.last_seen = 0.0
                if msg.status == "succeeded":
                    n.power_events.append(now)
                self.state.clear_domains(node)
            else:
                log.warning("shutdown of %s %s%s: %s", node, msg.status, who, msg.reason)
                if n.power == "shutting_down":
                    n.power = "online"

    def _quarantine(self, node: str, reason: str, now: float) -> None:
        n = self.state.node(node, now)
        n.power = "quarantined"
        n.quarantine_reason = reason
        n.quarantined_at = now
        log.error("node %s quarantined: %s (not woken again for %.0fs; it returns as soon as it reports in)",
                  node, reason, self.cfg.commands.quarantine_s)

    def _set_power(self, node: str, power: str, deadline: float) -> None:
        n = self.state.node(node, self.clock())
        n.power = power
        n.power_deadline = deadline

    # ================================================================ operator commands

    def on_operator(self, msg: Message) -> list[CommandResult]:
        """Apply an operator command and publish its replies; a replayed command_id is answered, not redone."""
        with self.lock:
            cid = getattr(msg, "command_id")
            if cid in self.operator_replies:
                log.info("operator command %s replayed: answering as before", cid)
                replies = self.operator_replies[cid] or [
                    self._reply(msg, "skipped", "already applied (before the arbiter restarted)")]
            else:
                replies = self._operate(msg, self.clock())
                self.operator_replies[cid] = replies
                while len(self.operator_replies) > 5000:
                    self.operator_replies.popitem(last=False)
                self._save()
                self.trigger.set()
            # Published under the lock so a drain's final result never overtakes its `accepted`.
            for r in replies:
                self._publish_result(r)
        return replies

    def _reply(self, msg: Message, status: str, reason: str, **kw: Any) -> CommandResult:
        details = {k: v for k, v in kw.pop("details", {}).items() if v is not None}
        return CommandResult(command_id=getattr(msg, "command_id"), command_kind=msg.KIND, status=status,
                             reason=reason, details=details, **kw)

    def _operate(self, msg: Message, now: float) -> list[CommandResult]:
        if isinstance(msg, PauseAutomation):
            self.paused = True
            log.warning("automation paused by %s: %s", msg.issued_by, msg.reason or "no reason given")
            return [self._reply(msg, "succeeded", "automation paused: no migration or power command is issued "
                                "except to finish drains")]
        if isinstance(msg, ResumeAutomation):
            self.paused = False
            log.warning("automation resumed by %s", msg.issued_by)
            return [self._reply(msg, "succeeded", "automation resumed")]
        if isinstance(msg, SetMode):
            self.mode = msg.mode
            log.warning("mode set to %s by %s", msg.mode, msg.issued_by)
            text = ("advisory: commands are published as Recommendations on enersis.res.advice and run only "
                    "once approved") if msg.mode == "advisory" else "auto: commands are executed"
            return [self._reply(msg, "succeeded", text)]
        if isinstance(msg, SetThresholds):
            new = replace(self.params, upper_pct=msg.upper_pct, lower_pct=msg.lower_pct)
            try:
                new.validate()
            except ValueError as exc:
                return [self._reply(msg, "rejected", str(exc))]
            self.params = new
            log.warning("thresholds set to lower %g%% / upper %g%% by %s", msg.lower_pct, msg.upper_pct, msg.issued_by)
            return [self._reply(msg, "succeeded", f"thresholds now lower {msg.lower_pct:g}% / upper {msg.upper_pct:g}%",
                                details={"upper_pct": msg.upper_pct, "lower_pct": msg.lower_pct})]
        if isinstance(msg, PinVm):
            if msg.pinned:
                self.pinned.add(msg.vm)
            else:
                self.pinned.discard(msg.vm)
                self.manual_pins.pop(msg.vm, None)
            where = self.state.vm_location(msg.vm)
            note = f"on {where}" if where else "not reported by any node right now"
            inflight = self.log.for_vm(msg.vm)
            if inflight and msg.pinned:
                note += f"; the migration already in flight ({inflight.command_id}) is not cancelled"
            return [self._reply(msg, "succeeded", f"{msg.vm} {'pinned' if msg.pinned else 'unpinned'} ({note})",
                                vm=msg.vm)]
        if isinstance(msg, DrainNode):
            return self._drain(msg, now)
        if isinstance(msg, UndrainNode):
            n = self.state.nodes.get(msg.node)
            if n is None:
                return [self._reply(msg, "rejected", f"{msg.node} is not a known node", node=msg.node)]
            n.drained = False
            n.drain_power_off = False
            out = []
            order = self.drains.pop(msg.node, None)
            if order is not None:
                out.append(CommandResult(command_id=order.command_id, command_kind=DrainNode.KIND, status="skipped",
                                         reason=f"cancelled by UndrainNode {msg.command_id}", node=msg.node))
            out.append(self._reply(msg, "succeeded", f"{msg.node} is back on the target list", node=msg.node))
            return out
        if isinstance(msg, ApproveRecommendation):
            return [self._approve(msg, now)]
        return [self._reply(msg, "rejected", f"{msg.KIND} is not an arbiter command")]

    def _drain(self, msg: DrainNode, now: float) -> list[CommandResult]:
        n = self.state.nodes.get(msg.node)
        if n is None:
            return [self._reply(msg, "rejected", f"{msg.node} is not a known node", node=msg.node)]
        if msg.power_off and n.frontend:
            return [self._reply(msg, "rejected", f"{msg.node} is the frontend: it is never powered off", node=msg.node)]
        n.drained = True
        n.drain_power_off = msg.power_off
        previous = self.drains.get(msg.node)
        self.drains[msg.node] = DrainOrder(msg.command_id, msg.power_off, now + self.cfg.commands.drain_timeout_s)
        out = []
        if previous is not None and previous.command_id != msg.command_id:
            out.append(CommandResult(command_id=previous.command_id, command_kind=DrainNode.KIND, status="skipped",
                                     reason=f"superseded by DrainNode {msg.command_id}", node=msg.node))
        log.warning("draining %s%s for %s: %s", msg.node, " (then power off)" if msg.power_off else "",
                    msg.issued_by, msg.reason or "no reason given")
        out.append(self._reply(msg, "accepted", f"draining {msg.node}: its VMs are being moved away"
                               + ("; it is powered off once empty" if msg.power_off else ""), node=msg.node))
        return out

    def _check_drains(self, now: float) -> None:
        for node, order in list(self.drains.items()):
            n = self.state.nodes[node]
            if order.power_off:
                done = n.power == "off"
            else:
                done = n.power == "off" or self.state.confirmed_empty(node, now)
            if done:
                del self.drains[node]
                self._publish_result(CommandResult(
                    command_id=order.command_id, command_kind=DrainNode.KIND, status="succeeded",
                    reason=f"{node} is empty" + (" and powered off" if n.power == "off" else "")
                    + "; it stays off the target list until UndrainNode", node=node))
            elif now > order.deadline:
                del self.drains[node]
                left = sorted(n.domains)
                self._publish_result(CommandResult(
                    command_id=order.command_id, command_kind=DrainNode.KIND, status="failed",
                    reason=f"{node} not drained within {self.cfg.commands.drain_timeout_s:.0f}s; still hosts: "
                    + (", ".join(left[:20]) or "nothing reported (power-off pending)")
                    + ("; pinned VMs are never moved" if self.pinned & set(left) else ""), node=node))

    # ---------------------------------------------------------------- advisory mode

    def _recommend(self, planned: list[Planned], now: float) -> None:
        live = {r.key for r in self.recommendations.values() if r.expires > now}
        for p in planned:
            c = p.command
            key = f"{c.KIND}:{getattr(c, 'vm', '')}:{getattr(c, 'source', '')}:{getattr(c, 'target', '')}:{getattr(c, 'node', '')}"
            if key in live:
                continue
            rid = self.new_id()
            summary = _summary(c)
            body = codec.body_of(c)
            rec = Recommendation(recommendation_id=rid, command_kind=c.KIND, summary=summary, command=body)
            try:
                self.bus.publish(rec)
            except PublishFailed as exc:
                log.error("could not publish a recommendation (%s)", exc.reason)
                return
            self.recommendations[rid] = PendingRecommendation(c.KIND, key, body, now + self.cfg.commands.recommendation_ttl_s,
                                                              p.record.reason)
            live.add(key)
            self.stats["recommended"] += 1
            log.info("recommended %s: %s", rid, summary)

    def _approve(self, msg: ApproveRecommendation, now: float) -> CommandResult:
        rec = self.recommendations.get(msg.recommendation_id)
        if rec is None:
            return self._reply(msg, "rejected", f"no pending recommendation {msg.recommendation_id} "
                               "(unknown, expired or already approved)")
        if rec.expires <= now:
            del self.recommendations[msg.recommendation_id]
            return self._reply(msg, "rejected", f"recommendation {msg.recommendation_id} expired; wait for a fresh one")
        command = codec.message_from_body(MESSAGES_BY_KIND[rec.kind], dict(rec.command, issued_by=msg.issued_by))
        why = self._check_command(command, now)
        if why:
            return self._reply(msg, "rejected", f"no longer safe: {why}")
        del self.recommendations[msg.recommendation_id]
        record = _record_for(command, now, self.cfg, rec.reason)
        sent = self._send([Planned(command, record)], now)
        if not sent:
            return self._reply(msg, "failed", "the command could not be published; see the arbiter's log", retryable=True)
        return self._reply(msg, "succeeded", f"issued {command.KIND} {command.command_id}: {_summary(command)}",
                           details={"command_id": command.command_id})

    def _check_command(self, c: Message, now: float) -> str:
        if isinstance(c, MigrateVm):
            return planner_mod.check_migrate(c.vm, c.source, c.target, self.state, self.log, now, pinned=self._pins(now))
        if isinstance(c, WakeNode):
            return planner_mod.check_wake(c.node, self.state, self.log, now)
        if isinstance(c, ShutdownNode):
            return planner_mod.check_shutdown(c.node, self.state, self.log, now)
        return f"{c.KIND} is not a command the arbiter issues"

    # ================================================================ deciding

    def _pins(self, now: float) -> set[str]:
        pins = set(self.pinned)
        pins.update(vm for vm, until in self.manual_pins.items() if until > now)
        pins.update(vm for vm in self.log.failures if self.log.held(vm, now))
        return pins

    def _busy(self) -> dict[str, str]:
        busy = self.log.busy_vms()
        for vm, ms in list(self.unconfirmed.items()):
            loc = self.state.vm_location(vm)
            if loc is not None and self.state.nodes[loc].last_ts_ms > ms:
                del self.unconfirmed[vm]  # a report newer than the timeout shows where it is
            else:
                busy.setdefault(vm, "")
        return busy

    def warm(self, now: float) -> bool:
        if now >= self.warm_until:
            return True
        # Every node we know of has reported afresh (or is known off): nothing more to wait for.
        stale_after = self.state.stale_after_intervals
        return bool(self.state.nodes) and all(n.power in ("off", "quarantined") or n.fresh(now, stale_after)
                                              for n in self.state.nodes.values())

    def step(self, *, full: bool | None = None) -> None:
        """One pass: a full cycle (history, deadlines, drains) when due, then a decision."""
        with self.lock:
            now = self.clock()
            if full is None:
                full = now >= self.next_cycle
            if full:
                self.next_cycle = now + self.params.cycle_s
                self._housekeeping(now)
            if self.warm(now):
                self._decide(now)
            if self.dirty:
                self._save()

    def _housekeeping(self, now: float) -> None:
        self.state.tick(now)
        for rec in self.log.expired(now):
            self.log.pop(rec.command_id, "timeout")
            self._expire(rec, now)
        for node in self.state.nodes.values():
            if node.power == "waking" and now > node.power_deadline and not self.log.power_for(node.name):
                self._quarantine(node.name, "did not come online in time after the wake", now)
            elif node.power == "quarantined" and now - node.quarantined_at > self.cfg.commands.quarantine_s:
                log.info("node %s leaves quarantine; it may be woken again", node.name)
                node.power = "off"
        for vm, until in list(self.manual_pins.items()):
            if until <= now:
                del self.manual_pins[vm]
        for rid, r in list(self.recommendations.items()):
            if r.expires <= now:
                del self.recommendations[rid]
        self._check_drains(now)
        self._save()

    def _expire(self, rec: InFlight, now: float) -> None:
        who = "" if rec.ours else " (operator's)"
        if rec.kind == MigrateVm.KIND:
            log.error("migration %s of %s %s -> %s%s got no final result in time; leaving %s alone until a "
                      "newer report shows where it is", rec.command_id, rec.vm, rec.source, rec.target, who, rec.vm)
            self.unconfirmed[rec.vm] = int(now * 1000)
            if rec.ours:
                self.log.record_failure(rec.vm, "timed out", now, max_retries=self.cfg.commands.max_retries,
                                        hold_s=self.cfg.commands.retry_hold_s,
                                        backoff_s=self.cfg.commands.retry_backoff_s)
        elif rec.kind == WakeNode.KIND:
            n = self.state.node(rec.node, now)
            if n.power != "online":
                self._quarantine(rec.node, f"wake {rec.command_id} got no result in time{who}", now)
        elif rec.kind == ShutdownNode.KIND:
            n = self.state.node(rec.node, now)
            log.error("shutdown %s of %s%s got no result in time; treating the node as up (stale until it "
                      "reports)", rec.command_id, rec.node, who)
            if n.power == "shutting_down":
                n.power = "online"

    def _decide(self, now: float) -> None:
        t0 = time.perf_counter()
        busy_nodes = {r.node for r in self.log.records.values() if r.kind in POWER_KINDS}
        snapshot = self.state.snapshot(now, pinned=self._pins(now), busy=self._busy(), busy_nodes=busy_nodes)
        t1 = time.perf_counter()
        intents = decide(snapshot, self.params, now)
        t2 = time.perf_counter()
        self.decisions += 1
        self.last_timing = (t1 - t0, t2 - t1)
        if t2 - t0 > 0.5:
            log.warning("a decision took %.0f ms (snapshot %.0f ms, policy %.0f ms) for %d nodes / %d VMs",
                        (t2 - t0) * 1000, (t1 - t0) * 1000, (t2 - t1) * 1000, len(snapshot.nodes), len(snapshot.vms))
        if self.paused:
            # Paused: only what an operator asked for (drains) goes on.
            draining = set(self.drains) | {n.name for n in self.state.nodes.values() if n.drained}
            intents = [i for i in intents if (isinstance(i, Migrate) and i.source in draining)
                       or (isinstance(i, Shutdown) and i.node in draining)]
        if not intents:
            return
        planned, dropped = planner_mod.plan(intents, self.state, self.log, self.cfg.commands.planner(), now,
                                            self.new_id, pinned=self._pins(now))
        for d in dropped:
            log.debug("not doing %s: %s", d.intent, d.reason)
        self.stats["dropped"] += len(dropped)
        if not planned:
            return
        if self.mode == "advisory":
            self._recommend(planned, now)
        else:
            self._send(planned, now)
        log.debug("decision: snapshot %.1f ms, policy %.1f ms, plan+send %.1f ms, %d intent(s), %d sent",
                  self.last_timing[0] * 1000, self.last_timing[1] * 1000, (time.perf_counter() - t2) * 1000,
                  len(intents), len(planned))

    def _send(self, planned: list[Planned], now: float) -> bool:
        # Write-ahead: the record is saved before the command leaves, so a
        # restarted arbiter knows it is in flight and does not send it again.
        for p in planned:
            self.log.add(p.record)
        self._save()
        ok = True
        for p in planned:
            c = p.command
            try:
                # A MigrateVm nobody consumes (no agent queue for its source) must not vanish.
                self.bus.publish(c, mandatory=isinstance(c, MigrateVm))
            except PublishFailed as exc:
                ok = False
                self.log.pop(c.command_id, "unsent")
                log.error("could not send %s %s (%s)", c.KIND, _summary(c), exc.reason)
                if isinstance(c, MigrateVm) and exc.unroutable:
                    self.log.record_failure(c.vm, exc.reason, now, max_retries=self.cfg.commands.max_retries,
                                            hold_s=self.cfg.commands.retry_hold_s,
                                        backoff_s=self.cfg.commands.retry_backoff_s)
                continue
            self.stats["sent"] += 1
            if isinstance(c, WakeNode):
                self._set_power(c.node, "waking", p.record.deadline)
            elif isinstance(c, ShutdownNode):
                self._set_power(c.node, "shutting_down", p.record.deadline)
            log.info("sent %s %s: %s", c.KIND, c.command_id, _summary(c))
        if not ok:
            self._save()
        return ok

    def _publish_result(self, r: CommandResult) -> None:
        try:
            self.bus.publish(r)
        except PublishFailed as exc:
            log.error("could not publish the result of %s %s (%s)", r.command_kind, r.command_id, exc.reason)

    # ================================================================ the loop

    def run(self, stop: threading.Event) -> None:
        """Decide whenever something happened, and every cycle_s anyway, until `stop`."""
        gc_at = 0.0
        while not stop.is_set():
            with self.lock:
                wait = max(0.0, self.next_cycle - self.clock())
            self.trigger.wait(min(wait, 1.0))
            if stop.is_set():
                break
            self.trigger.clear()
            try:
                self.step()
            except Exception:  # a bug in one decision must not stop the arbiter; the next cycle retries
                log.exception("decision failed")
            gc_at = self._gc(gc_at)

    def _gc(self, last: float) -> float:
        # A full collection over a large cluster's state pauses for tens of ms, and when it falls inside a
        # reaction it is the reaction's p99. Long-lived state is frozen out of the collector once it is
        # built, and re-collected here, between decisions, every ten minutes so that no cycle leaks.
        now = time.monotonic()
        if last == 0.0 and self.decisions:
            gc.collect()
            gc.freeze()
            return now
        if last and now - last > 600:
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            return now
        return last

    # ================================================================ persistence

    def flush(self) -> None:
        """Write what the loop has not saved yet (on a clean stop)."""
        with self.lock:
            if self.dirty:
                self._save()

    def _save(self) -> None:
        self.dirty = False
        if self.store is None:
            return
        data = {
            "saved_at": self.clock(),
            "paused": self.paused,
            "mode": self.mode,
            "thresholds": {"upper_pct": self.params.upper_pct, "lower_pct": self.params.lower_pct},
            "pinned": sorted(self.pinned),
            "manual_pins": self.manual_pins,
            "unconfirmed": self.unconfirmed,
            "drains": {n: vars(o) for n, o in self.drains.items()},
            "recommendations": {rid: vars(r) for rid, r in self.recommendations.items()},
            # Only what telemetry cannot tell again; a plain online node needs no line.
            "nodes": {
                n.name: {"power": n.power, "drained": n.drained, "drain_power_off": n.drain_power_off,
                         "quarantine_reason": n.quarantine_reason, "quarantined_at": n.quarantined_at,
                         "hold_until": n.hold_until, "power_deadline": n.power_deadline,
                         "power_events": list(n.power_events)}
                for n in self.state.nodes.values()
                if n.power in ("off", "waking", "shutting_down", "quarantined") or n.drained or n.power_events
                or n.hold_until > 0
            },
            "known_up": sorted(n.name for n in self.state.nodes.values()
                               if n.power == "online" or (n.power == "unknown" and n.was_up)),
            "commands": self.log.to_dict(),
            "operator_replies": list(self.operator_replies)[-1000:],
        }
        try:
            self.store.save(data)
        except OSError as exc:
            log.error("could not write the state file %s: %s", self.store.path, exc)

    def _restore(self, data: dict[str, Any] | None, now: float) -> None:
        if not data:
            return
        self.paused = bool(data.get("paused", self.paused))
        self.mode = data.get("mode", self.mode)
        th = data.get("thresholds") or {}
        if th:
            candidate = replace(self.params, **{k: th[k] for k in ("upper_pct", "lower_pct") if k in th})
            try:
                candidate.validate()
                self.params = candidate
            except ValueError as exc:
                log.error("state file thresholds ignored: %s", exc)
        self.pinned = set(data.get("pinned", []))
        self.manual_pins = {k: float(v) for k, v in data.get("manual_pins", {}).items()}
        self.unconfirmed = {k: int(v) for k, v in data.get("unconfirmed", {}).items()}
        self.drains = {n: DrainOrder(**o) for n, o in data.get("drains", {}).items()}
        self.recommendations = {rid: PendingRecommendation(**r) for rid, r in data.get("recommendations", {}).items()}
        for name, d in data.get("nodes", {}).items():
            n = self.state.node(name, now)
            # What telemetry cannot tell: decisions and power transitions in progress.
            if d.get("power") in ("off", "waking", "shutting_down", "quarantined"):
                n.power = d["power"]
            n.drained = bool(d.get("drained"))
            n.drain_power_off = bool(d.get("drain_power_off"))
            n.quarantine_reason = d.get("quarantine_reason", "")
            n.quarantined_at = float(d.get("quarantined_at", 0.0))
            n.hold_until = float(d.get("hold_until", 0.0))
            n.power_deadline = float(d.get("power_deadline", 0.0))
            n.power_events.extend(d.get("power_events", []))
        for name in data.get("known_up", []):
            n = self.state.node(name, now)
            if n.power == "unknown":
                n.was_up = True
        self.log.load(data.get("commands", {}))
        for cid in data.get("operator_replies", []):
            self.operator_replies[cid] = []  # answered before the restart: a replay is acknowledged, not redone
        log.info("restored from %s: %d command(s) in flight, %d pinned VM(s), %d drain(s), mode %s%s",
                 self.store.path if self.store else "?", len(self.log.records), len(self.pinned), len(self.drains),
                 self.mode, ", paused" if self.paused else "")


def _summary(c: Message) -> str:
    if isinstance(c, MigrateVm):
        return f"migrate {c.vm} {c.source} -> {c.target} ({c.reason})"
    if isinstance(c, WakeNode):
        return f"wake {c.node} ({c.reason})"
    if isinstance(c, ShutdownNode):
        return f"shut down {c.node} ({c.reason})"
    return c.KIND


def _record_for(c: Message, now: float, cfg: ArbiterConfig, reason: str) -> InFlight:
    s = cfg.commands
    if isinstance(c, MigrateVm):
        return InFlight(c.command_id, c.KIND, now, now + s.migrate_timeout_s + s.migrate_deadline_slack_s,
                        vm=c.vm, source=c.source, target=c.target, reason=reason)
    timeout = s.wake_timeout_s if isinstance(c, WakeNode) else s.shutdown_timeout_s
    return InFlight(c.command_id, c.KIND, now, now + timeout, node=getattr(c, "node"), reason=reason)
