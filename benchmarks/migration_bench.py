#!/usr/bin/env python3
"""What the bus costs a live migration: (command published → succeeded received) ÷ (bare libvirt migrate).

    .venv/bin/python benchmarks/migration_bench.py [--rounds 4]

Real parts only: the libvirt lab (deploy/lab/libvirt_lab.py; brought up and
down here unless it already runs), the private broker (deploy/rabbitmq/broker.py;
started if needed, honours ENERSIS_BROKER_DIR / ENERSIS_AMQP_PORT / …), a busy
64 MiB guest, and two executors (node-a, node-b) in this process.  Bare and
bus migrations alternate A→B, B→A in the same rounds so both see the same
machine load; the figure is the ratio of medians (target ≤ 1.2).  Runs in a
throwaway vhost, deleted at the end.  Needs root (the lab).
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
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

import libvirt
import pika

from enersis.agent.executor import ExecutorConfig, ExecutorService
from enersis.agent.hypervisor import MigrationTarget
from enersis.agent.libvirt_migrator import LibvirtMigrator
from enersis.common import topology
from enersis.common.bus import Publisher
from enersis.common.codec import decode
from enersis.common.config import BrokerSettings
from enersis.common.messages import MigrateVm

REPO = Path(__file__).resolve().parents[1]
FLAGS = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE


def load_lab():
    spec = importlib.util.spec_from_file_location("libvirt_lab", REPO / "deploy" / "lab" / "libvirt_lab.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def broker_info() -> dict:
    script = REPO / "deploy" / "rabbitmq" / "broker.py"
    if subprocess.run([sys.executable, str(script), "status"], capture_output=True).returncode != 0:
        subprocess.run([sys.executable, str(script), "start"], check=True)
    d = Path(os.environ.get("ENERSIS_BROKER_DIR", REPO / ".broker"))
    return json.loads((d / "broker.json").read_text())


class Api:
    def __init__(self, info: dict):
        self.base = f"http://127.0.0.1:{info['mgmt_port']}/api/"
        self.auth = base64.b64encode(f"admin:{info['passwords']['admin']}".encode()).decode()

    def __call__(self, method: str, path: str, body=None):
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode() if body is not None else None,
                                     method=method)
        req.add_header("Authorization", f"Basic {self.auth}")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()


class Waiter:
    """Consumes result.MigrateVm.# on a private queue; records when each command's final result arrives."""

    def __init__(self, settings: BrokerSettings):
        self.conn = pika.BlockingConnection(settings.pika_parameters())
        ch = self.conn.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(q, topology.EX_RESULTS, routing_key="result.MigrateVm.#")
        ch.basic_consume(q, self._on, auto_ack=True)
        self.finals: dict[str, tuple[float, str, str]] = {}

    def _on(self, _ch, _m, props, body):
        res = decode(body, props.content_type).message
        if res.final:
            self.finals[res.command_id] = (time.perf_counter(), res.status, res.reason)

    def wait(self, command_id: str, timeout: float = 120) -> tuple[float, str, str]:
        deadline = time.monotonic() + timeout
        while command_id not in self.finals:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no final result for {command_id}")
            self.conn.process_data_events(time_limit=0.005)
        return self.finals[command_id]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="each round: bare A→B, B→A, bus A→B, B→A")
    args = parser.parse_args()

    lab_mod = load_lab()
    lab = lab_mod.Lab()
    missing = lab.prerequisites()
    if missing:
        print("cannot run: the lab needs " + "; ".join(missing), file=sys.stderr)
        return 2
    started_lab = not (len(lab.nodes()) >= 2 and all(lab.node_up(n) for n in lab.nodes()[:2]))
    if started_lab:
        lab.up(2)
    info = broker_info()
    api = Api(info)
    vhost = f"bench-{uuid.uuid4().hex[:8]}"
    api("PUT", f"vhosts/{vhost}", {})
    for user, r in topology.ROLES.items():
        api("PUT", f"permissions/{vhost}/{user}", {k: r[k] for k in ("configure", "write", "read")})

    def settings(user: str) -> BrokerSettings:
        return BrokerSettings(host="127.0.0.1", port=info["amqp_port"], vhost=vhost, user=user,
                              password=info["passwords"][user])

    admin = pika.BlockingConnection(settings("admin").pika_parameters())
    topology.declare(admin.channel())
    admin.close()

    name = f"bench-{uuid.uuid4().hex[:6]}"
    nodes = lab.info()["nodes"]
    tg = {n: MigrationTarget(n, r["uri"], r["migration_uri"], r["listen_address"]) for n, r in nodes.items()}
    A, B = "node-a", "node-b"
    services, publishers = [], []
    tmp = tempfile.TemporaryDirectory(prefix="enersis-bench-")
    try:
        lab.guest(A, name, "busy")
        for node, peer in ((A, B), (B, A)):
            pub = Publisher(settings("agent"), sender=f"agent.{node}")
            cfg = ExecutorConfig(state_dir=f"{tmp.name}/{node}", peers={peer: tg[peer]})
            svc = ExecutorService.build(node, settings("agent"), pub, LibvirtMigrator(nodes[node]["uri"]), cfg).start()
            services.append(svc)
            publishers.append(pub)
        for svc in services:
            if not svc.consumer.ready.wait(30):
                raise RuntimeError("executor did not start consuming")
        operator = Publisher(settings("operator"), sender="bench")
        publishers.append(operator)
        waiter = Waiter(settings("operator"))
        conns = {n: libvirt.open(r["uri"]) for n, r in nodes.items() if n in (A, B)}

        def bare(src: str, dst: str) -> float:
            dom = conns[src].lookupByName(name)
            params = {libvirt.VIR_MIGRATE_PARAM_URI: tg[dst].migration_uri,
                      libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: tg[dst].listen_address}
            t0 = time.perf_counter()
            dom.migrateToURI3(tg[dst].uri, params, FLAGS | libvirt.VIR_MIGRATE_PEER2PEER)
            return time.perf_counter() - t0

        def bus(src: str, dst: str) -> float:
            cmd = MigrateVm(command_id=f"bench-{uuid.uuid4().hex}", vm=name, source=src, target=dst)
            t0 = time.perf_counter()
            operator.publish(cmd, mandatory=True)
            t1, status, reason = waiter.wait(cmd.command_id)
            if status != "succeeded":
                raise RuntimeError(f"bus migration {src}->{dst}: {status}: {reason}")
            return t1 - t0

        bare_s, bus_s = [], []
        for i in range(args.rounds):
            bare_s += [bare(A, B), bare(B, A)]
            bus_s += [bus(A, B), bus(B, A)]
            print(f"round {i + 1}: bare {bare_s[-2]:.3f} {bare_s[-1]:.3f} s   bus {bus_s[-2]:.3f} {bus_s[-1]:.3f} s",
                  flush=True)
        mb, mu = statistics.median(bare_s), statistics.median(bus_s)
        print(f"bare libvirt migrate (peer-to-peer, live, 64 MiB busy guest): median {mb:.3f} s "
              f"(min {min(bare_s):.3f}, max {max(bare_s):.3f}, n={len(bare_s)})")
        print(f"bus (published -> succeeded received):                      median {mu:.3f} s "
              f"(min {min(bus_s):.3f}, max {max(bus_s):.3f}, n={len(bus_s)})")
        print(f"ratio bus/bare (medians): {mu / mb:.3f}   target <= 1.2: {'met' if mu / mb <= 1.2 else 'NOT met'}")
        print(f"overhead per migration: {1000 * (mu - mb):.0f} ms")
        for c in conns.values():
            c.close()
        waiter.conn.close()
    finally:
        for svc in services:
            svc.stop()
        for pub in publishers:
            pub.close()
        for node in (A, B):
            if lab.node_up(node):
                lab.virsh(node, "destroy", name, check=False)
                lab.virsh(node, "undefine", name, check=False)
        api("DELETE", f"vhosts/{vhost}")
        if started_lab:
            lab.down()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
