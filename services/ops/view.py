"""The cluster as the bus shows it: telemetry, lifecycle and results folded into one view.

Pure: no pika, no clock.  Every fold takes the message's own timestamp and
the caller passes `now_ms` when asking for derived state, so `enersis status`,
`enersis send` and the demo's live view read the same facts the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from enersis.common.codec import Envelope
from enersis.common.messages import (
    CommandResult,
    DomainSample,
    NodeOffline,
    NodeOnline,
    NodeTelemetry,
    Recommendation,
)

# A node whose telemetry is older than this many publish intervals is "stale".
STALE_AFTER_INTERVALS = 3.0


@dataclass
class NodeRecord:
    name: str
    telemetry: NodeTelemetry | None = None
    telemetry_ts_ms: int = 0
    lifecycle: str = ""  # "online" | "offline" | ""
    lifecycle_ts_ms: int = 0
    offline_reason: str = ""
    power: str = ""  # "waking" | "shutting_down" | "off" | "" (from power results)
    power_ts_ms: int = 0
    power_before: str = ""
    publish_interval_s: float = 5.0

    def state(self, now_ms: int) -> str:
        """online | waking | shutting_down | off | offline | stale | hypervisor-down | unknown."""
        alive_ts = max(self.telemetry_ts_ms, self.lifecycle_ts_ms if self.lifecycle == "online" else 0)
        if self.power == "shutting_down":
            return "shutting_down"  # it may still report until the power service says it is off
        if self.power in ("off", "waking") and self.power_ts_ms >= alive_ts:
            return self.power  # a sign of life newer than the power result wins
        if self.lifecycle == "offline" and self.lifecycle_ts_ms >= self.telemetry_ts_ms:
            return "offline"  # the agent said goodbye; the machine may still be on
        stale_s = STALE_AFTER_INTERVALS * max(self.publish_interval_s, 0.1)
        if self.lifecycle == "online" and self.lifecycle_ts_ms > self.telemetry_ts_ms:
            # Just booted: its hello is newer than any report (which may be from before a power-off).
            return "stale" if (now_ms - self.lifecycle_ts_ms) / 1000 > stale_s else "online"
        if self.telemetry is not None:
            if (now_ms - self.telemetry_ts_ms) / 1000 > stale_s:
                return "stale"
            return "online" if self.telemetry.hypervisor_ok else "hypervisor-down"
        return "unknown"

    @property
    def cpu_pct(self) -> float:
        return self.telemetry.cpu_pct if self.telemetry else 0.0

    @property
    def vms(self) -> list[DomainSample]:
        return list(self.telemetry.domains) if self.telemetry else []


@dataclass
class CommandRecord:
    command_id: str
    kind: str
    status: str
    node: str = ""
    vm: str = ""
    reason: str = ""
    first_ts_ms: int = 0
    last_ts_ms: int = 0
    details: dict = field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.status != "accepted"


@dataclass
class ClusterView:
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    commands: dict[str, CommandRecord] = field(default_factory=dict)
    recommendations: list[Recommendation] = field(default_factory=list)
    messages_seen: int = 0

    def node(self, name: str) -> NodeRecord:
        rec = self.nodes.get(name)
        if rec is None:
            rec = self.nodes[name] = NodeRecord(name)
        return rec

    # ------------------------------------------------------------ folding

    def apply(self, env: Envelope) -> None:
        self.messages_seen += 1
        msg, ts = env.message, env.ts_ms
        if isinstance(msg, NodeTelemetry):
            rec = self.node(msg.node)
            if ts >= rec.telemetry_ts_ms:
                rec.telemetry, rec.telemetry_ts_ms = msg, ts
                rec.publish_interval_s = msg.publish_interval_s or rec.publish_interval_s
        elif isinstance(msg, NodeOnline):
            rec = self.node(msg.node)
            if ts >= rec.lifecycle_ts_ms:
                rec.lifecycle, rec.lifecycle_ts_ms = "online", ts
                rec.publish_interval_s = msg.publish_interval_s or rec.publish_interval_s
                if rec.telemetry is not None and rec.telemetry.boot_id != msg.boot_id and ts > rec.telemetry_ts_ms:
                    rec.telemetry = None  # a report from before this boot says nothing about its VMs now
        elif isinstance(msg, NodeOffline):
            rec = self.node(msg.node)
            if ts >= rec.lifecycle_ts_ms:
                rec.lifecycle, rec.lifecycle_ts_ms, rec.offline_reason = "offline", ts, msg.reason
        elif isinstance(msg, CommandResult):
            self._apply_result(msg, ts)
        elif isinstance(msg, Recommendation):
            self.recommendations.append(msg)
            del self.recommendations[:-50]

    def _apply_result(self, msg: CommandResult, ts: int) -> None:
        cmd = self.commands.get(msg.command_id)
        if cmd is None:
            cmd = self.commands[msg.command_id] = CommandRecord(
                msg.command_id, msg.command_kind, msg.status, msg.node, msg.vm, msg.reason, ts, ts, dict(msg.details)
            )
        elif not (cmd.final and msg.status == "accepted"):  # a late "accepted" never reopens a final result
            cmd.status, cmd.reason, cmd.last_ts_ms = msg.status, msg.reason, max(ts, cmd.last_ts_ms)
            cmd.node, cmd.vm = msg.node or cmd.node, msg.vm or cmd.vm
            cmd.details.update(msg.details)
        if not msg.node or msg.command_kind not in ("WakeNode", "ShutdownNode"):
            return
        rec = self.node(msg.node)
        if ts < rec.power_ts_ms:
            return  # an older result arriving late changes nothing
        before = rec.power
        if msg.status == "accepted":
            rec.power_before = before
            rec.power = "waking" if msg.command_kind == "WakeNode" else "shutting_down"
        elif msg.command_kind == "ShutdownNode":
            if msg.status == "succeeded":
                rec.power = "off"
            elif before == "shutting_down":
                rec.power = rec.power_before if rec.power_before != "shutting_down" else ""
        else:  # WakeNode final
            if msg.status == "succeeded" or msg.status == "skipped":
                rec.power = ""  # up (or already up): its own telemetry and lifecycle decide from here
            elif msg.status == "failed":
                rec.power = "off" if before in ("waking", "off") else before
            elif before == "waking":
                rec.power = rec.power_before if rec.power_before != "waking" else ""
        rec.power_ts_ms = ts

    # ------------------------------------------------------------ questions

    def where_is(self, vm: str, now_ms: int) -> str | None:
        """The node whose freshest telemetry lists `vm` as running (newest wins during a migration)."""
        best: tuple[int, str] | None = None
        for rec in self.nodes.values():
            if rec.telemetry is None or rec.state(now_ms) in ("off", "offline", "stale"):
                continue
            if any(d.name == vm and d.running for d in rec.telemetry.domains):
                if best is None or rec.telemetry_ts_ms > best[0]:
                    best = (rec.telemetry_ts_ms, rec.name)
        return best[1] if best else None

    def in_flight(self) -> list[CommandRecord]:
        return sorted((c for c in self.commands.values() if not c.final), key=lambda c: c.first_ts_ms)

    def max_publish_interval_s(self) -> float:
        return max((r.publish_interval_s for r in self.nodes.values()), default=0.0)
