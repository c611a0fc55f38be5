"""CloudSim 3.0.3's power-aware VM allocation, re-expressed over arrays.

Mirrors org.cloudbus.cloudsim.power: PowerVmAllocationPolicyMigrationAbstract
(optimizeAllocation, getNewVmPlacement, getMigrationMapFromUnderUtilizedHosts,
findHostForVm), the overload detectors (StaticThreshold, InterQuartileRange,
MedianAbsoluteDeviation, LocalRegression, each with the 0.7 static fallback),
PowerVmSelectionPolicyMinimumMigrationTime and the host utilisation history of
PowerHostUtilizationHistory.  Where CloudSim has a quirk that shapes its
published numbers, the quirk is kept and a comment says so.  Read against
CloudSim 3.0.3's source: power deltas are P(after) - P(last update) with the
SPECpower table's idle value at 0 % (the placement never sees a host as 0 W),
"after" counts the VMs placed earlier in the same round, and the hosts that
took VMs from overloaded ones remain under-utilisation candidates.

Pure computation: the engine hands in arrays, gets back a migration map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .power import power_at

HISTORY_LENGTH = 30  # PowerVm.HISTORY_LENGTH
FALLBACK_THRESHOLD = 0.7  # the experiments' fallback StaticThreshold
LR_LENGTH = 10  # LocalRegression fits the last 10 values


# ---------------------------------------------------------------- statistics (MathUtil)


def _trim_len(row: np.ndarray) -> int:
    """MathUtil.trimZeroTail: history up to its last non-zero value."""
    nz = np.flatnonzero(row)
    return int(nz[-1]) + 1 if nz.size else 0


def _java_round(x: float) -> int:
    return int(math.floor(x + 0.5))


def iqr(data: list[float]) -> float:
    """MathUtil.iqr (quartile positions round(0.25(n+1)) - 1 and round(0.75(n+1)) - 1)."""
    d = sorted(data)
    n = len(d)
    return d[_java_round(0.75 * (n + 1)) - 1] - d[_java_round(0.25 * (n + 1)) - 1]


def _median(d: list[float]) -> float:
    s = sorted(d)
    n = len(s)
    m = n // 2
    return s[m] if n % 2 else (s[m - 1] + s[m]) / 2.0


def mad(data: list[float]) -> float:
    """MathUtil.mad: median of absolute deviations from the median."""
    if not data:
        return 0.0
    med = _median(data)
    return _median([abs(med - x) for x in data])


# Ordinary least squares over x = 1..10 predicting x = 11 is a fixed linear
# combination of the 10 values.  CloudSim's "local regression" computes
# tricube weights but applies them only when >= 40 % of them are zero, which
# never happens for 10 points, so the fit is plain OLS.
_X = np.arange(1, LR_LENGTH + 1, dtype=np.float64)
_XBAR = _X.mean()
_SXX = float(((_X - _XBAR) ** 2).sum())


def lr_weights(predict_at: float) -> np.ndarray:
    """w such that w @ y (oldest first) = OLS prediction at x = predict_at."""
    return 1.0 / LR_LENGTH + (predict_at - _XBAR) * (_X - _XBAR) / _SXX


_LR_W = lr_weights(LR_LENGTH + 1)  # + ceil(max migration time / 300 s) = 1 for any VM here
_LR_W_NEWEST_FIRST = _LR_W[::-1].copy()


def _watts(table: np.ndarray, util: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """Power as the placement sees it: PowerModelSpecPower.getPower, whose value at 0 % is the
    host's idle power.  Only the energy accounting treats a host idle at the start of an
    interval as off (0 W); the placement never does, so waking an empty host costs just the
    step from idle to its new load."""
    return power_at(table, util, rows)


# ---------------------------------------------------------------- overload detectors


class Detector:
    """isHostOverUtilized for one family.  `hist` rows are MIPS-weighted sums, newest first."""

    name = "abstract"
    vector_after = False  # can test "overloaded after adding a VM" for all hosts at once

    def over_one(self, reqsum: float, total: float, hist: np.ndarray) -> bool:
        raise NotImplementedError

    def over_all(self, reqsum: np.ndarray, total: np.ndarray, hist: np.ndarray, has_vms: np.ndarray) -> np.ndarray:
        out = np.zeros(reqsum.shape[0], dtype=bool)
        for h in np.flatnonzero(has_vms):
            out[h] = self.over_one(float(reqsum[h]), float(total[h]), hist[h])
        return out


class StaticThreshold(Detector):
    vector_after = True

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.name = f"thr-{threshold:g}"

    def over_one(self, reqsum, total, hist):
        return reqsum / total > self.threshold

    def over_all(self, reqsum, total, hist, has_vms):
        return reqsum / total > self.threshold

    def over_after(self, reqsum_after, total, hist, vrow, tail_nz, vtail):
        return reqsum_after / total > self.threshold


class _Robust(Detector):
    """IQR / MAD: threshold 1 - k * spread of the host's history; fallback under 12 values."""

    def __init__(self, safety: float):
        self.safety = safety

    def spread(self, data: list[float]) -> float:
        raise NotImplementedError

    def over_one(self, reqsum, total, hist):
        n = _trim_len(hist)
        if n >= 12:  # "12 has been suggested as a safe value"
            threshold = 1.0 - self.safety * self.spread((hist[:n] / total).tolist())
        else:
            threshold = FALLBACK_THRESHOLD
        return reqsum / total > threshold


