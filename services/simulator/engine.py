"""Event-driven simulation of one day: hosts, VMs, migrations, power states, energy and SLA metrics.

Two models share this engine:

- ``cloudsim``: CloudSim 3.0.3's PowerDatacenter.  A host idle at the start
  of an interval draws nothing, waking and powering off are free and instant,
  and a VM that asks for exactly 0 MIPS at an update is taken for "completed"
  and removed for the rest of the day (CloudSim's getCompletedVms; PlanetLab
  VMs do this at two consecutive zero samples, about half of them a day).
- ``realistic``: what the live system pays.  A host is on, off, booting or
  shutting down; off draws `off_w`, booting and shutting down draw power and
  take time; a VM can only move to a host once it has booted (wake, wait,
  migrate); a host is shut down only once it is empty with nothing in flight.

The clock follows CloudSim's: scheduling events at 300.1, 600.1, ... (its
datacenter starts 0.1 s in), the last at 86100.1; migrations finishing after
that are still processed up to the 24 h limit.
"""

from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from .cloudsim import HISTORY_LENGTH, Cluster, MigrationPolicy
from .power import CLOUDSIM_HOST_TYPES, HostType, power_at, power_table
from .traces import INTERVAL_S, SAMPLES

log = logging.getLogger("enersis.simulator.engine")

ON, OFF, BOOTING, SHUTTING = 0, 1, 2, 3
STATE_NAMES = ("online", "off", "waking", "shutting_down")

# CloudSim's experiment (Constants.java)
VM_MIPS = (2500.0, 2000.0, 1000.0, 500.0)
VM_RAM = (870, 1740, 1740, 613)
VM_BW_KBPS = 100_000
START_S = 0.1
LIMIT_S = 24 * 3600.0
LAST_STEP = SAMPLES - 1  # events at 300.1 .. 86100.1


@dataclass(frozen=True)
class RealisticParams:
    off_w: float = 5.0  # BMC + Wake-on-LAN NIC while off
    boot_s: float = 150.0  # power-on to "node online": POST + OS + agent
    shutdown_s: float = 30.0
    boot_w: float | None = None  # None: the host's peak power (fans and POST run flat out)
    shutdown_w: float | None = None  # None: the host's idle power
    ram_limits: bool = True  # False: migrate without RAM / VM-count limits, as CloudSim does (isolates power costs)


@dataclass
class Result:
    energy_kwh: float
    migrations: int
    slatah: float
    pdm: float
    slav: float
    esv: float
    host_shutdowns: int
    hosts: int
    vms: int
    runtime_s: float
    policy: str
    model: str
    trace: str
    # reported beside the JSON contract
    boots: int = 0
    fluid_kwh: float = 0.0
    npa_kwh: float = 0.0
    rejected: int = 0
    dropped: int = 0  # cloudsim model: VMs CloudSim removed as "completed" (asked for 0 MIPS)
    series_t: list[float] = field(default_factory=list)
    series_active: list[int] = field(default_factory=list)
    series_power_w: list[float] = field(default_factory=list)

    JSON_KEYS = ("energy_kwh", "migrations", "slatah", "pdm", "slav", "esv", "host_shutdowns", "hosts", "vms",
                 "runtime_s", "policy", "model", "trace")

    def as_json(self) -> dict:
        return {k: getattr(self, k) for k in self.JSON_KEYS}


@dataclass
class _Migration:
    vm: int
    target: int
    start: float


@dataclass
class _State:
    """One host-state-history entry per host and one VM-state entry per VM, at time t."""

    t: float
    req: np.ndarray  # (V,) requested MIPS
    vm_alloc: np.ndarray  # (V,) allocated MIPS on the source (0.9 of the ask while migrating)
    vm_mig: np.ndarray  # (V,) migrating out
    util: np.ndarray  # (H,) host utilisation for the power model
    alloc: np.ndarray  # (H,) allocated MIPS
    requested: np.ndarray  # (H,) requested MIPS (a migrating-in VM counts in full)
    active: np.ndarray  # (H,)
    pstate: np.ndarray  # (H,)
    mig_in_req: np.ndarray | None = None


