"""CPU arithmetic, pure: two hypervisor readings in, percentages out.  No clock, no I/O.

The node's load is measured from the hypervisor, as the seed did on Xen
(where the host OS is itself a domain)::

    node % = Σ over active domains of Δ cpu_time ÷ (Δt × host CPUs) × 100, clamped to 0–100

Per domain: its share of the whole node, and of its own vCPUs (100 % = every
vCPU busy).  Node and domains are averaged over the same window, so the
domains' shares add up to the node's load and a VM's load is as steady as
its node's (the arbiter compares the two).  A domain counts only when it appears in both readings with the
same UUID and a cpu time that did not go backwards; otherwise (it just
started, vanished, migrated away and back, restarted) it has no delta yet.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .hypervisor import DomainReading


def clamp_pct(x: float) -> float:
    return 0.0 if x < 0.0 else 100.0 if x > 100.0 else x


@dataclass(frozen=True, slots=True)
class DomainLoad:
    reading: DomainReading  # the newer reading
    cpu_node_pct: float
    cpu_vcpu_pct: float
    measured: bool  # False: no usable previous reading, percentages are 0


@dataclass(frozen=True, slots=True)
class LoadSample:
    node_pct: float
    domains: tuple[DomainLoad, ...]


def compute_load(
    previous: dict[str, DomainReading],
    current: list[DomainReading],
    interval_s: float,
    host_cpus: int,
) -> LoadSample:
    """Loads over `interval_s` between `previous` (by UUID) and `current`.

    interval_s must be the time between the two readings (> 0), host_cpus > 0.
    """
    if interval_s <= 0:
        raise ValueError(f"interval_s must be > 0, got {interval_s}")
    if host_cpus <= 0:
        raise ValueError(f"host_cpus must be > 0, got {host_cpus}")
    capacity_ns = interval_s * 1e9
    total_ns = 0
    loads = []
    for cur in current:
        prev = previous.get(cur.uuid)
        delta = cur.cpu_time_ns - prev.cpu_time_ns if prev is not None else -1
        if delta < 0:
            loads.append(DomainLoad(cur, 0.0, 0.0, False))
            continue
        total_ns += delta
        vcpus = max(1, cur.vcpus)
        loads.append(DomainLoad(
            cur,
            clamp_pct(delta * 100.0 / (capacity_ns * host_cpus)),
            clamp_pct(delta * 100.0 / (capacity_ns * vcpus)),
            True,
        ))
    return LoadSample(clamp_pct(total_ns * 100.0 / (capacity_ns * host_cpus)), tuple(loads))


class Window:
    """Node load samples over the last `window_s` seconds (of the caller's monotonic clock).

    Bounded: it never holds more than `max_samples`, whatever the timestamps.
    """

    def __init__(self, window_s: float, max_samples: int):
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max(1, max_samples))

    def add(self, t: float, pct: float) -> None:
        self._samples.append((t, pct))

    def clear(self) -> None:
        self._samples.clear()

    def mean(self, now: float) -> float | None:
        """Mean of the samples taken in (now - window_s, now]; None when there is none."""
        values = [p for t, p in self._samples if now - self.window_s < t <= now]
        return sum(values) / len(values) if values else None

    def __len__(self) -> int:
        return len(self._samples)


class DomainWindows:
    """Each domain's (node %, vCPU %) samples over the last `window_s`, by UUID.

    Only domains present in the latest reading are kept, each bounded to
    `max_samples`, so memory follows the node's inventory.
    """

    def __init__(self, window_s: float, max_samples: int):
        self.window_s = window_s
        self.max_samples = max(1, max_samples)
        self._w: dict[str, deque[tuple[float, float, float]]] = {}

    def clear(self) -> None:
        self._w.clear()

    def update(self, now: float, loads: tuple[DomainLoad, ...]) -> tuple[DomainLoad, ...]:
        """Add the measured loads taken at `now`; return every load as its window mean."""
        present = {d.reading.uuid for d in loads}
        for gone in [u for u in self._w if u not in present]:
            del self._w[gone]
        out = []
        for d in loads:
            w = self._w.get(d.reading.uuid)
            if d.measured:
                if w is None:
                    w = self._w[d.reading.uuid] = deque(maxlen=self.max_samples)
                w.append((now, d.cpu_node_pct, d.cpu_vcpu_pct))
            recent = [(n, v) for t, n, v in (w or ()) if now - self.window_s < t <= now]
            if recent:
                d = DomainLoad(d.reading, sum(n for n, _ in recent) / len(recent),
                               sum(v for _, v in recent) / len(recent), d.measured)
            out.append(d)
        return tuple(out)
