"""The demo's live view and summary, read from the bus as an operator reads it."""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from enersis.common.codec import Envelope, now_ms
from enersis.common.messages import NodeTelemetry
from enersis.ops.render import command_rows, node_rows
from enersis.ops.view import ClusterView
from enersis.ops.watch import BusWatcher

from .energy import Ledger, PowerModel, Tally


def fmt_sim(seconds: float) -> str:
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


@dataclass
class Monitor:
    watcher: BusWatcher
    nodes: tuple[str, ...]
    vm_count: int
    speedup: float
    duration_s: float
    model: PowerModel = field(default_factory=PowerModel)
    out: TextIO = sys.stdout
    live: str = "auto"  # "screen" redraws a terminal; "lines" prints a status line now and then; "off"
    header: str = ""
    footer: list[str] = field(default_factory=list)
    ledger: Ledger = field(init=False)
    tally: Tally = field(default_factory=Tally)
    started: float = field(default_factory=time.monotonic)
    _last_step: float = 0.0
    _last_draw: float = 0.0

    def __post_init__(self) -> None:
        self.ledger = Ledger(self.model, self.nodes)
        if self.live == "auto":
            self.live = "screen" if self.out.isatty() else "lines"
        self.watcher.listeners.append(self._on_envelope)

    @property
    def view(self) -> ClusterView:
        return self.watcher.view

    def _on_envelope(self, env: Envelope) -> None:
        m = env.message
        if isinstance(m, NodeTelemetry):
            self.ledger.reports += 1
            if m.cpu_pct >= self.model.sla_pct:
                self.ledger.sla_reports += 1

    def restart_clock(self) -> None:
        self.started = time.monotonic()
        self._last_step = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def poll(self, seconds: float) -> None:
        """Read the bus for `seconds`, account energy, redraw."""
        self.watcher.pump(seconds)
        now = time.monotonic()
        if self._last_step:
            self.ledger.step(self.view, now_ms(), (now - self._last_step) * self.speedup)
        self._last_step = now
        self.tally.update(self.view)
        if self.live == "screen" and now - self._last_draw >= 1.0:
            self._draw_screen()
            self._last_draw = now
        elif self.live == "lines" and now - self._last_draw >= 10.0:
            self.out.write(self.status_line() + "\n")
            self.out.flush()
            self._last_draw = now

    def running_vms(self) -> set[str]:
        now = now_ms()
        return {d.name for r in self.view.nodes.values() if r.telemetry and r.state(now) in ("online", "shutting_down")
                for d in r.telemetry.domains if d.running}

    def status_line(self) -> str:
        now = now_ms()
        states = [self.view.nodes[n].state(now) if n in self.view.nodes else "unknown" for n in self.nodes]
        return (f"[{self.elapsed():5.0f}s sim {fmt_sim(self.ledger.sim_s)}] on {states.count('online')}/{len(self.nodes)}"
                f" off {states.count('off')} waking {states.count('waking')} | VMs {len(self.running_vms())}/{self.vm_count}"
                f" | energy {self.ledger.actual_kwh:.2f} kWh vs {self.ledger.baseline_kwh:.2f} all-on"
                f" ({self.ledger.saved_pct:+.0f}% saved) | migrations {self.tally.get('MigrateVm')}"
                f" wakes {self.tally.get('WakeNode')} shutdowns {self.tally.get('ShutdownNode')}"
                f" in flight {len(self.view.in_flight())}")

    def screen_lines(self) -> list[str]:
        now = now_ms()
        width = shutil.get_terminal_size((120, 40)).columns
        bar_width = 20 if width >= 100 else 10
        lines = [self.header,
                 f"elapsed {self.elapsed():.0f}s of {self.duration_s:.0f}s   simulated time {fmt_sim(self.ledger.sim_s)}"
                 f"   (speed-up {self.speedup:g}x)", ""]
        lines += node_rows(self.view, now, extra_nodes=self.nodes, bar_width=bar_width)
        lines.append("")
        lines.append(f"energy so far: {self.ledger.actual_kwh:6.2f} kWh   all nodes on: {self.ledger.baseline_kwh:6.2f} kWh"
                     f"   saved {self.ledger.saved_pct:5.1f}%")
        lines.append(f"VMs running {len(self.running_vms())}/{self.vm_count}   migrations {self.tally.get('MigrateVm')}"
                     f" ({self.tally.failed('MigrateVm')} failed)   wakes {self.tally.get('WakeNode')}"
                     f"   shutdowns {self.tally.get('ShutdownNode')}   SLA reports >= {self.model.sla_pct:g}%: "
                     f"{self.ledger.sla_reports}/{self.ledger.reports}")
        flight = self.view.in_flight()
        lines.append(f"commands in flight ({len(flight)}):")
        lines += command_rows(flight, now, limit=6) or ["  -"]
        done = sorted((c for c in self.view.commands.values() if c.final), key=lambda c: c.last_ts_ms)
        lines.append("latest results:")
        lines += command_rows(done, now, limit=6) or ["  -"]
        lines += [""] + self.footer
        return [l[:width] for l in lines]

    def _draw_screen(self) -> None:
        self.out.write("\x1b[H\x1b[2J" + "\n".join(self.screen_lines()) + "\n")
        self.out.flush()

    def summary(self, ground_truth: dict[str, Any] | None = None) -> dict[str, Any]:
        now = now_ms()
        commands = list(self.view.commands.values())
        summary = {
            "elapsed_s": round(self.elapsed(), 1),
            "simulated_s": round(self.ledger.sim_s),
            "nodes": len(self.nodes),
            "vms": self.vm_count,
            "energy_kwh": round(self.ledger.actual_kwh, 4),
            "baseline_kwh": round(self.ledger.baseline_kwh, 4),
            "saved_kwh": round(self.ledger.baseline_kwh - self.ledger.actual_kwh, 4),
            "saved_pct": round(self.ledger.saved_pct, 1),
            "node_hours_by_state": {k: round(v / 3600, 2) for k, v in sorted(self.ledger.state_s.items())},
            "migrations": self.tally.get("MigrateVm"),
            "migrations_failed": self.tally.failed("MigrateVm"),
            "wakes": self.tally.get("WakeNode"),
            "wakes_failed": self.tally.failed("WakeNode"),
            "shutdowns": self.tally.get("ShutdownNode"),
            "shutdowns_failed": self.tally.failed("ShutdownNode"),
            "skipped": sum(1 for c in commands if c.status == "skipped"),
            "unfinished_commands": len(self.view.in_flight()),
            "sla_reports": self.ledger.sla_reports,
            "telemetry_reports": self.ledger.reports,
            "sla_pct": self.model.sla_pct,
            "vms_running_on_bus": len(self.running_vms()),
            "final_states": {n: (self.view.nodes[n].state(now) if n in self.view.nodes else "unknown") for n in self.nodes},
        }
        if ground_truth is not None:
            summary.update(ground_truth)
        return summary


