"""The sampler: one hypervisor reading every sample interval, compared with the previous one.

Unlike the seed (read, sleep 0.1 s, read again), there is no blocking sleep
between the two readings of a delta: each reading is compared with the one
taken one interval earlier, so every reading counts and the agent sleeps only
between samples.  Ticks are scheduled on a monotonic clock:

- a sample that overran its interval (or a process that was stopped) skips
  the missed ticks instead of catching up in a burst;
- a gap much longer than the interval (host suspended, clock jump) or a clock
  that went backwards gives no delta: the next reading becomes the new
  baseline, and the window is cleared after a backward jump;
- while the hypervisor is unreachable the state says so, and keeps the last
  known domains: an unreachable node must never look empty (an arbiter could
  power it off).

The sampler keeps only its latest state; the publisher reads it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .cpu import DomainLoad, DomainWindows, Window, compute_load
from .hypervisor import DomainReading, Hypervisor, HypervisorUnavailable, NodeFacts

log = logging.getLogger("enersis.agent.sampler")

# A gap longer than this many intervals is a discontinuity, not a measurement.
MAX_GAP_INTERVALS = 5.0


@dataclass(frozen=True, slots=True)
class NodeState:
    """What the agent knows about its node after the latest sample."""

    taken_at: float  # sampler clock (monotonic)
    samples: int  # readings taken so far (also while unreachable)
    hypervisor_ok: bool
    error: str  # why the hypervisor is unreachable, when it is
    facts: NodeFacts | None  # None until the hypervisor answered once
    cpu_pct_latest: float
    cpu_pct_mean: float  # over the window (the latest when the window is empty)
    domains: tuple[DomainLoad, ...]  # percentages are window means; last known, even while unreachable
    measured: bool = True  # False until the window holds one real measurement (right after start)


class Sampler:
    def __init__(
        self,
        hypervisor: Hypervisor,
        *,
        sample_interval_s: float = 1.0,
        window_s: float = 10.0,
        facts_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if sample_interval_s <= 0:
            raise ValueError("sample_interval_s must be > 0")
        self.hv = hypervisor
        self.interval = sample_interval_s
        self.facts_interval = facts_interval_s
        self.clock = clock
        bound = int(math.ceil(window_s / sample_interval_s)) + 2
        self.window = Window(window_s, max_samples=bound)
        self.domain_windows = DomainWindows(window_s, max_samples=bound)
        self._prev: dict[str, DomainReading] = {}
        self._prev_t: float | None = None
        self._facts: NodeFacts | None = None
        self._facts_t: float | None = None
        self._samples = 0
        self._was_ok: bool | None = None
        self._lock = threading.Lock()
        self._latest: NodeState | None = None
        self.sampled = threading.Condition()  # notified after each sample (tests, the first publish)

    def latest(self) -> NodeState | None:
        with self._lock:
            return self._latest

    # -- one sample

    def sample_once(self) -> NodeState:
        now = self.clock()
        last = self.latest()
        try:
            if self._facts is None or self._facts_t is None or not 0 <= now - self._facts_t < self.facts_interval:
                self._facts, self._facts_t = self.hv.facts(), now
            readings = self.hv.read_domains()
        except HypervisorUnavailable as exc:
            state = self._unreachable(now, str(exc), last)
        else:
            state = self._measured(now, readings, last)
        with self._lock:
            self._latest = state
        with self.sampled:
            self.sampled.notify_all()
        return state

    def _unreachable(self, now: float, error: str, last: NodeState | None) -> NodeState:
        if self._was_ok is not False:
            log.warning("hypervisor unreachable: %s", error)
        self._was_ok = False
        self._samples += 1
        self._prev, self._prev_t = {}, None  # deltas across an outage are meaningless
        self._facts_t = None  # re-read facts once it answers
        # Last known values throughout: an unreachable node must not look idle either.
        mean = self.window.mean(now)
        return NodeState(now, self._samples, False, error, self._facts,
                         last.cpu_pct_latest if last else 0.0,
                         mean if mean is not None else (last.cpu_pct_mean if last else 0.0),
                         last.domains if last else (), last.measured if last else False)

    def _measured(self, now: float, readings: list[DomainReading], last: NodeState | None) -> NodeState:
        if self._was_ok is False:
            log.info("hypervisor answers again")
        self._was_ok = True
        self._samples += 1
        assert self._facts is not None
        dt = None if self._prev_t is None else now - self._prev_t
        if dt is not None and dt <= 0:
            log.warning("clock went backwards by %.3fs: restarting the measurement", -dt)
            self.window.clear()
            self.domain_windows.clear()
            dt = None
        elif dt is not None and dt > MAX_GAP_INTERVALS * self.interval:
            log.warning("%.1fs since the last sample (interval %.1fs): restarting the measurement", dt, self.interval)
            dt = None
        if dt is None:
            # A baseline only: every domain unmeasured, nothing enters the window.
            sample = compute_load({}, readings, 1.0, max(1, self._facts.cpus))
        else:
            sample = compute_load(self._prev, readings, dt, max(1, self._facts.cpus))
            self.window.add(now, sample.node_pct)
        self._prev = {r.uuid: r for r in readings}
        self._prev_t = now
        if dt is None and last is not None and last.hypervisor_ok:
            latest = last.cpu_pct_latest
        else:
            latest = sample.node_pct if dt is not None else 0.0
        mean = self.window.mean(now)
        if mean is None and last is not None:
            mean = last.cpu_pct_mean
        return NodeState(now, self._samples, True, "", self._facts, latest,
                         latest if mean is None else mean,
                         _carry_over(self.domain_windows.update(now, sample.domains), last),
                         measured=dt is not None or (last is not None and last.measured))

    # -- the schedule

    def run(self, stop: threading.Event) -> None:
        """Sample every interval until `stop` is set.  Never raises for hypervisor trouble."""
        next_t = self.clock()
        while not stop.is_set():
            try:
                self.sample_once()
            except Exception:  # a bug must not silence the node: log it and keep sampling
                log.exception("sampling failed")
            next_t += self.interval
            now = self.clock()
            if now >= next_t:
                skipped = int((now - next_t) // self.interval) + 1
                if skipped > 1:
                    log.info("sampling fell behind: skipping %d ticks", skipped - 1)
                next_t += skipped * self.interval
            elif next_t - now > self.interval:  # the clock went backwards
                next_t = now + self.interval
            stop.wait(next_t - now)


def _carry_over(loads: tuple[DomainLoad, ...], last: NodeState | None) -> tuple[DomainLoad, ...]:
    """An unmeasured domain known from the last state keeps its last percentages.

    After a restart of the measurement (reconnect, clock jump) every domain
    would otherwise read 0 % for one sample, and a telemetry published right
    then would show a busy node's VMs as idle.  New domains still read 0 %.
    """
    if last is None or all(d.measured for d in loads):
        return loads
    known = {d.reading.uuid: d for d in last.domains}
    out = []
    for d in loads:
        prev = known.get(d.reading.uuid)
        if not d.measured and prev is not None:
            d = DomainLoad(d.reading, prev.cpu_node_pct, prev.cpu_vcpu_pct, False)
        out.append(d)
    return tuple(out)