def cloudsim_vms(n: int) -> tuple[np.ndarray, np.ndarray]:
    """MIPS and RAM of n VMs: four types in contiguous blocks of ceil(n/4) (Helper.createVmList)."""
    block = -(-n // 4)
    types = np.arange(n) // block
    return np.array(VM_MIPS)[types], np.array(VM_RAM, dtype=np.float64)[types]


def cloudsim_hosts(n: int) -> list[HostType]:
    """n hosts alternating by id: even = ML110 G4, odd = ML110 G5 (Helper.createHostList)."""
    return [CLOUDSIM_HOST_TYPES[i % 2] for i in range(n)]


class Simulation:
    """One day, one policy, one model.  `policy` is a cloudsim.MigrationPolicy / NoMigrationPolicy or an
    arbiter_policy.ArbiterPolicy."""

    def __init__(self, util: np.ndarray, hosts: list[HostType], policy, *, model: str = "cloudsim",
                 realistic: RealisticParams = RealisticParams(), vm_mips: np.ndarray | None = None,
                 vm_ram: np.ndarray | None = None, trace: str = "",
                 progress: Callable[[int, int], None] | None = None):
        if model not in ("cloudsim", "realistic"):
            raise ValueError(f"unknown model {model!r}: use cloudsim or realistic")
        self.model = model
        self.rp = realistic
        self.policy = policy
        self.trace = trace
        self.progress = progress
        V = util.shape[0]
        if vm_mips is None or vm_ram is None:
            vm_mips, vm_ram = cloudsim_vms(V)
        self.H = H = len(hosts)
        self.host_types = hosts
        self.c = Cluster(
            total=np.array([h.mips for h in hosts]),
            pe=np.array([h.pe_mips for h in hosts]),
            ram_cap=np.array([h.ram_mib for h in hosts], dtype=np.float64),
            vm_slots=np.array([h.bw_kbps // VM_BW_KBPS for h in hosts], dtype=np.int64),
            power=power_table(hosts),
            vm_ram=np.asarray(vm_ram, dtype=np.float64),
            vm_mips=np.asarray(vm_mips, dtype=np.float64),
        )
        # After creation a VM asks for RAM x its RAM utilisation and BW likewise
        # (Vm.getCurrentRequestedRam); the experiment's cloudlets use
        # UtilizationModelNull for both, so CloudSim migrates without any RAM or
        # bandwidth limit.  The realistic model keeps the physical limits.
        if model == "cloudsim" or not realistic.ram_limits:
            self.c_move = replace(self.c, ram_cap=np.full(H, np.inf), vm_slots=np.full(H, np.iinfo(np.int64).max))
        else:
            self.c_move = self.c
        self.util_trace = util
        self.V = V
        self.pmax = self.c.power[:, 10]
        self.pidle = self.c.power[:, 0]
        self.boot_w = self.pmax if realistic.boot_w is None else np.full(H, realistic.boot_w)
        self.shut_w = self.pidle if realistic.shutdown_w is None else np.full(H, realistic.shutdown_w)

    # ------------------------------------------------------------------ run

    def run(self) -> Result:
        """Simulate the day once (a Simulation is not reusable: it drops the VMs that found no host)."""
        if getattr(self, "_ran", False):
            raise RuntimeError("a Simulation runs once; build a new one")
        self._ran = True
        began = time.perf_counter()
        c = self.c
        H, V = self.H, self.V
        placement = self.policy.initial_placement(c)
        created = placement >= 0
        if not created.all():
            log.warning("%d of %d VMs found no host at creation and are left out (as CloudSim does)",
                        int((~created).sum()), V)
        keep = np.flatnonzero(created)
        self.util_trace = self.util_trace[keep]
        c.vm_mips = c.vm_mips[keep]
        c.vm_ram = c.vm_ram[keep]
        self.c_move = replace(self.c_move, vm_mips=c.vm_mips, vm_ram=c.vm_ram)
        self.V = V = keep.size
        self.v_host = placement[keep].copy()
        self.h_vms: list[list[int]] = [[] for _ in range(H)]
        for v in range(V):
            self.h_vms[int(self.v_host[v])].append(v)
        self.v_out = np.zeros(V, dtype=bool)
        self.v_alive = np.ones(V, dtype=bool)  # cloudsim: False once CloudSim took the VM for "completed"
        self.removed_log: list[tuple[float, int, int]] = []  # (time, vm, host)
        self.v_queued = np.zeros(V, dtype=bool)  # realistic: waiting for its target to boot
        self.mig_in: list[_Migration] = []
        self.queue: dict[int, list[int]] = {}  # realistic: host -> VMs waiting for it to boot
        self.h_pstate = np.where(np.array([bool(l) for l in self.h_vms]), ON, OFF).astype(np.int8)
        self.h_wake_after_off = np.zeros(H, dtype=bool)
        self.boot_times: dict[int, list[float]] = {}
        self.migration_log: list[tuple[float, int, int, int]] = []  # (start, vm, source, target)
        self.events: list = []
        self.seq = 0
        self.step_util = np.zeros((V, LAST_STEP + 1))  # u at each scheduling event, for VM histories
        self.step_k = 0
        # accounting
        self.energy_j = 0.0
        self.active_time = 0.0
        self.violation_time = 0.0
        self.req_integral = 0.0
        self.mig_loss = 0.0
        self.migrations = 0
        self.rejected = 0
        self.boots = 0
        self.shutdowns_started = 0
        self.prev: _State | None = None
        self.entry_t = None
        self.entry_active = None
        self.final_active = np.ones(H, dtype=bool)  # Helper.getTimesBeforeHostShutdown starts "active"
        self.transitions_off = 0
        self.series_t: list[float] = []
        self.series_active: list[int] = []
        self.series_power: list[float] = []
        self.history_pct: list[np.ndarray] = []  # host load % per step, for the arbiter's view
        self.fluid_j = 0.0
        self._fluid_prev = None

        t = START_S
        for k in range(1, LAST_STEP + 1):
            t += INTERVAL_S  # CloudSim's clock accumulates, so do we
            self._drain_events(before=t)
            self.step_k = k
            state = self._update(t)
            self.step_util[:, k] = state.req / c.vm_mips
            self._record(state, k)
            if self._acts():
                self.policy_step(state, t)
            if self.progress:
                self.progress(k, LAST_STEP)
        self._drain_events(before=LIMIT_S + 1e-9)
        self._close_entries()
        energy_kwh = self.energy_j / 3.6e6
        if getattr(self.policy, "name", "") == "npa":
            # PowerDatacenterNonPowerAware: every host at its maximum power from 0 to the last event.
            energy_kwh = float(self.pmax.sum()) * t / 3.6e6
        slatah = self.violation_time / self.active_time if self.active_time > 0 else 0.0
        pdm = self.mig_loss / self.req_integral if self.req_integral > 0 else 0.0
        slav = slatah * pdm
        shutdowns = self.transitions_off if self.model == "cloudsim" else self.shutdowns_started
        return Result(
            energy_kwh=round(float(energy_kwh), 6), migrations=self.migrations, slatah=float(slatah),
            pdm=float(pdm), slav=float(slav), esv=float(energy_kwh * slav), host_shutdowns=int(shutdowns),
            hosts=H, vms=V,
            runtime_s=round(time.perf_counter() - began, 3), policy=self.policy.name, model=self.model,
            trace=self.trace, boots=self.boots, fluid_kwh=self.fluid_j / 3.6e6,
            npa_kwh=float(self.pmax.sum()) * t / 3.6e6, rejected=self.rejected, dropped=len(self.removed_log),
            series_t=self.series_t, series_active=self.series_active, series_power_w=self.series_power)

    def _acts(self) -> bool:
        return bool(getattr(self.policy, "migrations", False))

    # ------------------------------------------------------------------ state and accounting

    def _util_at(self, t: float) -> np.ndarray:
        """UtilizationModelPlanetLabInMemory.getUtilization: linear between the 300 s samples."""
        k = int(t // INTERVAL_S)
        if k >= SAMPLES:
            return self.util_trace[:, SAMPLES].copy()
        u1 = self.util_trace[:, k]
        u2 = self.util_trace[:, k + 1]
        return u1 + (u2 - u1) / INTERVAL_S * (t - k * INTERVAL_S)

    def _compute(self, t: float) -> _State:
        c = self.c
        H = self.H
        req = self._util_at(t) * c.vm_mips
        host = self.v_host
        capped = np.minimum(req, c.pe[host])  # a virtual PE never gets more than a physical one
        out = self.v_out
        demand = np.bincount(host, capped, H)
        if self.mig_in:
            mv = np.fromiter((m.vm for m in self.mig_in), np.int64, len(self.mig_in))
            mh = np.fromiter((m.target for m in self.mig_in), np.int64, len(self.mig_in))
            cin = np.minimum(req[mv], c.pe[mh])
            demand += np.bincount(mh, cin * 0.1, H)  # the target sees 10 % of a migrating-in VM
        alloc = np.where(out, capped * 0.9, capped)  # the source gives a migrating VM 90 %
        # ... but counts it in full for its own load; (x * 0.9) / 0.9 is CloudSim's float arithmetic
        contrib = np.where(out, alloc / 0.9, alloc)
        over = demand > c.total
        scale = None
        if over.any():
            # VmSchedulerTimeSharedOverSubscription: everyone scaled down, floored
            scale = np.where(over, c.total / np.where(demand > 0, demand, 1.0), 1.0)
            vo = over[host]
            f = scale[host][vo]
            a2 = np.where(out[vo], np.floor(capped[vo] * f * 0.9), np.floor(capped[vo] * f))
            alloc[vo] = a2
            contrib[vo] = np.where(out[vo], a2 / 0.9, a2)
        A = np.bincount(host, contrib, H)
        R = np.bincount(host, req, H)
        if self.mig_in:
            ain = cin * 0.1
            if scale is not None:
                oi = over[mh]
                ain[oi] = np.floor(cin[oi] * 0.1 * scale[mh][oi])
            A += np.bincount(mh, ain, H)
            R += np.bincount(mh, req[mv], H)
        util = A / c.total
        util = np.where((util > 1.0) & (util < 1.01), 1.0, util)  # HostDynamicWorkload.getUtilizationOfCpu
        util = np.minimum(util, 1.0)
        return _State(t, req, alloc, out.copy(), util, A, R, A > 0, self.h_pstate.copy())

    def _power_now(self, st: _State) -> np.ndarray:
        p = power_at(self.c.power, st.util)
        if self.model == "cloudsim":
            return np.where(st.util > 0, p, 0.0)
        return np.select([st.pstate == ON, st.pstate == OFF, st.pstate == BOOTING],
                         [p, self.rp.off_w, self.boot_w], self.shut_w)

    def _update(self, t: float) -> _State:
        """updateCloudetProcessing: close the interval since the previous update, open a new one."""
        st = self._compute(t)
        prev = self.prev
        if prev is not None:
            dt = t - prev.t
            if dt > 0:
                p0 = power_at(self.c.power, prev.util)
                p1 = power_at(self.c.power, st.util)
                trapezoid = (p0 + (p1 - p0) / 2.0) * dt
                if self.model == "cloudsim":
                    e = np.where(prev.util > 0, trapezoid, 0.0)  # idle at the start = switched off
                else:
                    e = np.select([prev.pstate == ON, prev.pstate == OFF, prev.pstate == BOOTING],
                                  [trapezoid, self.rp.off_w * dt, self.boot_w * dt], self.shut_w * dt)
                self.energy_j += float(e.sum())
                act = prev.active
                self.active_time += dt * int(act.sum())
                self.violation_time += dt * int((act & (prev.alloc < prev.requested)).sum())
                self.req_integral += dt * float(prev.req.sum())
                if prev.vm_mig.any():
                    self.mig_loss += dt * float((prev.req - prev.vm_alloc)[prev.vm_mig].sum())
        # host state history: an entry at the same time replaces the previous one
        if self.entry_t is not None and t != self.entry_t:
            self._commit_entry()
        self.entry_t = t
        self.entry_active = st.active
        self.prev = st
        if self.model == "cloudsim":
            self._remove_completed(st)
        return st

    def _remove_completed(self, st: _State) -> None:
        """PowerDatacenter's "remove completed VMs", after every datacenter update.

        HostDynamicWorkload.getCompletedVms takes any VM not in migration whose
        requested MIPS is exactly 0 for finished, and the datacenter deallocates
        it for good.  A PlanetLab VM asks for 0 MIPS when two consecutive trace
        samples are 0, so on 20110303 about half the VMs leave the experiment
        during the day (CloudSim issues #64 and #159 report the shrinking list).
        This is part of CloudSim's published numbers, so the cloudsim model does
        it; the realistic model never drops a VM.  The VM is gone after this
        instant: its trace is zeroed so that it asks for nothing from now on.
        """
        gone = np.flatnonzero((st.req == 0.0) & self.v_alive & ~self.v_out)
        for v in gone.tolist():
            h = int(self.v_host[v])
            self.h_vms[h].remove(v)
            self.v_alive[v] = False
            self.util_trace[v, :] = 0.0
            self.removed_log.append((st.t, v, h))

    def _commit_entry(self) -> None:
        self.transitions_off += int((self.final_active & ~self.entry_active).sum())
        self.final_active = self.entry_active

    def _close_entries(self) -> None:
        if self.entry_t is not None:
            self._commit_entry()

    def _record(self, st: _State, k: int) -> None:
        self.series_t.append(st.t)
        on = st.active if self.model == "cloudsim" else (st.pstate != OFF)
        self.series_active.append(int(on.sum()))
        self.series_power.append(float(self._power_now(st).sum()))
        self.history_pct.append(st.util * 100.0)
        # fluid lower bound: the whole demand on the most efficient hosts, filled to 100 %
        demand = float(st.req.sum())
        p = self._fluid_power(demand)
        if self._fluid_prev is not None:
            t0, p0 = self._fluid_prev
            self.fluid_j += (p0 + p) / 2.0 * (st.t - t0)
        self._fluid_prev = (st.t, p)

    def _fluid_power(self, demand: float) -> float:
        if not hasattr(self, "_eff_order"):
            eff = self.pmax / self.c.total  # watts per MIPS at full load: lower is better
            self._eff_order = np.lexsort((np.arange(self.H), eff))
            self._eff_cum = np.cumsum(self.c.total[self._eff_order])
        n_full = int(np.searchsorted(self._eff_cum, demand, side="right"))
        watts = float(self.pmax[self._eff_order[:n_full]].sum())
        rest = demand - (self._eff_cum[n_full - 1] if n_full else 0.0)
        if rest > 1e-9 and n_full < self.H:
            h = self._eff_order[n_full]
            watts += float(power_at(self.c.power[h:h + 1], np.array([rest / self.c.total[h]]))[0])
        return watts

    # ------------------------------------------------------------------ events

    def _push(self, when: float, kind: str, data) -> None:
        self.seq += 1
        heapq.heappush(self.events, (when, self.seq, kind, data))

    def _drain_events(self, before: float) -> None:
        while self.events and self.events[0][0] < before:
            when = self.events[0][0]
            batch = []
            while self.events and self.events[0][0] == when:
                batch.append(heapq.heappop(self.events))
            if when > LIMIT_S:
                continue
            self._update(when)  # processVmMigrate first brings every host up to date
            for _, _, kind, data in batch:
                getattr(self, "_on_" + kind)(when, data)
            self._after_change(when)
            self._update(when)  # ... and once the last one at this instant is done, again (no time passes)

    def _on_migrated(self, t: float, m: _Migration) -> None:
        v = m.vm
        src = int(self.v_host[v])
        self.h_vms[src].remove(v)
        self.h_vms[m.target].append(v)
        self.v_host[v] = m.target
        self.mig_in.remove(m)
        self.v_out[v] = False

    def _on_booted(self, t: float, h: int) -> None:
        self.h_pstate[h] = ON
        for v in self.queue.pop(h, []):
            self.v_queued[v] = False
            self._start_migration(v, h, t)

    def _on_off(self, t: float, h: int) -> None:
        self.h_pstate[h] = OFF
        if self.h_wake_after_off[h]:
            self.h_wake_after_off[h] = False
            self._wake(h, t)

    # ------------------------------------------------------------------ actions

    def _fits(self, v: int, h: int) -> bool:
        ram = sum(self.c.vm_ram[x] for x in self.h_vms[h]) + sum(self.c.vm_ram[m.vm] for m in self.mig_in
                                                                   if m.target == h)
        n = len(self.h_vms[h]) + sum(1 for m in self.mig_in if m.target == h)
        return ram + self.c.vm_ram[v] <= self.c_move.ram_cap[h] and n < self.c_move.vm_slots[h]

    def _start_migration(self, v: int, h: int, t: float) -> bool:
        """Host.addMigratingInVm + the VM_MIGRATE event RAM / (bandwidth / 2) later."""
        if h == self.v_host[v] or self.h_pstate[h] != ON or not self.v_alive[v] or not self._fits(v, h):
            self.rejected += 1
            return False
        if self.model == "realistic" and self.v_out[v]:
            self.rejected += 1  # a real VM moves once at a time
            return False
        m = _Migration(v, h, t)
        self.migration_log.append((t, v, int(self.v_host[v]), h))
        self.mig_in.append(m)
        self.v_out[v] = True
        self.migrations += 1
        bw_mb_s = self.host_types[h].bw_kbps / (2 * 8000.0)
        self._push(t + self.c.vm_ram[v] / bw_mb_s, "migrated", m)
        return True

    def wake(self, h: int, t: float) -> None:
        self._wake(h, t)

    def shutdown(self, h: int, t: float) -> bool:
        return self._shutdown(h, t)

    def _wake(self, h: int, t: float) -> None:
        if self.h_pstate[h] == OFF:
            self.boots += 1
            self.boot_times.setdefault(h, []).append(t)
        if self.model == "cloudsim":
            self.h_pstate[h] = ON
            return
        if self.h_pstate[h] == OFF:
            self.h_pstate[h] = BOOTING
            self._push(t + self.rp.boot_s, "booted", h)
        elif self.h_pstate[h] == SHUTTING:
            self.h_wake_after_off[h] = True

    def _empty(self, h: int) -> bool:
        return not self.h_vms[h] and not any(m.target == h for m in self.mig_in) and not self.queue.get(h)

    def _shutdown(self, h: int, t: float) -> bool:
        """Only a host confirmed empty, with nothing in flight to it, is powered off."""
        if self.h_pstate[h] != ON or not self._empty(h):
            return False
        if self.model == "cloudsim":
            self.h_pstate[h] = OFF
        else:
            self.h_pstate[h] = SHUTTING
            self._push(t + self.rp.shutdown_s, "off", h)
        self.shutdowns_started += 1
        return True

    def migrate(self, v: int, h: int, t: float) -> None:
        """A migration the policy asked for, in the model's order: wake, wait, migrate."""
        if self.model == "cloudsim" or self.h_pstate[h] == ON:
            if self.h_pstate[h] != ON:
                self._wake(h, t)  # CloudSim: an empty host is simply used
            self._start_migration(v, h, t)
            return
        if self.v_out[v] or self.v_queued[v]:
            self.rejected += 1
            return
        self.v_queued[v] = True
        self.queue.setdefault(h, []).append(v)
        self._wake(h, t)

    def _after_change(self, t: float) -> None:
        """Realistic, CloudSim policies: a host left empty is powered off (CloudSim counts it off at once)."""
        if self.model == "realistic" and isinstance(self.policy, MigrationPolicy):
            for h in np.flatnonzero(self.h_pstate == ON):
                if self._empty(int(h)):
                    self._shutdown(int(h), t)

    # ------------------------------------------------------------------ the policy's turn

    def policy_step(self, state: _State, t: float) -> None:
        if isinstance(self.policy, MigrationPolicy):
            actions = self._cloudsim_optimize(state)
            for v, h in actions:
                self.migrate(v, h, t)
        else:
            self.policy.step(self, state, t)
        self._after_change(t)
        self._update(t)  # migrations started: both ends' load changes now, no time passes

    def _cloudsim_optimize(self, st: _State) -> list[tuple[int, int]]:
        c = self.c
        H, V = self.H, self.V
        busy = self.v_out | self.v_queued | ~self.v_alive
        host = self.v_host
        alive = self.v_alive
        capped = np.minimum(st.req, c.pe[host])
        host_alloc = np.bincount(host, capped, H)
        host_ram = np.bincount(host, c.vm_ram * alive, H)
        host_n = np.bincount(host, alive.astype(np.int64), H).astype(np.int64)
        k = self.step_k
        n_hist = min(k, HISTORY_LENGTH)
        vm_hist = np.zeros((V, HISTORY_LENGTH))
        vm_hist[:, :n_hist] = self.step_util[:, k:k - n_hist:-1] * c.vm_mips[:, None]
        vm_hist[~alive] = 0.0  # a removed VM is in no host's history
        host_hist = np.zeros((H, HISTORY_LENGTH))
        np.add.at(host_hist, host, vm_hist)
        host_req = st.requested.copy()
        demand = host_alloc.copy()
        for m in self.mig_in:  # only when boots outlast a scheduling interval (realistic)
            r = st.req[m.vm]
            host_alloc[m.target] += r
            demand[m.target] += 0.1 * min(r, c.pe[m.target])
            host_ram[m.target] += c.vm_ram[m.vm]
            host_n[m.target] += 1
            host_hist[m.target] += vm_hist[m.vm]
        if self.model == "realistic":
            for h, vs in self.queue.items():  # promised to a booting host: hold its room
                for v in vs:
                    host_ram[h] += c.vm_ram[v]
                    host_n[h] += 1
                    host_alloc[h] += st.req[v]
                    demand[h] += st.req[v]
        avail = np.where(demand > c.total, 0.0, c.total - demand)
        lists = [list(l) for l in self.h_vms]
        util_last = st.util
        if self.model == "realistic":
            # a host that is not on cannot be evacuated or counted as a running target
            util_last = np.where(self.h_pstate == ON, util_last, 0.0)
        return self.policy.optimize(self.c_move, lists, busy, util_last, st.req, host_alloc, host_req, avail, host_ram,
                                    host_n, vm_hist, host_hist, second_hops=self.model == "cloudsim")