def summary_text(s: dict[str, Any]) -> str:
    lines = [
        "",
        f"Enersis demo summary: {s['nodes']} nodes, {s['vms']} VMs, {s['elapsed_s']:.0f}s real = "
        f"{fmt_sim(s['simulated_s'])} simulated",
        f"  energy used      {s['energy_kwh']:.2f} kWh   (all nodes on: {s['baseline_kwh']:.2f} kWh)",
        f"  energy saved     {s['saved_kwh']:.2f} kWh = {s['saved_pct']:.1f}%",
        f"  migrations       {s['migrations']} succeeded, {s['migrations_failed']} failed or refused",
        f"  wakes            {s['wakes']} succeeded, {s['wakes_failed']} failed or refused",
        f"  shutdowns        {s['shutdowns']} succeeded, {s['shutdowns_failed']} failed or refused",
        f"  SLA violations   {s['sla_reports']} of {s['telemetry_reports']} node reports at >= {s['sla_pct']:g}% CPU",
        "  node-hours       " + ", ".join(f"{k} {v}" for k, v in s["node_hours_by_state"].items()),
    ]
    if "vms_lost" in s:
        lost = s["vms_lost"]
        lines.append(f"  VMs              {s['vms_running']} of {s['vms']} running at the end, "
                     f"{len(lost)} lost{': ' + ', '.join(lost) if lost else ''}")
    if s.get("unfinished_commands"):
        lines.append(f"  commands still in flight at the end: {s['unfinished_commands']}")
    for problem in s.get("problems", []):
        lines.append(f"  problem: {problem}")
    return "\n".join(lines)
