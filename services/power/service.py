"""WakeNode and ShutdownNode, each carried to a final, proven result.

WakeNode:   online already -> skipped.  Else magic packets -> accepted -> wait
            for the node's NodeOnline -> succeeded (with the boot time) or
            failed ("no NodeOnline within ...") so the arbiter can quarantine it.
ShutdownNode: off already -> skipped.  Active domains, a blind hypervisor, or
            missing/stale telemetry -> rejected (unless an operator forces it).
            Else accepted -> SSH shutdown command -> wait for NodeOffline (or
            telemetry silence and a closed SSH port) -> succeeded or failed.

Every wait ends on evidence or a deadline.  Idempotent by command id: a
replay of a finished command republishes its result and does nothing else;
a redelivery of one in progress waits for it.  A second command for a node
with an operation in progress joins it when it asks the same thing and
waits for it to finish, then is judged afresh, when it asks the opposite.  Several instances may share
the command queue: each also reads its peers' results (peers.py), so a
duplicate that lands on another instance waits for the peer's answer.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from enersis.common.bus import BrokerUnavailable, Delivery, PermanentError, TemporaryError
from enersis.common.messages import CommandResult, NodeOffline, NodeOnline, NodeTelemetry, ShutdownNode, WakeNode

from .checks import NodeStatus, Verdict, probe_verdict, shutdown_verdict, wake_verdict
from .inventory import NodePower, PowerSettings
from .peers import PeerLedger
from .switch import PowerSwitch, SwitchError
from .tracker import NodeTracker, Stopped

log = logging.getLogger("enersis.power.service")

COMMAND_KINDS = frozenset({WakeNode.KIND, ShutdownNode.KIND})
LEDGER_SIZE = 10_000


@dataclass
class _Op:
    command_id: str
    kind: str
    node: str
    done: threading.Event = field(default_factory=threading.Event)
    result: CommandResult | None = None
    published: bool = False


class PowerService:
    def __init__(
        self,
        *,
        nodes: dict[str, NodePower],
        settings: PowerSettings,
        switch: PowerSwitch,
        tracker: NodeTracker,
        publish: Callable[[CommandResult], Any],
        peers: PeerLedger | None = None,
    ):
        self.nodes = nodes
        self.settings = settings
        self.switch = switch
        self.tracker = tracker
        self._publish = publish
        self.peers = peers
        self._lock = threading.Lock()
        self._ops: OrderedDict[str, _Op] = OrderedDict()  # by command id, oldest first
        self._busy: dict[str, _Op] = {}  # node -> the operation running on it

    # ---------------------------------------------------------------- bus handlers

    def on_telemetry(self, delivery: Delivery) -> None:
        """Inline on the bus I/O thread: fold and return."""
        if isinstance(delivery.message, (NodeTelemetry, NodeOnline, NodeOffline)):
            self.tracker.observe(delivery.message)

    def stop(self) -> None:
        """End every wait now; commands in progress go back to the queue unanswered."""
        self.tracker.stop()
        if self.peers is not None:
            self.peers.stop()

    def on_peer_result(self, delivery: Delivery) -> None:
        """Inline on the bus I/O thread: another instance's WakeNode/ShutdownNode result."""
        if self.peers is not None and isinstance(delivery.message, CommandResult):
            self.peers.observe(delivery.message, delivery.envelope.sender)

    def on_command(self, delivery: Delivery) -> None:
        """On a worker thread; returns (ack) once the command's final result is published."""
        cmd = delivery.message
        if not isinstance(cmd, (WakeNode, ShutdownNode)):
            raise PermanentError(f"the power service handles WakeNode and ShutdownNode, not {cmd.KIND}")
        try:
            if self._done_by_peer(cmd, delivery.redelivered):
                return
        except Stopped:
            raise TemporaryError("the power service is stopping") from None
        op, earlier = self._register(cmd)
        if earlier is not None:
            self._replay(cmd, earlier)
            return
        try:
            result = self._one_at_a_time(cmd, op)
        except Stopped:
            # No verdict: forget the command so its redelivery (here after a restart, or on a peer) does it.
            log.info("%s %s for %s: stopping before the outcome was known; it goes back to the queue",
                     cmd.KIND, cmd.command_id, cmd.node)
            with self._lock:
                self._ops.pop(cmd.command_id, None)
                if self._busy.get(cmd.node) is op:
                    del self._busy[cmd.node]
            op.done.set()
            raise TemporaryError("the power service is stopping") from None
        except Exception as exc:  # a bug must still end in a result, not a silent requeue loop
            log.exception("%s %s for %s: unexpected error", cmd.KIND, cmd.command_id, cmd.node)
            result = self._result(cmd, "failed", f"internal error in the power service: {type(exc).__name__}: {exc}",
                                  retryable=True)
        finally:
            with self._lock:
                if self._busy.get(cmd.node) is op:
                    del self._busy[cmd.node]
        op.result = result
        try:
            self._publish_final(op)
        finally:
            op.done.set()  # after publishing, so a waiting redelivery knows whether it still has to

    # ---------------------------------------------------------------- idempotency

    def _register(self, cmd: WakeNode | ShutdownNode) -> tuple[_Op, _Op | None]:
        with self._lock:
            earlier = self._ops.get(cmd.command_id)
            if earlier is not None:
                if (earlier.kind, earlier.node) != (cmd.KIND, cmd.node):
                    raise PermanentError(f"command_id {cmd.command_id!r} was already used for {earlier.kind} "
                                         f"of {earlier.node}; a new command needs a new command_id")
                return earlier, earlier
            op = _Op(cmd.command_id, cmd.KIND, cmd.node)
            self._ops[cmd.command_id] = op
            while len(self._ops) > LEDGER_SIZE:
                oldest_id, oldest = next(iter(self._ops.items()))
                if not oldest.done.is_set():
                    break
                del self._ops[oldest_id]
            return op, None

    def _claim(self, op: _Op) -> _Op | None:
        """Make `op` the node's operation here; or return the one that already is."""
        with self._lock:
            busy = self._busy.get(op.node)
            if busy is None or busy is op:
                self._busy[op.node] = op
                return None
            return busy

    def _one_at_a_time(self, cmd: WakeNode | ShutdownNode, op: _Op) -> CommandResult:
        """One power operation per node at a time, across this instance and its peers.

        The same request joins the one in progress (its result, once); the opposite one waits
        for it to end and is then judged afresh -- a wake queued behind a shutdown wakes the node
        again instead of being refused, which the arbiter would take for a broken node.
        """
        waited_for_peer = {cmd.command_id}  # a peer's op with our id is one we are taking over
        while True:
            busy = self._claim(op)
            if busy is not None:
                if busy.kind == cmd.KIND:
                    joined = self._join(cmd, busy.command_id, "", lambda: busy.done.wait() and busy.result)
                    if joined is not None:
                        return joined
                else:
                    self._wait_behind(cmd, busy.kind, busy.command_id, "", busy.done.wait)
                continue
            peer = self.peers.busy(cmd.node) if self.peers is not None else None
            if peer is None or peer.command_id in waited_for_peer:
                return self._execute(cmd)
            waited_for_peer.add(peer.command_id)
            wait_peer = lambda: self.peers.wait_final(peer, self.budget(peer.kind))  # noqa: E731
            if peer.kind == cmd.KIND:
                joined = self._join(cmd, peer.command_id, f" on {peer.sender}", wait_peer)
                if joined is not None:
                    return joined
                log.warning("%s %s: %s gave no result for %s in time; doing it here", cmd.KIND,
                            cmd.command_id, peer.sender, peer.command_id)
                return self._execute(cmd)
            self._wait_behind(cmd, peer.kind, peer.command_id, f" on {peer.sender}", wait_peer)

    def _replay(self, cmd: WakeNode | ShutdownNode, earlier: _Op) -> None:
        if not earlier.done.is_set():
            # A redelivery of a command in progress here (e.g. after a broker reconnect): hold this
            # delivery until the work ends so it is acked only then; the work itself publishes the result.
            log.info("%s %s for %s is already in progress; waiting for it", cmd.KIND, cmd.command_id, cmd.node)
            earlier.done.wait()
            if earlier.result is None:
                raise TemporaryError("the power service is stopping")
        else:
            log.info("%s %s for %s was already done (%s); republishing its result, doing nothing",
                     cmd.KIND, cmd.command_id, cmd.node, earlier.result.status if earlier.result else "?")
            earlier.published = False
        if not earlier.published:
            self._publish_final(earlier)

    def _done_by_peer(self, cmd: WakeNode | ShutdownNode, redelivered: bool) -> bool:
        """A command another instance accepted: wait for its answer (or republish it) instead of redoing it."""
        peer = self.peers.get(cmd.command_id) if self.peers is not None else None
        if peer is None:
            return False
        with self._lock:
            if cmd.command_id in self._ops:
                return False  # ours after all: the local ledger decides
        if (peer.kind, peer.node) != (cmd.KIND, cmd.node):
            raise PermanentError(f"command_id {cmd.command_id!r} was already used for {peer.kind} of {peer.node}; "
                                 "a new command needs a new command_id")
        if peer.result is None and redelivered:
            # The broker hands a delivery on only when its holder lost it (died, or its connection did):
            # waiting for that peer could mean waiting for nobody.
            log.warning("%s %s for %s was in progress on %s and came back from the broker; doing it here",
                        cmd.KIND, cmd.command_id, cmd.node, peer.sender)
            return False
        if peer.result is None:
            log.info("%s %s for %s is in progress on %s; waiting for its result", cmd.KIND, cmd.command_id,
                     cmd.node, peer.sender)
            answer = self.peers.wait_final(peer, self.budget(cmd.KIND))  # type: ignore[union-attr]
            if answer is None:
                log.warning("%s %s: %s gave no result in time; doing it here", cmd.KIND, cmd.command_id, peer.sender)
                return False
            log.info("%s %s: %s answered %s; nothing to do here", cmd.KIND, cmd.command_id, peer.sender, answer.status)
            return True
        log.info("%s %s for %s was already done by %s (%s); republishing its result, doing nothing",
                 cmd.KIND, cmd.command_id, cmd.node, peer.sender, peer.result.status)
        try:
            self._publish(peer.result)
        except (BrokerUnavailable, OSError) as exc:
            raise TemporaryError(f"could not republish the result of {cmd.KIND} {cmd.command_id}: {exc}") from exc
        return True

    def budget(self, kind: str) -> float:
        """How long another operation of `kind` may take, at most, before we stop waiting for it."""
        s = self.settings
        wait = s.wake_timeout_s if kind == WakeNode.KIND else s.shutdown_timeout_s + s.stale_after_s
        return wait + s.ssh_connect_timeout_s + s.ssh_command_timeout_s + 30.0

    def _wait_behind(self, cmd: WakeNode | ShutdownNode, kind: str, other_id: str, where: str,
                     wait: Callable[[], Any]) -> None:
        verb = "waking" if kind == WakeNode.KIND else "shutting down"
        log.info("%s %s: %s is %s (command %s%s); waiting for that to finish first", cmd.KIND, cmd.command_id,
                 cmd.node, verb, other_id, where)
        wait()

    def _join(self, cmd: WakeNode | ShutdownNode, other_id: str, where: str,
              wait: Callable[[], CommandResult | None]) -> CommandResult | None:
        """Share the result of the same request in progress; None: it ended without one."""
        self._accepted(cmd, f"joining {cmd.KIND} {other_id}{where} already in progress for {cmd.node}",
                       {"joined": other_id})
        first = wait()
        if not first:
            return None
        return self._result(cmd, first.status, first.reason, retryable=first.retryable,
                            details={**first.details, "joined": other_id})

    # ---------------------------------------------------------------- the work

    def _execute(self, cmd: WakeNode | ShutdownNode) -> CommandResult:
        node = self.nodes.get(cmd.node)
        if node is None:
            return self._result(cmd, "rejected", f"{cmd.node} is not in this power service's inventory "
                                                 f"(add [nodes.{cmd.node}] to power.toml)")
        if isinstance(cmd, WakeNode):
            return self._wake(cmd, node)
        return self._shutdown(cmd, node)

    def _wake(self, cmd: WakeNode, node: NodePower) -> CommandResult:
        s = self.settings
        verdict = wake_verdict(self.tracker.status(node.name), s.stale_after_s)
        if verdict.action == "skip":
            log.info("WakeNode %s: skipped: %s", cmd.command_id, verdict.reason)
            return self._result(cmd, "skipped", verdict.reason)
        sent_at = self.tracker.now()
        try:
            packets = self.switch.wake(node)
        except SwitchError as exc:
            log.warning("WakeNode %s for %s failed: %s", cmd.command_id, node.name, exc.reason)
            return self._result(cmd, "failed", exc.reason, retryable=exc.retryable)
        where = f"{node.wol_broadcast}:{node.wol_port}"
        self._accepted(cmd, f"sent {packets} magic packet(s) for {node.mac} to {where}; "
                            f"waiting up to {s.wake_timeout_s:.0f}s for NodeOnline",
                       {"packets": packets, "mac": node.mac})

        def node_is_up() -> tuple[str, float, str] | None:
            ev = self.tracker.events_since(node.name, sent_at)
            if "online" in ev:
                return ("NodeOnline", ev["online_at"], ev["online"].boot_id)  # type: ignore[union-attr]
            # Telemetry also proves the node runs (the NodeOnline may have been lost, or it was up already),
            # unless the node said goodbye after it.
            if "telemetry" in ev and ev.get("offline_at", -1.0) < ev["telemetry_at"]:  # type: ignore[operator]
                return ("NodeTelemetry", ev["telemetry_at"], ev["telemetry"].boot_id)  # type: ignore[union-attr]
            return None

        found = self.tracker.wait(node_is_up, s.wake_timeout_s)
        if found is None:
            reason = (f"no NodeOnline from {node.name} within {s.wake_timeout_s:.0f}s after {packets} magic packet(s) "
                      f"for {node.mac} to {where}")
            log.warning("WakeNode %s: failed: %s", cmd.command_id, reason)
            return self._result(cmd, "failed", reason, details={"packets": packets, "waited_s": s.wake_timeout_s})
        evidence, at, boot_id = found
        boot_s = round(at - sent_at, 3)
        log.info("WakeNode %s: %s is up after %.2fs (%s, boot %s)", cmd.command_id, node.name, boot_s, evidence, boot_id)
        return self._result(cmd, "succeeded", f"{node.name} is up after {boot_s:.1f}s ({evidence})",
                            details={"boot_s": boot_s, "evidence": evidence, "boot_id": boot_id, "packets": packets})

    def _shutdown(self, cmd: ShutdownNode, node: NodePower) -> CommandResult:
        s = self.settings
        verdict = self._shutdown_verdict(cmd, node)
        if verdict.action in ("skip", "reject"):
            status = "skipped" if verdict.action == "skip" else "rejected"
            log.info("ShutdownNode %s: %s: %s", cmd.command_id, status, verdict.reason)
            return self._result(cmd, status, verdict.reason, details=verdict.details)
        if verdict.details.get("forced"):
            log.warning("ShutdownNode %s for %s: %s", cmd.command_id, node.name, verdict.reason)
        self._accepted(cmd, f"running the shutdown command on {node.ssh_target}"
                            + (f" ({verdict.reason})" if verdict.reason else ""), dict(verdict.details))
        started = self.tracker.now()
        try:
            sent = self.switch.shutdown(node)
        except SwitchError as exc:
            log.warning("ShutdownNode %s for %s failed: %s", cmd.command_id, node.name, exc.reason)
            return self._result(cmd, "failed", exc.reason, retryable=exc.retryable, details={"command_ran": exc.ran})
        if sent.exit_status not in (None, 0):
            reason = f"shutdown command on {node.ssh_target} exited with status {sent.exit_status}"
            if sent.output:
                reason += f": {sent.output}"
            log.warning("ShutdownNode %s: failed: %s", cmd.command_id, reason)
            return self._result(cmd, "failed", reason, details={"ssh_exit": sent.exit_status})
        return self._confirm_down(cmd, node, started, sent.exit_status)

    def _shutdown_verdict(self, cmd: ShutdownNode, node: NodePower) -> Verdict:
        s = self.settings

        def judge() -> Verdict:
            return shutdown_verdict(self.tracker.status(node.name), stale_after_s=s.stale_after_s,
                                    force=cmd.force, issued_by=cmd.issued_by)

        verdict = judge()
        while verdict.action == "wait":
            since = self.tracker.now()
            log.info("ShutdownNode %s: no telemetry from %s yet; waiting up to %.1fs for some",
                     cmd.command_id, node.name, verdict.wait_s)
            self.tracker.wait(lambda: "telemetry" in self.tracker.events_since(node.name, since), verdict.wait_s)
            verdict = judge()
        if verdict.action == "probe":
            status: NodeStatus = self.tracker.status(node.name)
            verdict = probe_verdict(status, self.switch.ssh_port_open(node), verdict.reason)
        return verdict

    def _confirm_down(self, cmd: ShutdownNode, node: NodePower, started: float, exit_status: int | None) -> CommandResult:
        s = self.settings
        deadline = started + s.shutdown_timeout_s
        status = self.tracker.status(node.name)
        # Telemetry that stopped for two publish periods means the agent is gone (or cut off).
        silence_s = max(2 * status.publish_interval_s, 3.0)

        def said_goodbye() -> float | None:
            return self.tracker.events_since(node.name, started).get("offline_at")  # type: ignore[return-value]

        details: dict[str, Any] = {"ssh_exit": -1 if exit_status is None else exit_status}
        while True:
            now = self.tracker.now()
            at = self.tracker.wait(said_goodbye, min(1.0, max(0.0, deadline - now)))
            if at is not None:
                down_s = round(at - started, 3)
                log.info("ShutdownNode %s: %s is down after %.2fs (NodeOffline)", cmd.command_id, node.name, down_s)
                return self._result(cmd, "succeeded", f"{node.name} is down after {down_s:.1f}s (NodeOffline)",
                                    details={**details, "down_s": down_s, "evidence": "NodeOffline"})
            now = self.tracker.now()
            last = self.tracker.last_telemetry_at(node.name)
            quiet_for = now - max(started, last if last is not None else started)
            port_open: bool | None = None
            if quiet_for >= silence_s:
                port_open = self.switch.ssh_port_open(node, timeout=1.0)
                if not port_open:
                    down_s = round(now - started, 3)
                    log.info("ShutdownNode %s: %s is down after %.2fs (silent, SSH port closed)",
                             cmd.command_id, node.name, down_s)
                    return self._result(cmd, "succeeded", f"{node.name} is down after {down_s:.1f}s "
                                                          "(telemetry silent and SSH port closed)",
                                        details={**details, "down_s": down_s, "evidence": "silence+ssh-closed"})
            if self.tracker.now() >= deadline:
                why = (f"telemetry still arriving (last {now - last:.1f}s ago)" if quiet_for < silence_s and last is not None
                       else "no NodeOffline, and its SSH port still answers")
                reason = f"{node.name} not confirmed down within {s.shutdown_timeout_s:.0f}s of the shutdown command: {why}"
                log.warning("ShutdownNode %s: failed: %s", cmd.command_id, reason)
                return self._result(cmd, "failed", reason, details={**details, "waited_s": s.shutdown_timeout_s})

    # ---------------------------------------------------------------- results

    def _result(self, cmd: WakeNode | ShutdownNode, status: str, reason: str, *, retryable: bool = False,
                details: dict[str, Any] | None = None) -> CommandResult:
        return CommandResult(command_id=cmd.command_id, command_kind=cmd.KIND, status=status, reason=reason,
                             node=cmd.node, retryable=retryable, details=dict(details or {}))

    def _accepted(self, cmd: WakeNode | ShutdownNode, reason: str, details: dict[str, Any] | None = None) -> None:
        log.info("%s %s for %s accepted: %s", cmd.KIND, cmd.command_id, cmd.node, reason)
        try:
            self._publish(self._result(cmd, "accepted", reason, details=details))
        except (BrokerUnavailable, OSError) as exc:
            # Only a progress note: the work goes on and its final result is what must arrive.
            log.warning("%s %s: could not publish 'accepted' (%s); carrying on", cmd.KIND, cmd.command_id, exc)

    def _publish_final(self, op: _Op) -> None:
        assert op.result is not None
        try:
            self._publish(op.result)
        except (BrokerUnavailable, OSError) as exc:
            # The command stays unacked and comes back; the ledger then only republishes this result.
            raise TemporaryError(f"could not publish the result of {op.kind} {op.command_id}: {exc}") from exc
        op.published = True

