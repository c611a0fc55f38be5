#!/usr/bin/env python3
"""What a whole demo cluster costs on this machine, and how fast the operator CLI answers on it.

Runs `enersis demo` (all its processes) against the private broker, and while
it runs: the time until the cluster is live, `enersis status` wall time,
`enersis send migrate` round trips (publish -> accepted -> succeeded), then
the CPU seconds and resident memory of every process of the run (sampled from
/proc), and the time to stop everything.  Prints figures; asserts nothing.

    ENERSIS_BROKER_DIR=... python benchmarks/demo_bench.py [--nodes 8] [--duration 90]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def run_processes(run_dir: str) -> dict[int, tuple[float, int]]:
    """pid -> (cpu seconds, rss bytes) of every process whose command line names the run folder."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if run_dir not in cmd:
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
            rss = int(fields[21]) * PAGE
            out[int(pid)] = (cpu, rss)
        except (OSError, IndexError, ValueError):
            continue
    return out


def cli(*args: str) -> tuple[int, str, float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "enersis.cli", *args], capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout + r.stderr, time.monotonic() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--duration", type=float, default=90)
    p.add_argument("--migrations", type=int, default=5)
    p.add_argument("--port-base", type=int, default=46100)
    a = p.parse_args()
    run_dir = f"/var/lib/enersis-demo/bench-{uuid.uuid4().hex[:8]}"
    summary = f"{run_dir}.summary.json"
    env = dict(os.environ)
    env.pop("ENERSIS_AMQP_URL", None)
    t0 = time.monotonic()
    demo = subprocess.Popen([sys.executable, "-m", "enersis.cli", "demo", "--nodes", str(a.nodes), "--duration",
                             str(a.duration), "--live", "lines", "--run-dir", run_dir, "--port-base", str(a.port_base),
                             "--summary-json", summary, "--vhost", f"bench-{uuid.uuid4().hex[:6]}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    stamped: list[tuple[float, str]] = []

    def read() -> None:
        for line in demo.stdout:
            stamped.append((time.monotonic(), line))

    threading.Thread(target=read, daemon=True).start()

    def seen(text: str) -> float | None:
        return next((t for t, l in stamped if text in l), None)

    while seen("the cluster is live") is None:
        if demo.poll() is not None:
            print("".join(l for _, l in stamped))
            return 1
        time.sleep(0.1)
    live_s = seen("the cluster is live") - t0
    config = f"{run_dir}/operator.toml"
    peak_rss, cpu_seen = 0, {}
    code, out, status_s = cli("status", "--config", config, "--vms")
    placement = dict(re.findall(r"^(vm-\d+)\s+(node-\d+)", out, re.M))
    nodes = sorted(set(placement.values()))
    rtts = []
    for i, (vm, node) in enumerate(sorted(placement.items())[: a.migrations]):
        target = next(n for n in nodes if n != node)
        code, out, s = cli("send", "migrate", vm, "--from", node, "--to", target, "--config", config, "--timeout", "60")
        rtts.append((s, code))
        procs = run_processes(run_dir)
        peak_rss = max(peak_rss, sum(r for _, r in procs.values()))
        cpu_seen.update({pid: c for pid, (c, _) in procs.items()})
    while demo.poll() is None and seen("stopping:") is None:
        procs = run_processes(run_dir)
        peak_rss = max(peak_rss, sum(r for _, r in procs.values()))
        cpu_seen.update({pid: c for pid, (c, _) in procs.items()})
        time.sleep(1)
    demo.wait()
    stop_s = time.monotonic() - (seen("stopping:") or time.monotonic())
    s = json.loads(Path(summary).read_text())
    total = time.monotonic() - t0
    print(f"demo with {a.nodes} nodes, {s['vms']} VMs, {a.duration:g}s run on {os.cpu_count()} CPUs")
    print(f"  start to live (broker up): {live_s:.1f}s; stop after the run: {stop_s:.1f}s; whole: {total:.1f}s")
    print(f"  CPU used by the demo's {len(cpu_seen)} processes (demo view, stand-in NICs and sshds, agents, power service, arbiter; "
          f"an exited process counts as last sampled): {sum(cpu_seen.values()):.1f} s over {a.duration:g}s = "
          f"{100 * sum(cpu_seen.values()) / a.duration:.0f}% of one core")
    print(f"  peak resident memory of those processes: {peak_rss / 2**20:.0f} MiB")
    print(f"  enersis status (listen until every node spoke twice): {status_s:.1f}s wall, exit {code}")
    ok = [t for t, c in rtts if c == 0]
    if ok:
        print(f"  enersis send migrate round trip (process start, confirm, executor, result): "
              f"median {statistics.median(ok):.2f}s, max {max(ok):.2f}s over {len(ok)} ({len(rtts) - len(ok)} failed)")
    print(f"  summary: saved {s['saved_pct']}%, {s['migrations']} migrations, {s['shutdowns']} shutdowns, "
          f"{s['wakes']} wakes, {len(s['vms_lost'])} VMs lost, problems {s['problems']}")
    subprocess.run(["rm", "-rf", run_dir, summary])
    return 0


if __name__ == "__main__":
    sys.exit(main())
