"""Folds telemetry and lifecycle events into what the power service knows about each node.

Fed from the service's private telemetry queue (on the bus I/O thread: quick
work only); read by command handlers, which also *wait* here for evidence
(a NodeOnline after a magic packet, a NodeOffline after a shutdown) with a
deadline, instead of sleeping a fixed time.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from enersis.common.messages import Message, NodeOffline, NodeOnline, NodeTelemetry

from .checks import NodeStatus

T = TypeVar("T")


class Stopped(Exception):
    """The service is stopping: a wait ends without a verdict (the command goes back to the queue)."""


@dataclass
class _Seen:
    telemetry: NodeTelemetry | None = None
    telemetry_at: float | None = None
    online: NodeOnline | None = None
    online_at: float | None = None
    offline: NodeOffline | None = None
    offline_at: float | None = None
    publish_interval_s: float = 5.0
    boot_ids: set[str] = field(default_factory=set)


class NodeTracker:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._cond = threading.Condition()
        self._nodes: dict[str, _Seen] = {}
        self._listening_since: float | None = None
        self._stopped = False

    # -- feeding

    def listening(self) -> None:
        """The telemetry subscription is live (called again after a reconnect: keep the first time)."""
        with self._cond:
            if self._listening_since is None:
                self._listening_since = self._clock()

    def observe(self, message: Message) -> None:
        with self._cond:
            now = self._clock()
            if self._listening_since is None:
                self._listening_since = now
            seen = self._nodes.setdefault(message.node, _Seen())  # type: ignore[attr-defined]
            if isinstance(message, NodeTelemetry):
                seen.telemetry, seen.telemetry_at = message, now
                seen.publish_interval_s = message.publish_interval_s or seen.publish_interval_s
                seen.boot_ids.add(message.boot_id)
            elif isinstance(message, NodeOnline):
                seen.online, seen.online_at = message, now
                seen.publish_interval_s = message.publish_interval_s or seen.publish_interval_s
                seen.boot_ids.add(message.boot_id)
            elif isinstance(message, NodeOffline):
                seen.offline, seen.offline_at = message, now
            else:
                return
            self._cond.notify_all()

    # -- reading

    def now(self) -> float:
        return self._clock()

    def status(self, node: str) -> NodeStatus:
        with self._cond:
            return self._status(node, self._clock())

    def _status(self, node: str, now: float) -> NodeStatus:
        listening = 0.0 if self._listening_since is None else now - self._listening_since
        seen = self._nodes.get(node)
        if seen is None:
            return NodeStatus(node=node, listening_s=listening)
        t = seen.telemetry

        def age(at: float | None) -> float | None:
            return None if at is None else now - at

        return NodeStatus(
            node=node,
            telemetry_age_s=age(seen.telemetry_at),
            hypervisor_ok=t.hypervisor_ok if t else True,
            hypervisor_error=t.error if t else "",
            domains=tuple(t.domains) if t else (),
            online_age_s=age(seen.online_at),
            offline_age_s=age(seen.offline_at),
            publish_interval_s=seen.publish_interval_s,
            listening_s=listening,
        )

    def events_since(self, node: str, since: float) -> dict[str, object]:
        """What arrived from `node` at or after monotonic time `since` (the latest of each kind)."""
        with self._cond:
            return self._events_since(node, since)

    def _events_since(self, node: str, since: float) -> dict[str, object]:
        seen = self._nodes.get(node)
        out: dict[str, object] = {}
        if seen is None:
            return out
        if seen.online_at is not None and seen.online_at >= since:
            out["online"], out["online_at"] = seen.online, seen.online_at
        if seen.offline_at is not None and seen.offline_at >= since:
            out["offline"], out["offline_at"] = seen.offline, seen.offline_at
        if seen.telemetry_at is not None and seen.telemetry_at >= since:
            out["telemetry"], out["telemetry_at"] = seen.telemetry, seen.telemetry_at
        return out

    def last_telemetry_at(self, node: str) -> float | None:
        with self._cond:
            seen = self._nodes.get(node)
            return seen.telemetry_at if seen else None

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def wait(self, check: Callable[[], T | None], timeout: float) -> T | None:
        """Re-run `check` whenever something arrives until it returns a value or `timeout` passes.

        Raises Stopped once stop() is called, so a stopping service does not sit out a long wake.
        """
        deadline = self._clock() + max(0.0, timeout)
        with self._cond:
            while True:
                if self._stopped:
                    raise Stopped()
                value = check()
                if value:
                    return value
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
