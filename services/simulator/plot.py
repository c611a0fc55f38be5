"""PNG of a run: active hosts and power over the day, against no power management."""

from __future__ import annotations

from .engine import Result


def plot_result(r: Result, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    hours = [t / 3600.0 for t in r.series_t]
    npa_kw = r.npa_kwh / (r.series_t[-1] / 3600.0) if r.series_t else 0.0
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ax1.step(hours, r.series_active, where="post", label=f"{r.policy} ({r.model})")
    ax1.axhline(r.hosts, color="grey", linestyle="--", label="no power management (all hosts on)")
    ax1.set_ylabel("hosts on")
    ax1.legend(loc="upper right", fontsize="small")
    ax2.plot(hours, [p / 1000.0 for p in r.series_power_w], label=f"{r.policy}: {r.energy_kwh:.1f} kWh")
    ax2.axhline(npa_kw, color="grey", linestyle="--", label=f"no power management: {r.npa_kwh:.1f} kWh")
    ax2.set_ylabel("power (kW)")
    ax2.set_xlabel("hour of the day")
    ax2.legend(loc="upper right", fontsize="small")
    fig.suptitle(f"{r.trace}: {r.vms} VMs, {r.hosts} hosts")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