class InterQuartileRange(_Robust):
    def __init__(self, safety: float):
        super().__init__(safety)
        self.name = f"iqr-{safety:g}"

    def spread(self, data):
        return iqr(data)


class MedianAbsoluteDeviation(_Robust):
    def __init__(self, safety: float):
        super().__init__(safety)
        self.name = f"mad-{safety:g}"

    def spread(self, data):
        return mad(data)


class LocalRegression(Detector):
    vector_after = True

    def __init__(self, safety: float):
        self.safety = safety
        self.name = f"lr-{safety:g}"

    def over_one(self, reqsum, total, hist):
        if _trim_len(hist) < LR_LENGTH:
            return reqsum / total > FALLBACK_THRESHOLD
        predicted = float(hist[:LR_LENGTH] @ _LR_W_NEWEST_FIRST) / total
        return predicted * self.safety >= 1.0

    def over_all(self, reqsum, total, hist, has_vms):
        long_enough = (hist[:, LR_LENGTH - 1:] != 0).any(axis=1)
        return self._decide(reqsum, total, hist[:, :LR_LENGTH] @ _LR_W_NEWEST_FIRST, long_enough)

    def over_after(self, reqsum_after, total, hist, vrow, tail_nz, vtail):
        pred = hist[:, :LR_LENGTH] @ _LR_W_NEWEST_FIRST + float(vrow[:LR_LENGTH] @ _LR_W_NEWEST_FIRST)
        return self._decide(reqsum_after, total, pred, tail_nz | vtail)

    def _decide(self, reqsum, total, pred_mips, long_enough):
        return np.where(long_enough, pred_mips / total * self.safety >= 1.0, reqsum / total > FALLBACK_THRESHOLD)


# ---------------------------------------------------------------- the allocation policy


@dataclass
class Cluster:
    """What the allocation policy reads: arrays owned by the engine (read-only here)."""

    total: np.ndarray  # (H,) host MIPS
    pe: np.ndarray  # (H,) MIPS of one PE
    ram_cap: np.ndarray  # (H,)
    vm_slots: np.ndarray  # (H,) host bandwidth / VM bandwidth
    power: np.ndarray  # (H, 11)
    vm_ram: np.ndarray  # (V,)
    vm_mips: np.ndarray  # (V,)


