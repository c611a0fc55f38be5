"""PlanetLab workload traces: one VM per file, one integer CPU % per line, 300 s apart."""

from __future__ import annotations

import logging
import os

import numpy as np

log = logging.getLogger("enersis.simulator.traces")

#: samples per trace file (24 h at 300 s) — CloudSim reads exactly this many
SAMPLES = 288
INTERVAL_S = 300.0


class TraceError(ValueError):
    """A trace folder or file that cannot be simulated; the message says which and why."""


def load_trace_dir(path: str, limit: int | None = None) -> tuple[list[str], np.ndarray]:
    """File names (sorted) and utilisation fractions, shape (files, SAMPLES + 1).

    Like CloudSim's UtilizationModelPlanetLabInMemory, the 289th value repeats
    the 288th so that interpolation up to the end of the day has a right end.
    """
    if not os.path.isdir(path):
        raise TraceError(f"trace folder {path!r} does not exist or is not a folder")
    names = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)) and not n.startswith("."))
    if limit is not None:
        names = names[:limit]
    if not names:
        raise TraceError(f"trace folder {path!r} holds no trace files")
    data = np.empty((len(names), SAMPLES + 1), dtype=np.float64)
    for i, name in enumerate(names):
        full = os.path.join(path, name)
        try:
            with open(full, "rb") as f:
                values = f.read().split()[:SAMPLES]
            row = np.array(values, dtype=np.int64)
        except (OSError, ValueError) as exc:
            raise TraceError(f"trace file {full!r} is unreadable: {exc}") from None
        if row.size < SAMPLES:
            raise TraceError(f"trace file {full!r} has {row.size} values; a day needs {SAMPLES}")
        if row.min() < 0 or row.max() > 100:
            raise TraceError(f"trace file {full!r} has CPU % outside 0..100")
        data[i, :SAMPLES] = row / 100.0
        data[i, SAMPLES] = data[i, SAMPLES - 1]
    return names, data
