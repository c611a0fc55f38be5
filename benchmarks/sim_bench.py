"""Every simulator policy on every PlanetLab day under both models, as a markdown table.

Usage: python benchmarks/sim_bench.py [--traces DIR] [--out FILE.md] [--days D1,D2] [--policies P1,P2]

Prints the table (and writes it with --out).  Runs one simulation at a time:
the runtime column is the wall time of that one run on this machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from enersis.simulator.main import simulate
from enersis.simulator.policies import POLICY_NAMES

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TRACES = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "traces", "planetlab"))

# The fidelity table: CloudSim 3.0.3 measured on a 2-core machine.
CLOUDSIM = {
    ("20110303", "npa"): (2410.80, 0, None, None, None),
    ("20110303", "dvfs"): (802.75, 0, 0.0, 0.0, 0.0),
    ("20110303", "thr-mmt-0.8"): (192.62, 26711, 4.91, 0.06, 0.00318),
    ("20110303", "iqr-mmt-1.5"): (189.98, 26282, 4.82, 0.06, 0.00301),
    ("20110303", "mad-mmt-2.5"): (185.79, 26556, 5.05, 0.07, 0.00334),
    ("20110303", "lr-mmt-1.2"): (163.48, 27859, 5.86, 0.08, 0.00464),
    ("20110306", "thr-mmt-0.8"): (144.74, 20908, 5.13, 0.07, 0.00360),
    ("20110306", "lr-mmt-1.2"): (123.28, 20878, 5.88, 0.08, 0.00462),
    ("20110309", "thr-mmt-0.8"): (165.27, 23475, 5.26, 0.08, 0.00405),
    ("20110309", "lr-mmt-1.2"): (142.09, 24959, 6.55, 0.09, 0.00602),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", default=DEFAULT_TRACES)
    ap.add_argument("--out")
    ap.add_argument("--days")
    ap.add_argument("--policies")
    args = ap.parse_args(argv)
    days = args.days.split(",") if args.days else sorted(d for d in os.listdir(args.traces)
                                                          if os.path.isdir(os.path.join(args.traces, d)))
    policies = args.policies.split(",") if args.policies else list(POLICY_NAMES)
    lines = [
        f"Simulator benchmark — {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} cores, "
        f"python {sys.version.split()[0]}",
        "",
        "| day | VMs | model | policy | kWh | fluid LB kWh | SLATAH % | PDM % | SLAV % | ESV | migrations "
        "| host shutdowns | boots | runtime s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    results = {}
    for day in days:
        for model in ("cloudsim", "realistic"):
            for pol in policies:
                r = simulate(os.path.join(args.traces, day), pol, model)
                results[(day, model, pol)] = r
                row = (f"| {day} | {r.vms} | {model} | {pol} | {r.energy_kwh:.2f} | {r.fluid_kwh:.2f} "
                       f"| {r.slatah * 100:.2f} | {r.pdm * 100:.4f} | {r.slav * 100:.5f} | {r.esv:.5f} "
                       f"| {r.migrations} | {r.host_shutdowns} | {r.boots} | {r.runtime_s:.1f} |")
                lines.append(row)
                print(row, flush=True)
    comp = ["", "Fidelity against the issue's CloudSim 3.0.3 table (cloudsim model):", "",
            "| day | policy | kWh CloudSim | kWh ours | Δ energy | migrations CloudSim | ours | Δ migrations "
            "| SLATAH % CloudSim / ours | PDM % CloudSim / ours | SLAV % CloudSim / ours |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (day, pol), (kwh, mig, slatah, pdm, slav) in CLOUDSIM.items():
        r = results.get((day, "cloudsim", pol))
        if r is None:
            continue
        de = (r.energy_kwh - kwh) / kwh * 100
        dm = f"{(r.migrations - mig) / mig * 100:+.1f} %" if mig else ("0" if r.migrations == 0 else "n/a")
        fmt = lambda x, d: "—" if x is None else f"{x:.{d}f}"  # noqa: E731
        comp.append(f"| {day} | {pol} | {kwh:.2f} | {r.energy_kwh:.2f} | {de:+.1f} % | {mig} | {r.migrations} | {dm} "
                    f"| {fmt(slatah, 2)} / {r.slatah * 100:.2f} | {fmt(pdm, 2)} / {r.pdm * 100:.3f} "
                    f"| {fmt(slav, 5)} / {r.slav * 100:.5f} |")
    print("\n".join(comp), flush=True)
    lines += comp
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
