"""From the sampler's state to messages, and the agent's publishing loop.

Publishing keeps nothing but the latest state: each period builds one
NodeTelemetry from the sampler's newest NodeState and tries to publish it
until the next period; if the broker is down it is dropped and the next
period tries with fresher data.  So a long outage costs memory for one
message, and the first telemetry after it is current, not a backlog.

Lifecycle: NodeOnline once the first measurement is in (and again whenever
the hypervisor comes back after being unreachable), NodeOffline on stop.
Every NodeTelemetry carries the whole inventory of the node, so a lost
message heals itself at the next period.

What a NodeTelemetry says, for its consumers:
- cpu_pct: the node's load, mean over window_s; cpu_pct_latest: the last sample;
- each domain's cpu_node_pct / cpu_vcpu_pct: means over the same window, so
  they add up to cpu_pct (a domain that just appeared reads 0 until measured);
- hypervisor_ok false: `error` says why, and load and domains are the LAST
  KNOWN ones (an unreachable node never looks empty or idle);
- seq grows by one per attempt: a gap is telemetry dropped while the broker
  was down, never sent late.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from enersis.common.bus import BrokerUnavailable
from enersis.common.messages import DomainSample, Message, NodeOffline, NodeOnline, NodeTelemetry

from .sampler import NodeState, Sampler

log = logging.getLogger("enersis.agent.telemetry")

STALL_INTERVALS = 5  # a sample older than this many intervals (at least 2 s): the hypervisor hangs
REMIND_EVERY_S = 60.0  # while the broker is down, say so again this often (not at every retry)


class Bus(Protocol):
    """What the agent needs from the broker plumbing (common.bus.Publisher)."""

    def publish(self, message: Message, *, retry_for_s: float | None = None) -> object: ...


@dataclass(frozen=True)
class Identity:
    node: str
    boot_id: str
    agent_version: str
    sample_interval_s: float
    publish_interval_s: float
    window_s: float


def _r(x: float) -> float:
    return round(x, 2)


def telemetry_message(ident: Identity, state: NodeState, seq: int) -> NodeTelemetry:
    facts = state.facts
    return NodeTelemetry(
        node=ident.node,
        seq=seq,
        boot_id=ident.boot_id,
        hypervisor_ok=state.hypervisor_ok,
        hypervisor_type=facts.hypervisor_type if facts else "",
        cpus=facts.cpus if facts else 0,
        mhz=facts.mhz if facts else 0,
        mem_total_kib=facts.mem_total_kib if facts else 0,
        mem_free_kib=facts.mem_free_kib if facts else 0,
        cpu_pct=_r(state.cpu_pct_mean),
        cpu_pct_latest=_r(state.cpu_pct_latest),
        window_s=ident.window_s,
        sample_interval_s=ident.sample_interval_s,
        publish_interval_s=ident.publish_interval_s,
        domains=[
            DomainSample(d.reading.name, d.reading.uuid, d.reading.state, d.reading.vcpus,
                         d.reading.mem_max_kib, d.reading.mem_kib, _r(d.cpu_node_pct), _r(d.cpu_vcpu_pct))
            for d in state.domains
            if not d.reading.host
        ],
        agent_version=ident.agent_version,
        error=state.error[:500],
    )


def online_message(ident: Identity, state: NodeState) -> NodeOnline:
    return NodeOnline(
        node=ident.node,
        boot_id=ident.boot_id,
        hypervisor_ok=state.hypervisor_ok,
        hypervisor_type=state.facts.hypervisor_type if state.facts else "",
        domain_count=sum(1 for d in state.domains if not d.reading.host),
        agent_version=ident.agent_version,
        publish_interval_s=ident.publish_interval_s,
    )


class Agent:
    """Sampling thread + publishing loop for one node.  `run(stop)` until stop is set."""

    def __init__(
        self,
        ident: Identity,
        sampler: Sampler,
        bus: Bus,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.ident = ident
        self.sampler = sampler
        self.bus = bus
        self.clock = clock
        self.seq = 0
        self.published = 0  # telemetry messages the broker confirmed
        self.dropped = 0  # telemetry messages given up while the broker was down
        self._online_ok: bool | None = None  # None: not announced yet; False: announced, hypervisor not ok since
        self._broker_ok = True
        self._down_since: float | None = None  # clock time of the first failure of this outage
        self._reminded_at = 0.0
        self._stalled = False
        self._sampling: threading.Thread | None = None
        self.offline_reason = "agent stopped"  # the entry point sets it from the signal received

    def run(self, stop: threading.Event) -> None:
        self._sampling = threading.Thread(target=self.sampler.run, args=(stop,), name="sampler", daemon=True)
        self._sampling.start()
        try:
            self._publish_loop(stop)
        finally:
            stop.set()
            self._sampling.join(5)
            self._offline(self.offline_reason)

    def _publish_loop(self, stop: threading.Event) -> None:
        period = self.ident.publish_interval_s
        # While the broker is down, retry often with the newest state (not the
        # one that failed), so the first message after an outage is current.
        retry = min(1.0, period)
        # The first telemetry goes out right after the first measurement (two
        # readings), so a freshly booted node is visible at once rather than one
        # period later, and never with a made-up 0 % load.
        def first_ready() -> bool:
            st = self.sampler.latest()
            return stop.is_set() or (st is not None and (st.measured or not st.hypervisor_ok))

        with self.sampler.sampled:
            self.sampler.sampled.wait_for(first_ready, timeout=max(period, 3 * self.ident.sample_interval_s))
        next_t = self.clock()
        while not stop.is_set():
            state = self.sampler.latest()
            # Down: one connection attempt per try (no retry storm, no log storm); up: a short
            # budget rides out a dropped connection.
            ok = state is not None and self.publish_once(state, budget_s=retry if self._broker_ok else 0.0)
            now = self.clock()
            if not ok:
                next_t = now + retry
            else:
                next_t += period
                if now >= next_t or next_t - now > period:  # a publish that hung, or a clock jump: no burst
                    next_t = now + period
            stop.wait(max(0.0, next_t - now))

    def publish_once(self, state: NodeState, *, budget_s: float) -> bool:
        """NodeOnline if due, then one NodeTelemetry of `state`.  False if the broker was unreachable."""
        state = self._flag_stall(state)
        try:
            if self._online_ok is None or (state.hypervisor_ok and not self._online_ok):
                self.bus.publish(online_message(self.ident, state), retry_for_s=budget_s)
                self._online_ok = state.hypervisor_ok
                log.info("%s online (hypervisor %s, %d domains)", self.ident.node,
                         "reachable" if state.hypervisor_ok else "UNREACHABLE", len(state.domains))
            self.seq += 1
            # Build after the NodeOnline: a long retry above must not send stale numbers.
            fresh = self._flag_stall(self.sampler.latest() or state)
            self.bus.publish(telemetry_message(self.ident, fresh, self.seq), retry_for_s=budget_s)
            if not fresh.hypervisor_ok:
                # Readiness withdrawn: once the hypervisor answers again, say NodeOnline again.
                self._online_ok = False
        except Exception as exc:  # BrokerUnavailable, or a refusal such as a permission error
            self.dropped += 1
            now = self.clock()
            if self._broker_ok:
                self._down_since = self._reminded_at = now
                if isinstance(exc, BrokerUnavailable):
                    log.warning("broker unreachable, telemetry dropped (sampling goes on; the latest state "
                                "is sent when it is back): %s", exc)
                else:
                    log.error("broker refused telemetry (%s: %s); check [broker] user, password and permissions",
                              type(exc).__name__, exc)
            elif self._down_since is not None and now - self._reminded_at >= REMIND_EVERY_S:
                self._reminded_at = now
                log.warning("broker still unreachable after %.0fs (%d telemetry messages dropped; sampling goes on): "
                            "%s: %s", now - self._down_since, self.dropped, type(exc).__name__, exc)
            self._broker_ok = False
            return False
        self.published += 1
        if not self._broker_ok:
            down = self.clock() - self._down_since if self._down_since is not None else 0.0
            log.info("broker reachable again after %.0fs; telemetry resumed at seq %d", down, self.seq)
        self._broker_ok = True
        self._down_since = None
        return True

    def _flag_stall(self, state: NodeState) -> NodeState:
        """A sample older than a few intervals means a hypervisor call hangs (a dead remote host
        without keepalive): say so rather than repeat old numbers as if all were well."""
        age = self.clock() - state.taken_at
        limit = max(STALL_INTERVALS * self.ident.sample_interval_s, 2.0)
        if state.hypervisor_ok and age > limit:
            if not self._stalled:
                log.warning("no hypervisor reading for %.0fs (a call to it hangs); reporting it unreachable", age)
            self._stalled = True
            return dataclasses.replace(state, hypervisor_ok=False,
                                       error=f"no hypervisor reading for {age:.0f}s: a call to the hypervisor hangs")
        if self._stalled and age <= limit:
            log.info("hypervisor readings resumed")
            self._stalled = False
        return state

    def _offline(self, reason: str) -> None:
        try:
            # A broker already known down gets one attempt: a stopping node must not hang on it.
            self.bus.publish(NodeOffline(node=self.ident.node, boot_id=self.ident.boot_id, reason=reason),
                             retry_for_s=3.0 if self._broker_ok else 0.0)
            log.info("%s offline: %s", self.ident.node, reason)
        except Exception as exc:  # stopping anyway: say so and go
            log.warning("could not announce NodeOffline (%s: %s)", type(exc).__name__, exc)
