"""The live arbiter's policies in the simulator: the very same pure decide().

Each scheduling interval the simulated cluster is shown to
`enersis.arbiter.policy.decide` as the arbiter would see it from telemetry
(a Snapshot of NodeViews and VmViews), and the intents it returns are carried
out in the model's terms: a Migrate starts a migration (only to an online
host, only with room), a Wake boots a host, a Shutdown powers off a host only
if it is empty with nothing in flight.  Nothing here decides anything.
"""

from __future__ import annotations

import logging

import numpy as np

from enersis.arbiter.policy import POLICIES, Migrate, NodeView, Params, Shutdown, Snapshot, VmView, Wake, decide

from .cloudsim import first_fit
from .traces import INTERVAL_S

log = logging.getLogger("enersis.simulator.arbiter_policy")

#: the function object both the live arbiter and the simulator call
DECIDE = decide
HISTORY_CYCLES = 8
_STATE = ("online", "off", "waking", "shutting_down")


def node_name(h: int) -> str:
    return f"host-{h:03d}"


def vm_name(v: int) -> str:
    return f"vm-{v:04d}"


class ArbiterPolicy:
    migrations = True  # it acts every interval

    def __init__(self, name: str, params: Params | None = None):
        if name not in POLICIES:
            raise ValueError(f"unknown arbiter policy {name!r}; known: {', '.join(sorted(POLICIES))}")
        self.name = name
        # One decision per trace sample: the cycle is the trace's 300 s.
        self.params = params or Params(policy=name, cycle_s=INTERVAL_S)
        self.params.validate()
        self.decide = DECIDE
        self.intents = {"migrate": 0, "wake": 0, "shutdown": 0}

    def initial_placement(self, c) -> np.ndarray:
        # The VMs are where an operator started them: first fit, as with dvfs.
        return first_fit(c)

    def snapshot(self, sim, st) -> Snapshot:
        if getattr(self, "_names", None) is None or len(self._names[0]) != sim.H or len(self._names[1]) != sim.V:
            self._names = ([node_name(h) for h in range(sim.H)], [vm_name(v) for v in range(sim.V)])
        hn, vn = self._names
        boots = getattr(sim, "boot_times", {})
        hist = sim.history_pct[-(HISTORY_CYCLES + 1):-1]  # oldest first, the current load is cpu_used
        hist_cols = np.array(hist).T.tolist() if hist else [[] for _ in range(sim.H)]
        total = sim.c.total.tolist()
        used = st.alloc.tolist()
        nodes = []
        for h in range(sim.H):
            ps = int(sim.h_pstate[h])
            recent = sum(1 for b in boots.get(h, ()) if st.t - b <= 3600.0)
            nodes.append(NodeView(
                name=hn[h], state=_STATE[ps], cpu_capacity=total[h],
                cpu_used=used[h], mem_mib=int(sim.c.ram_cap[h]), busy=ps in (2, 3),
                history=tuple(hist_cols[h]), power_cycles_last_hour=recent))
        targets = {m.vm: m.target for m in sim.mig_in}
        for h, vs in sim.queue.items():
            for v in vs:
                targets[v] = h
        vms = []
        busy = (sim.v_out | sim.v_queued).tolist()
        cpu = np.where(st.vm_mig, st.vm_alloc / 0.9, st.vm_alloc).tolist()  # what telemetry measures
        hosts = sim.v_host.tolist()
        ram = sim.c.vm_ram.astype(int).tolist()
        alive = sim.v_alive.tolist()
        for v in range(sim.V):
            if not alive[v]:
                continue  # cloudsim model: CloudSim dropped it as "completed"; no telemetry reports it
            t = targets.get(v)
            vms.append(VmView(name=vn[v], node=hn[hosts[v]], cpu=cpu[v], mem_mib=ram[v], busy=busy[v],
                              target=hn[t] if t is not None else ""))
        return Snapshot(nodes=tuple(nodes), vms=tuple(vms))

    def step(self, sim, st, t: float) -> None:
        intents = self.decide(self.snapshot(sim, st), self.params, t)
        for it in intents:
            if isinstance(it, Migrate):
                self.intents["migrate"] += 1
                v, src, dst = int(it.vm[3:]), int(it.source[5:]), int(it.target[5:])
                if int(sim.v_host[v]) != src:
                    sim.rejected += 1
                    continue
                sim.migrate(v, dst, t)
            elif isinstance(it, Wake):
                self.intents["wake"] += 1
                sim.wake(int(it.node[5:]), t)
            elif isinstance(it, Shutdown):
                self.intents["shutdown"] += 1
                if not sim.shutdown(int(it.node[5:]), t):
                    sim.rejected += 1  # the executor would answer "skipped: not empty"
