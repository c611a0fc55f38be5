"""Text tables of a ClusterView, shared by `enersis status` and the demo's live view."""

from __future__ import annotations

import re

from enersis.common.messages import DOMAIN_STATES

from .view import ClusterView, CommandRecord, NodeRecord

STATE_MARK = {
    "online": "on",
    "waking": "waking",
    "shutting_down": "stopping",
    "off": "off",
    "offline": "agent-down",
    "stale": "stale",
    "hypervisor-down": "hv-down",
    "unknown": "?",
    "silent": "silent",
}


def bar(pct: float, width: int = 20) -> str:
    pct = max(0.0, min(100.0, pct))
    filled = int(round(pct / 100 * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def node_rows(view: ClusterView, now_ms: int, *, extra_nodes: tuple[str, ...] = (), vm_names: bool = True,
              bar_width: int = 20) -> list[str]:
    names = sorted(set(view.nodes) | set(extra_nodes), key=_natural)
    lines = [f"{'NODE':<12} {'STATE':<10} {'LOAD':<{bar_width + 2}} {'CPU%':>5} {'VMS':>3} {'MEM GiB':>11}  "
             + ("VMS ON IT" if vm_names else "LAST HEARD")]
    for name in names:
        rec = view.nodes.get(name)
        state = rec.state(now_ms) if rec else "silent"
        lines.append(_node_line(rec, name, state, now_ms, vm_names, bar_width))
    return lines


def _node_line(rec: NodeRecord | None, name: str, state: str, now_ms: int, vm_names: bool, bar_width: int) -> str:
    t = rec.telemetry if rec else None
    live = t is not None and state in ("online", "shutting_down", "stale", "hypervisor-down")
    load = bar(t.cpu_pct if live else 0.0, bar_width) if live else " " * (bar_width + 2)
    cpu = f"{t.cpu_pct:5.1f}" if live else "    -"
    vms = [d for d in t.domains if d.running] if live else []
    if live:
        used = (t.mem_total_kib - t.mem_free_kib) / 2**20
        mem = f"{used:4.1f}/{t.mem_total_kib / 2**20:<5.1f}"
    else:
        mem = " " * 10
    if vm_names:
        tail = " ".join(sorted((d.name for d in vms), key=_natural))
    else:
        tail = f"{(now_ms - rec.telemetry_ts_ms) / 1000:.1f}s ago" if rec and rec.telemetry_ts_ms else "-"
    return (f"{name:<12} {STATE_MARK.get(state, state):<10} {load} {cpu} {len(vms) if live else '-':>3} "
            f"{mem:>11}  {tail}").rstrip()


def vm_rows(view: ClusterView, now_ms: int) -> list[str]:
    lines = [f"{'VM':<16} {'NODE':<12} {'STATE':<9} {'VCPUS':>5} {'MEM MiB':>8} {'CPU% NODE':>9} {'CPU% VCPU':>9}"]
    # During a migration both nodes' latest reports may list the VM: show it once, where the newest report puts it.
    newest: dict[str, tuple[int, str, object]] = {}
    for rec in view.nodes.values():
        if rec.telemetry is None or rec.state(now_ms) in ("off", "offline"):
            continue
        for d in rec.telemetry.domains:
            if d.name not in newest or rec.telemetry_ts_ms > newest[d.name][0]:
                newest[d.name] = (rec.telemetry_ts_ms, rec.name, d)
    rows = [(name, node, d) for name, (_, node, d) in newest.items()]
    for name, node, d in sorted(rows, key=lambda r: (_natural(r[0]), _natural(r[1]))):
        lines.append(f"{name:<16} {node:<12} {DOMAIN_STATES.get(d.state, str(d.state)):<9} {d.vcpus:>5} "
                     f"{d.mem_kib // 1024:>8} {d.cpu_node_pct:>9.1f} {d.cpu_vcpu_pct:>9.1f}")
    return lines


def command_rows(commands: list[CommandRecord], now_ms: int, limit: int = 10) -> list[str]:
    lines = []
    for c in commands[-limit:]:
        subject = " ".join(x for x in (c.vm, c.node) if x)
        age = (now_ms - c.last_ts_ms) / 1000
        reason = f" - {c.reason}" if c.reason else ""
        lines.append(f"  {c.status:<9} {c.kind:<14} {subject:<22} {c.command_id[:12]:<12} {age:5.1f}s ago{reason}")
    return lines


def _natural(name: str) -> tuple:
    """node-2 before node-10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))
