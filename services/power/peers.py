"""What the other power instances sharing the command queue are doing, read from their results.

Instances do not talk to each other; each publishes `accepted` before it
waits and a final result after.  Folding the others' WakeNode/ShutdownNode
results lets an instance that receives a duplicate (same command id) wait
for the peer's answer instead of doing the work again, and refuse an
opposite command for a node a peer is working on.  Two copies delivered to
two instances in the same few milliseconds, before either said `accepted`,
can still both run: for these commands that is harmless (a second magic
packet, a second `shutdown` of a node already going down).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from enersis.common.messages import CommandResult

from .tracker import Stopped

WATCHED_KINDS = frozenset({"WakeNode", "ShutdownNode"})


@dataclass
class PeerOp:
    command_id: str
    kind: str
    node: str
    sender: str
    result: CommandResult | None = None  # the peer's final result, once seen
    accepted_at: float = 0.0  # monotonic


class PeerLedger:
    def __init__(self, me: str, *, max_age_s: float = 3600.0, size: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        self.me = me
        self._clock = clock
        # A peer that died after `accepted` never sends a final: past this age its work no longer counts.
        self.max_age_s = max_age_s
        self._size = size
        self._cond = threading.Condition()
        self._ops: OrderedDict[str, PeerOp] = OrderedDict()
        self._busy: dict[str, PeerOp] = {}  # node -> the peer operation running on it
        self._stopped = False

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def observe(self, result: CommandResult, sender: str) -> None:
        """Inline on the bus I/O thread."""
        if result.command_kind not in WATCHED_KINDS:
            return
        with self._cond:
            op = self._ops.get(result.command_id)
            if sender == self.me:
                # Our own final for a peer's command means we took it over: it is settled.
                if op is not None and result.final and op.result is None:
                    op.result = result
                    if self._busy.get(op.node) is op:
                        del self._busy[op.node]
                    self._cond.notify_all()
                return
            if op is None:
                op = PeerOp(result.command_id, result.command_kind, result.node, sender)
                self._ops[result.command_id] = op
                while len(self._ops) > self._size:
                    self._ops.popitem(last=False)
            if result.final:
                op.result = result
                if self._busy.get(op.node) is op:
                    del self._busy[op.node]
            elif op.result is None and "joined" not in result.details and result.status == "accepted":
                # Only an instance doing the work counts as busy: one that joined waits on it, and
                # waiting on a waiter could go round in a circle.
                op.accepted_at = self._clock()
                self._busy[op.node] = op
            self._cond.notify_all()

    def get(self, command_id: str) -> PeerOp | None:
        with self._cond:
            return self._ops.get(command_id)

    def busy(self, node: str) -> PeerOp | None:
        with self._cond:
            op = self._busy.get(node)
            if op is not None and self._clock() - op.accepted_at > self.max_age_s:
                del self._busy[node]
                return None
            return op

    def wait_final(self, op: PeerOp, timeout: float) -> CommandResult | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while op.result is None:
                if self._stopped:
                    raise Stopped()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return op.result