class MigrationPolicy:
    """PowerVmAllocationPolicyMigrationAbstract with a detector and minimum-migration-time VM selection."""

    migrations = True

    def __init__(self, name: str, detector: Detector):
        self.name = name
        self.detector = detector

    # ------------------------------------------------ initial placement (findHostForVm at VM creation)

    def initial_placement(self, c: Cluster) -> np.ndarray:
        """Each VM, in id order, to the host whose power grows least.

        While being instantiated a VM asks for its full MIPS; VMs already
        placed ask for nothing yet (their cloudlets are not submitted) but keep
        their full MIPS allocated — so the overload test after allocation sees
        only the new VM.  The host's "current power" is its idle power.
        """
        H, V = c.total.shape[0], c.vm_mips.shape[0]
        alloc = np.zeros(H)
        ram = np.zeros(H)
        n = np.zeros(H, dtype=np.int64)
        # host.getPower() before any update: utilisation 0, i.e. the idle power of the table.
        p_now = c.power[:, 0].copy()
        placement = np.full(V, -1, dtype=np.int64)
        # No history yet: every adaptive detector falls back to the static 0.7.
        threshold = getattr(self.detector, "threshold", FALLBACK_THRESHOLD)
        for v in range(V):
            m = c.vm_mips[v]
            ok = (c.pe >= m) & (c.total - alloc >= m) & (ram + c.vm_ram[v] <= c.ram_cap) & (n < c.vm_slots)
            ok &= (alloc == 0) | ~(m / c.total > threshold)
            idx = np.flatnonzero(ok)
            if idx.size == 0:
                continue
            pd = _watts(c.power, (alloc[idx] + m) / c.total[idx], idx) - p_now[idx]
            h = int(idx[int(np.argmin(pd))])
            placement[v] = h
            alloc[h] += m
            ram[h] += c.vm_ram[v]
            n[h] += 1
        return placement

    # ------------------------------------------------ optimizeAllocation

    def optimize(self, c: Cluster, lists: list[list[int]], busy: np.ndarray, util_last: np.ndarray,
                 req: np.ndarray, host_alloc: np.ndarray, host_reqsum: np.ndarray, host_avail: np.ndarray,
                 host_ram: np.ndarray, host_n: np.ndarray, vm_hist: np.ndarray, host_hist: np.ndarray,
                 second_hops: bool = True) -> list[tuple[int, int]]:
        """The migration map [(vm, target host)] for this scheduling interval.

        Arrays describe the allocation at this instant and are modified in
        place as a scratch copy (CloudSim saves and restores its allocation).
        `vm_hist` (V, 30) is each VM's utilisation history times its MIPS,
        newest first; `host_hist` (H, 30) its sum over the host's VMs.
        `second_hops=False` plans as CloudSim's own comment intends (a host that
        took VMs from an overloaded one is not evacuated in the same round):
        the realistic model's executor moves a VM once at a time.
        """
        d = self.detector
        total = c.total
        vtail = (vm_hist[:, LR_LENGTH - 1:] != 0).any(axis=1)
        tail_nz = (host_hist[:, LR_LENGTH - 1:] != 0).any(axis=1)
        # host.getPower() is read from the last update, not from the scratch
        # state, so a host that already took a VM this round looks dearer
        # (its "after" utilisation counts the scratch VMs, its "now" does not).
        p_last = _watts(c.power, util_last, None)

        def create(v: int, h: int) -> None:
            r = req[v]
            lists[h].append(v)
            host_alloc[h] += r
            host_avail[h] -= r
            host_reqsum[h] += r
            host_ram[h] += c.vm_ram[v]
            host_n[h] += 1
            host_hist[h] += vm_hist[v]
            tail_nz[h] |= vtail[v]

        def destroy(v: int, h: int) -> None:
            r = req[v]
            lists[h].remove(v)
            host_alloc[h] -= r
            host_avail[h] += r
            host_reqsum[h] -= r
            host_ram[h] -= c.vm_ram[v]
            host_n[h] -= 1
            host_hist[h] -= vm_hist[v]
            tail_nz[h] = bool((host_hist[h, LR_LENGTH - 1:] != 0).any())

        def find_host(v: int, excluded: np.ndarray) -> int:
            r = req[v]
            ok = ~excluded & (c.pe >= r) & (host_avail >= r) & (host_ram + c.vm_ram[v] <= c.ram_cap) \
                & (host_n < c.vm_slots)
            if d.vector_after:
                ok &= (host_alloc == 0) | ~d.over_after(host_reqsum + r, total, host_hist, vm_hist[v], tail_nz,
                                                        vtail[v])
            idx = np.flatnonzero(ok)
            if idx.size == 0:
                return -1
            after = (host_alloc[idx] + r) / total[idx]
            pd = _watts(c.power, after, idx) - p_last[idx]
            pd[after > 1.0] = np.inf  # the power model rejects > 100 %
            while True:
                j = int(np.argmin(pd))  # first minimum = lowest host id, like CloudSim's strict "<"
                if not np.isfinite(pd[j]):
                    return -1
                h = int(idx[j])
                if d.vector_after or host_alloc[h] == 0 or not d.over_one(
                        host_reqsum[h] + r, total[h], host_hist[h] + vm_hist[v]):
                    return h
                pd[j] = np.inf

        has_vms = host_n > 0
        over = d.over_all(host_reqsum, total, host_hist, has_vms) & has_vms

        # VMs out of each overloaded host, least RAM first, until it is not overloaded.
        to_move: list[int] = []
        for h in np.flatnonzero(over):
            h = int(h)
            while True:
                cands = [v for v in lists[h] if not busy[v]]
                if not cands:
                    break
                v = min(cands, key=lambda x: c.vm_ram[x])  # first of the least RAM in the host's list order
                to_move.append(v)
                destroy(v, h)
                if not d.over_one(float(host_reqsum[h]), float(total[h]), host_hist[h]):
                    break

        migration_map: list[tuple[int, int]] = []
        excluded = over.copy()
        for v in sorted(to_move, key=lambda x: -req[x]):  # stable: ties keep their order
            h = find_host(v, excluded)
            if h >= 0:
                create(v, h)
                migration_map.append((v, h))

        # Under-utilised hosts, least utilised first, evacuated all-or-nothing.
        switched_off = util_last == 0
        # CloudSim 3.0.3 means to exclude the hosts that just took VMs from the
        # overloaded ones, but reads them from the under-utilised phase's own
        # (still empty) migration map, so they stay candidates: such a host can
        # be evacuated in the same round, sending a VM placed a moment ago on a
        # second hop (two migrations of one VM, both counted).
        excl_under = over | switched_off
        excl_place = over | switched_off
        if not second_hops:
            for _, t in migration_map:
                excl_under[t] = True
        cand = np.flatnonzero(~excl_under & (util_last > 0) & (util_last < 1))
        order = cand[np.lexsort((cand, util_last[cand]))]
        for h in order:
            h = int(h)
            if excl_under[h]:
                continue
            excl_under[h] = True
            excl_place[h] = True
            vms = [v for v in lists[h] if not busy[v]]
            if not vms:
                continue
            placed: list[tuple[int, int]] = []
            for v in sorted(vms, key=lambda x: -req[x]):
                t = find_host(v, excl_place)
                if t < 0:
                    for pv, ph in reversed(placed):
                        destroy(pv, ph)
                    placed = []
                    break
                create(v, t)
                placed.append((v, t))
            for _, t in placed:
                excl_under[t] = True
            migration_map.extend(placed)
        return migration_map


