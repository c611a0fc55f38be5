"""Energy and outcome accounting for the demo: a simple power model per node state.

Pure: fed with ClusterView snapshots and simulated-time steps by the caller.
The baseline is the same cluster with every node on (the situation before
Enersis): with a linear model, the load-dependent part is the same work
wherever it runs, so the baseline is the measured dynamic power plus every
node's idle power.  Only online nodes report load; a node that is off costs
its standby power, a node booting or shutting down a fixed power.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from enersis.ops.view import ClusterView


@dataclass(frozen=True)
class PowerModel:
    idle_w: float = 120.0  # on, no load (a typical 2-socket server)
    max_w: float = 250.0  # on, 100 % CPU
    off_w: float = 5.0  # soft-off, NIC listening for Wake-on-LAN
    transition_w: float = 180.0  # booting or shutting down
    sla_pct: float = 95.0  # a report at or above this load counts as an SLA violation

    def watts(self, state: str, load_pct: float) -> float:
        if state in ("off",):
            return self.off_w
        if state in ("waking", "shutting_down"):
            return self.transition_w
        if state in ("online", "stale", "hypervisor-down", "offline"):
            # "offline": the agent stopped, the machine is still on (idle) until power confirms off.
            return self.idle_w + (self.max_w - self.idle_w) * max(0.0, min(100.0, load_pct)) / 100
        return self.idle_w  # unknown: assume on, never flatter the result


@dataclass
class Ledger:
    model: PowerModel
    nodes: tuple[str, ...]
    actual_j: float = 0.0
    baseline_j: float = 0.0
    sim_s: float = 0.0
    state_s: dict[str, float] = field(default_factory=dict)  # node-seconds per state
    sla_reports: int = 0  # telemetry reports at or above model.sla_pct
    reports: int = 0

    def step(self, view: ClusterView, now_ms: int, dt_sim_s: float) -> None:
        """Account `dt_sim_s` simulated seconds at the view's current states and loads."""
        if dt_sim_s <= 0:
            return
        dynamic = 0.0
        actual = 0.0
        for name in self.nodes:
            rec = view.nodes.get(name)
            state = rec.state(now_ms) if rec else "unknown"
            load = rec.cpu_pct if rec and state in ("online", "stale", "shutting_down") else 0.0
            actual += self.model.watts(state, load)
            dynamic += (self.model.max_w - self.model.idle_w) * load / 100
            self.state_s[state] = self.state_s.get(state, 0.0) + dt_sim_s
        self.actual_j += actual * dt_sim_s
        self.baseline_j += (len(self.nodes) * self.model.idle_w + dynamic) * dt_sim_s
        self.sim_s += dt_sim_s

    @property
    def actual_kwh(self) -> float:
        return self.actual_j / 3.6e6

    @property
    def baseline_kwh(self) -> float:
        return self.baseline_j / 3.6e6

    @property
    def saved_pct(self) -> float:
        return 100.0 * (1 - self.actual_j / self.baseline_j) if self.baseline_j else 0.0


@dataclass
class Tally:
    """Final results by command kind and status, from the results seen on the bus."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)

    def update(self, view: ClusterView) -> None:
        self.counts.clear()
        for c in view.commands.values():
            key = (c.kind, c.status)
            self.counts[key] = self.counts.get(key, 0) + 1

    def get(self, kind: str, status: str = "succeeded") -> int:
        return self.counts.get((kind, status), 0)

    def failed(self, kind: str) -> int:
        return self.get(kind, "failed") + self.get(kind, "rejected")
