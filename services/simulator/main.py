"""Simulate a day of PlanetLab traces under a policy: energy, migrations and SLA metrics.

Models: `cloudsim` reproduces CloudSim 3.0.3's power-aware PlanetLab
experiment (idle hosts are free, power changes are instant, and a VM that
asks for 0 MIPS is dropped for the rest of the day, as CloudSim does); `realistic`
charges what a live cluster pays (power while off, booting and shutting
down; wake, wait for boot, migrate; power off only empty hosts).

Policies: npa, dvfs, thr-mmt-0.8, iqr-mmt-1.5, mad-mmt-2.5, lr-mmt-1.2 (CloudSim's),
and the live arbiter's own (enersis-2012, enersis-hysteresis), called through
the same pure decide() the arbiter uses.

Example: enersis simulate --trace traces/planetlab/20110303 --policy lr-mmt-1.2 --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from .engine import RealisticParams, Result, Simulation, cloudsim_hosts
from .policies import POLICY_NAMES, make_policy
from .traces import TraceError, load_trace_dir

log = logging.getLogger("enersis.simulator")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, metavar="DIR", help="folder of PlanetLab trace files (one VM per file)")
    p.add_argument("--policy", required=True, choices=POLICY_NAMES, metavar="NAME",
                   help="one of: " + ", ".join(POLICY_NAMES))
    p.add_argument("--model", choices=("cloudsim", "realistic"), default="cloudsim",
                   help="energy model (default cloudsim)")
    p.add_argument("--hosts", type=int, default=800, metavar="N",
                   help="hosts, alternating HP ML110 G4 / G5 (default 800, as CloudSim's experiment)")
    p.add_argument("--vms", type=int, default=None, metavar="N",
                   help="use only the first N trace files (sorted by name); default all")
    p.add_argument("--json", metavar="OUT.json", help="write the result as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="plot active hosts and power over the day against NPA")
    g = p.add_argument_group("realistic model")
    g.add_argument("--off-watts", type=float, default=RealisticParams.off_w, help="power drawn while off (W)")
    g.add_argument("--boot-s", type=float, default=RealisticParams.boot_s, help="seconds from wake to usable")
    g.add_argument("--shutdown-s", type=float, default=RealisticParams.shutdown_s, help="seconds to power off")
    g.add_argument("--no-ram-limits", action="store_true",
                   help="migrate without RAM limits, as CloudSim does (to see the power-state costs alone)")


class _Progress:
    """A one-line progress bar, only on a terminal (logs and pipes stay clean)."""

    def __init__(self, stream):
        self.stream = stream
        self.last = -1

    def __call__(self, k: int, total: int) -> None:
        pct = k * 100 // total
        if pct != self.last:
            self.last = pct
            bar = "#" * (pct // 4)
            self.stream.write(f"\r[{bar:<25}] {pct:3d}%  step {k}/{total}")
            if k == total:
                self.stream.write("\n")
            self.stream.flush()


def summary(r: Result) -> str:
    lines = [
        f"trace {r.trace}: {r.vms} VMs on {r.hosts} hosts, policy {r.policy}, model {r.model}",
        f"  energy        {r.energy_kwh:10.2f} kWh   (no power management: {r.npa_kwh:.2f} kWh,"
        f" fluid lower bound: {r.fluid_kwh:.2f} kWh)",
        f"  migrations    {r.migrations:10d}",
        f"  SLATAH        {r.slatah * 100:10.4f} %",
        f"  PDM           {r.pdm * 100:10.4f} %",
        f"  SLAV          {r.slav * 100:10.6f} %",
        f"  ESV           {r.esv:10.6f}",
        f"  host shutdowns{r.host_shutdowns:10d}   boots: {r.boots}   commands refused by the model: {r.rejected}",
        f"  runtime       {r.runtime_s:10.2f} s",
    ]
    if r.dropped:
        lines.insert(1, f"  {r.dropped} of the {r.vms} VMs asked for 0 MIPS at some point and were dropped"
                        " for the rest of the day, as CloudSim 3.0.3 does (cloudsim model only)")
    return "\n".join(lines)


def simulate(trace: str, policy: str, model: str = "cloudsim", hosts: int = 800, vms: int | None = None,
             realistic: RealisticParams = RealisticParams(), progress=None) -> Result:
    """Run one simulation; raises TraceError / ValueError with a message fit for a person."""
    if hosts < 1:
        raise ValueError("--hosts must be at least 1")
    began = time.perf_counter()
    _, util = load_trace_dir(trace, limit=vms)
    sim = Simulation(util, cloudsim_hosts(hosts), make_policy(policy), model=model, realistic=realistic,
                     trace=os.path.basename(os.path.normpath(trace)), progress=progress)
    result = sim.run()
    result.runtime_s = round(time.perf_counter() - began, 3)  # reading the traces included
    return result


def run(args: argparse.Namespace) -> int:
    progress = _Progress(sys.stdout) if sys.stdout.isatty() else None
    try:
        rp = RealisticParams(off_w=args.off_watts, boot_s=args.boot_s, shutdown_s=args.shutdown_s,
                             ram_limits=not args.no_ram_limits)
        result = simulate(args.trace, args.policy, args.model, args.hosts, args.vms, rp, progress)
    except (TraceError, ValueError) as exc:
        print(f"enersis simulate: {exc}", file=sys.stderr)
        return 2
    print(summary(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.as_json(), f, indent=2)
            f.write("\n")
    if args.plot:
        from .plot import plot_result  # matplotlib only when asked for

        plot_result(result, args.plot)
    return 0
