#!/usr/bin/env python3
"""How long power commands take end to end on the network-namespace lab.

    .venv/bin/python benchmarks/power_bench.py [--rounds 5]

Real parts only: the private broker (started if needed; honours
ENERSIS_BROKER_DIR / ENERSIS_AMQP_PORT / ...), the netns lab
(deploy/lab/netns_lab.py, built and removed here), real `enersis agent`
processes on a simulated hypervisor, and the power service in this process
with the real Wake-on-LAN / SSH switch.  Prints, per round: WakeNode
published -> succeeded received, the service's measured boot time
(packet -> NodeOnline), ShutdownNode published -> succeeded received, and
the service's SSH command -> NodeOffline time; then the lab's set-up and
tear-down times and the cost of one paramiko connection.  Needs root.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pika

from enersis.agent.simulated import SimulatedCluster
from enersis.common import topology
from enersis.common.bus import Consumer, Publisher
from enersis.common.config import BrokerSettings
from enersis.common.messages import CommandResult, ShutdownNode, WakeNode
from enersis.power.inventory import load_config
from enersis.power.main import PowerApp

REPO = Path(__file__).resolve().parents[1]
LAB = REPO / "deploy" / "lab" / "netns_lab.py"
NAME, SUBNET = "pwbench", "10.213.78.0/24"


def broker_info() -> dict:
    script = REPO / "deploy" / "rabbitmq" / "broker.py"
    if subprocess.run([sys.executable, str(script), "status"], capture_output=True).returncode != 0:
        subprocess.run([sys.executable, str(script), "start"], check=True)
    d = Path(os.environ.get("ENERSIS_BROKER_DIR", REPO / ".broker"))
    return json.loads((d / "broker.json").read_text())


def api(info: dict, method: str, path: str, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{info['mgmt_port']}/api/{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None)
    token = base64.b64encode(f"admin:{info['passwords']['admin']}".encode()).decode()
    req.add_header("Authorization", f"Basic {token}")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def settings(info: dict, user: str, vhost: str) -> BrokerSettings:
    return BrokerSettings(host="127.0.0.1", port=info["amqp_port"], vhost=vhost, user=user,
                          password=info["passwords"][user], heartbeat_s=10)


def fmt(xs: list[float]) -> str:
    return f"median {statistics.median(xs) * 1000:7.1f} ms  (min {min(xs) * 1000:7.1f}, max {max(xs) * 1000:7.1f}, n={len(xs)})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    info = broker_info()
    vhost = f"bench-{uuid.uuid4().hex[:8]}"
    api(info, "PUT", f"vhosts/{vhost}", {})
    for user, r in topology.ROLES.items():
        api(info, "PUT", f"permissions/{vhost}/{user}", {k: r[k] for k in ("configure", "write", "read")})
    conn = pika.BlockingConnection(settings(info, "admin", vhost).pika_parameters())
    topology.declare(conn.channel())
    conn.close()
    tmp = Path(tempfile.mkdtemp(prefix="power-bench-"))
    (tmp / "trace").write_text("20\n" * 288)
    SimulatedCluster.create(tmp / "cluster", nodes=["node-1", "node-2"], vms=0, traces=[str(tmp / "trace")])
    (tmp / "agent.password").write_text(info["passwords"]["agent"] + "\n")
    url = f"amqp://127.0.0.1:{info['amqp_port']}/{vhost}"
    for node in ("node-1", "node-2"):
        (tmp / f"{node}.toml").write_text(
            f'node = "{node}"\n[broker]\nurl = "{url}"\nuser = "agent"\npassword_file = "{tmp / "agent.password"}"\n'
            f'[hypervisor]\nuri = "sim://{tmp / "cluster"}"\n'
            "[telemetry]\nsample_interval_s = 0.2\npublish_interval_s = 1.0\nwindow_s = 1.0\n[executor]\nenabled = false\n")
    enersis = Path(sys.executable).parent / "enersis"
    env = {k: v for k, v in os.environ.items() if k != "ENERSIS_AMQP_URL"}
    t0 = time.monotonic()
    up = subprocess.run([sys.executable, str(LAB), "up", "--name", NAME, "--nodes", "node-1,node-2", "--subnet", SUBNET,
                         "--boot", f"{enersis} agent --config {tmp}/{{node}}.toml",
                         "--sim-cluster", str(tmp / "cluster")], capture_output=True, text=True, env=env)
    lab_up_s = time.monotonic() - t0
    if up.returncode != 0:
        print(up.stderr, file=sys.stderr)
        return 1
    lab = json.loads(up.stdout)
    results: dict[str, list[CommandResult]] = {}
    arrived = threading.Condition()

    def on_result(d) -> None:
        with arrived:
            results.setdefault(d.message.command_id, []).append((time.monotonic(), d.message))
            arrived.notify_all()

    def declare(ch) -> str:
        q = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        ch.queue_bind(q, topology.EX_RESULTS, routing_key="result.#")
        return q

    watch_pub = Publisher(settings(info, "operator", vhost), "bench")
    watcher = Consumer(settings(info, "operator", vhost), watch_pub, name="bench-watch")
    watcher.subscribe(declare, on_result, inline=True)
    watcher.start()
    config = load_config(lab["power_toml"])
    config = dataclasses.replace(config, settings=dataclasses.replace(config.settings, wake_timeout_s=60,
                                                                      shutdown_timeout_s=30, stale_after_s=5))
    app = PowerApp(config, broker=settings(info, "power", vhost)).start()
    arbiter = Publisher(settings(info, "arbiter", vhost), "arbiter")
    wake_e2e, boot, stop_e2e, down = [], [], [], []

    def run(cmd) -> CommandResult:
        t = time.monotonic()
        arbiter.publish(cmd)
        with arrived:
            ok = arrived.wait_for(lambda: any(r.final for _, r in results.get(cmd.command_id, [])), 90)
        if not ok:
            raise SystemExit(f"no final result for {cmd}")
        at, final = next((a, r) for a, r in results[cmd.command_id] if r.final)
        if final.status != "succeeded":
            raise SystemExit(f"{cmd.KIND} {final.status}: {final.reason}")
        return at - t, final

    try:
        watcher.ready.wait(15)
        app.ready.wait(15)
        for i in range(args.rounds):
            dt, r = run(WakeNode(command_id=uuid.uuid4().hex, node="node-1"))
            wake_e2e.append(dt)
            boot.append(r.details["boot_s"])
            # The node's first telemetry follows NodeOnline within a publish period: wait for it (evidence).
            deadline = time.monotonic() + 10
            while (app.tracker.status("node-1").telemetry_age_s or 99) > 1.0 and time.monotonic() < deadline:
                time.sleep(0.05)
            dt, r = run(ShutdownNode(command_id=uuid.uuid4().hex, node="node-1"))
            stop_e2e.append(dt)
            down.append(r.details["down_s"])
            print(f"round {i + 1}: wake {wake_e2e[-1]:.3f}s (boot {boot[-1]:.3f}s), "
                  f"shutdown {stop_e2e[-1]:.3f}s (SSH -> NodeOffline {down[-1]:.3f}s)", flush=True)
        import paramiko

        node = config.nodes["node-2"]
        connects = []
        for _ in range(10):
            c = paramiko.SSHClient()
            c.load_host_keys(node.known_hosts)
            c.set_missing_host_key_policy(paramiko.RejectPolicy())
            t = time.monotonic()
            c.connect(node.address, port=node.ssh_port, username=node.ssh_user, key_filename=node.ssh_key,
                      allow_agent=False, look_for_keys=False, timeout=5)
            connects.append(time.monotonic() - t)
            c.close()  # no exec: the forced command never runs
    finally:
        app.stop()
        watcher.stop()
        watch_pub.close()
        arbiter.close()
        t0 = time.monotonic()
        subprocess.run([sys.executable, str(LAB), "down", "--name", NAME], capture_output=True)
        lab_down_s = time.monotonic() - t0
        api(info, "DELETE", f"vhosts/{vhost}")
        subprocess.run(["rm", "-rf", str(tmp)])
    print()
    print(f"WakeNode published -> succeeded      {fmt(wake_e2e)}")
    print(f"  of which magic packet -> NodeOnline {fmt(boot)}  (agent start-up on this machine)")
    print(f"ShutdownNode published -> succeeded  {fmt(stop_e2e)}")
    print(f"  of which SSH command -> NodeOffline {fmt(down)}")
    print(f"paramiko connect + key auth          {fmt(connects)}")
    print(f"lab up (2 nodes) {lab_up_s:.2f}s, lab down {lab_down_s:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
