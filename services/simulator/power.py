"""Host types and their power models (SPECpower tables, linear between the 10 % points)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class HostType:
    name: str
    pes: int
    pe_mips: float
    ram_mib: int
    bw_kbps: int
    power_w: tuple[float, ...]  # watts at 0, 10, ..., 100 % load

    @property
    def mips(self) -> float:
        return self.pes * self.pe_mips


# The two hosts of CloudSim 3.0.3's power examples (Constants.HOST_*), with
# PowerModelSpecPowerHpProLiantMl110G4Xeon3040 / ...G5Xeon3075.
ML110_G4 = HostType("HP ProLiant ML110 G4", 2, 1860.0, 4096, 1_000_000,
                    (86, 89.4, 92.6, 96, 99.5, 102, 106, 108, 112, 114, 117))
ML110_G5 = HostType("HP ProLiant ML110 G5", 2, 2660.0, 4096, 1_000_000,
                    (93.7, 97, 101, 105, 110, 116, 121, 125, 129, 133, 135))
CLOUDSIM_HOST_TYPES = (ML110_G4, ML110_G5)


def power_table(types: list[HostType] | tuple[HostType, ...]) -> np.ndarray:
    """(hosts, 11) watts at each 10 % step."""
    return np.array([t.power_w for t in types], dtype=np.float64)


def power_at(table: np.ndarray, util: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Watts of each host at utilisation `util` (0..1): CloudSim's PowerModelSpecPower.getPower.

    `rows` selects the table row of each value (default: row i for value i).
    """
    u = np.clip(util, 0.0, 1.0)
    x = u * 10.0
    i = np.minimum(np.floor(x).astype(np.int64), 9)
    tab = table if rows is None else table[rows]
    ar = np.arange(tab.shape[0])
    p1 = tab[ar, i]
    p2 = tab[ar, i + 1]
    return p1 + (p2 - p1) / 10.0 * (u - i / 10.0) * 100.0


def power_scalar(row: np.ndarray, util: float) -> float:
    u = min(max(util, 0.0), 1.0)
    i = min(int(u * 10.0), 9)
    p1, p2 = row[i], row[i + 1]
    return float(p1 + (p2 - p1) / 10.0 * (u - i / 10.0) * 100.0)