class NoMigrationPolicy:
    """npa / dvfs: PowerVmAllocationPolicySimple — first fit at creation, never a migration."""

    migrations = False

    def __init__(self, name: str):
        self.name = name

    def initial_placement(self, c: Cluster) -> np.ndarray:
        return first_fit(c)


def first_fit(c: Cluster) -> np.ndarray:
    """PowerVmAllocationPolicyAbstract.findHostForVm: the first suitable host for the full MIPS."""
    H, V = c.total.shape[0], c.vm_mips.shape[0]
    alloc = np.zeros(H)
    ram = np.zeros(H)
    n = np.zeros(H, dtype=np.int64)
    placement = np.full(V, -1, dtype=np.int64)
    for v in range(V):
        m = c.vm_mips[v]
        ok = (c.pe >= m) & (c.total - alloc >= m) & (ram + c.vm_ram[v] <= c.ram_cap) & (n < c.vm_slots)
        idx = np.flatnonzero(ok)
        if idx.size == 0:
            continue
        h = int(idx[0])
        placement[v] = h
        alloc[h] += m
        ram[h] += c.vm_ram[v]
        n[h] += 1
    return placement


CLOUDSIM_POLICIES = {
    "npa": lambda: NoMigrationPolicy("npa"),
    "dvfs": lambda: NoMigrationPolicy("dvfs"),
    "thr-mmt-0.8": lambda: MigrationPolicy("thr-mmt-0.8", StaticThreshold(0.8)),
    "iqr-mmt-1.5": lambda: MigrationPolicy("iqr-mmt-1.5", InterQuartileRange(1.5)),
    "mad-mmt-2.5": lambda: MigrationPolicy("mad-mmt-2.5", MedianAbsoluteDeviation(2.5)),
    "lr-mmt-1.2": lambda: MigrationPolicy("lr-mmt-1.2", LocalRegression(1.2)),
}
