"""Arbiter benchmarks: decide() at scale, and reaction latency on the real broker.

    .venv/bin/python benchmarks/arbiter_bench.py [--skip-broker] [--trials 100]

1. decide() at 10,000 nodes / 100,000 VMs, both policies (target <= 1 s).
   Also the arbiter's own snapshot build from folded telemetry at that size.
2. Reaction latency at 1,000 nodes / 10,000 VMs (target p99 <= 50 ms): the
   time from publishing the NodeTelemetry that completes an overload to the
   MigrateVm for that node arriving from the broker.  The arbiter runs
   as its own process (`enersis arbiter --config`, user `arbiter`) on the
   private broker (started if needed, with the ENERSIS_BROKER_* environment as
   in tests/conftest.py), with its state file on disk (write-ahead, fsync) as
   deployed, while the other nodes keep publishing telemetry from another
   process (1,000 nodes every 5 s = 200 msg/s).
   The cycle is set to an hour so only the reaction path can produce the
   command.  Prints figures; not a test (timings depend on the machine's load).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import base64
from pathlib import Path

from enersis.arbiter.config import ArbiterConfig, CommandSettings, NodeConfig
from enersis.arbiter.policy import POLICIES, NodeView, Params, Snapshot, VmView, decide
from enersis.arbiter.state import ClusterState
from enersis.common.messages import DomainSample, NodeTelemetry

REPO = Path(__file__).resolve().parent.parent
BROKER_SCRIPT = REPO / "deploy" / "rabbitmq" / "broker.py"


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))]


# ---------------------------------------------------------------- 1. decide() at scale


def big_snapshot(n_nodes: int, n_vms: int, seed: int = 7) -> Snapshot:
    """A mixed cluster: most nodes busy-ish, some overloaded, some nearly idle, 20 % off."""
    rng = random.Random(seed)
    online = int(n_nodes * 0.8)
    caps = [rng.choice([32_000.0, 64_000.0]) for _ in range(n_nodes)]
    used = [0.0] * n_nodes
    vms = []
    for j in range(n_vms):
        i = rng.randrange(online)
        # Skewed demand: a few nodes end up over 80 %, a few under 10 %.
        cpu = rng.expovariate(1 / (caps[i] * 0.045)) if i % 17 else rng.uniform(0, caps[i] * 0.004)
        used[i] += cpu
        vms.append(VmView(f"vm{j:06d}", f"n{i:05d}", cpu, rng.choice([1024, 2048, 4096])))
    nodes = tuple(
        NodeView(f"n{i:05d}", "online" if i < online else "off", caps[i], min(used[i], caps[i]), 262_144,
                 history=(min(100.0, used[i] * 100 / caps[i]),) * 3)
        for i in range(n_nodes))
    return Snapshot(nodes, tuple(vms))


def bench_decide(n_nodes: int, n_vms: int, runs: int) -> None:
    snap = big_snapshot(n_nodes, n_vms)
    over = sum(1 for n in snap.nodes if n.state == "online" and n.load_pct > 80)
    under = sum(1 for n in snap.nodes if n.state == "online" and n.load_pct < 10)
    print(f"decide() at {n_nodes:,} nodes / {n_vms:,} VMs ({over} overloaded, {under} underloaded, "
          f"{n_nodes - sum(1 for n in snap.nodes if n.state == 'online')} off); target <= 1 s")
    variants = [(p, Params(policy=p)) for p in sorted(POLICIES)]
    # Worst case for the hysteresis policy: no migration budget, so every candidate is planned.
    variants.append(("enersis-hysteresis, no migration limits",
                     Params(policy="enersis-hysteresis", max_concurrent_migrations=10**6, max_migrations_per_node=100)))
    for policy, params in variants:
        times = []
        out = []
        for _ in range(runs):
            t = time.perf_counter()
            out = decide(snap, params, 0.0)
            times.append(time.perf_counter() - t)
        kinds = {k: sum(1 for i in out if type(i).__name__ == k) for k in ("Migrate", "Wake", "Shutdown")}
        print(f"  {policy:<20} median {statistics.median(times):.3f} s, max {max(times):.3f} s over {runs} runs; "
              f"intents: {kinds}")


def bench_snapshot(n_nodes: int, n_vms: int) -> None:
    """The arbiter's side: fold one report per node, then build the policy's snapshot."""
    per = n_vms // n_nodes
    state = ClusterState()
    msgs = []
    for i in range(n_nodes):
        doms = [DomainSample(f"vm{i:05d}-{k}", "u", 1, 2, 2 << 20, 2 << 20, 4.0, 50.0) for k in range(per)]
        msgs.append(NodeTelemetry(f"n{i:05d}", 1, "b", True, "QEMU", 16, 2000, 64 << 20, 32 << 20, 40.0, 40.0,
                                  10.0, 1.0, 5.0, doms))
    t = time.perf_counter()
    for k, m in enumerate(msgs):
        state.fold_telemetry(m, 1_000 + k, 100.0)
    fold = time.perf_counter() - t
    t = time.perf_counter()
    snap = state.snapshot(100.0)
    build = time.perf_counter() - t
    print(f"  arbiter state at that size: fold {fold / n_nodes * 1e6:.0f} us per report, "
          f"snapshot of {len(snap.nodes):,} nodes / {len(snap.vms):,} VMs in {build:.3f} s")


# ---------------------------------------------------------------- 2. reaction latency on the broker


def broker_info() -> dict:
    env = dict(os.environ)
    d = Path(env.get("ENERSIS_BROKER_DIR", REPO / ".broker")).resolve()
    env["ENERSIS_BROKER_DIR"] = str(d)
    st = subprocess.run([sys.executable, str(BROKER_SCRIPT), "status"], env=env, capture_output=True, text=True)
    if st.returncode != 0:
        print("  starting the private broker ...", flush=True)
        r = subprocess.run([sys.executable, str(BROKER_SCRIPT), "start"], env=env, capture_output=True, text=True,
                           timeout=180)
        if r.returncode != 0:
            raise SystemExit(f"could not start the broker: {r.stdout}{r.stderr}")
    return json.loads((d / "broker.json").read_text())


def api(info: dict, method: str, path: str, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{info['mgmt_port']}/api/{path}",
                                 data=json.dumps(body).encode() if body is not None else None, method=method)
    token = base64.b64encode(f"admin:{info['passwords']['admin']}".encode()).decode()
    req.add_header("Authorization", f"Basic {token}")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def _report(node: str, seq: int, loads: list[float], interval: float, scale: float = 1.0) -> NodeTelemetry:
    doms = [DomainSample(f"{node}-vm{k}", "u", 1, 2, 2 << 20, 2 << 20, round(p * scale, 2), 50.0)
            for k, p in enumerate(loads)]
    total = min(100.0, sum(d.cpu_node_pct for d in doms))
    return NodeTelemetry(node, seq, "boot", True, "QEMU", 16, 2000, 64 << 20, 32 << 20, total, total,
                         10.0, 1.0, interval, doms)


def _background(settings, names: list[str], base: dict, interval: float, stop) -> None:
    """Its own process (no GIL shared with the measurement): every node reports every `interval`."""
    from enersis.common.bus import Publisher

    pub = Publisher(settings, "bench-background")
    gap = interval / max(1, len(names))
    nxt = time.perf_counter()
    seq = 2
    try:
        while not stop.is_set():
            for n in names:
                if stop.is_set():
                    return
                pub.publish(_report(n, seq, base[n], interval))
                nxt += gap
                delay = nxt - time.perf_counter()
                if delay > 0:
                    stop.wait(delay)
            seq += 1
    finally:
        pub.close()


def bench_reaction(n_nodes: int, vms_per_node: int, trials: int, fsync: bool = True) -> None:
    import multiprocessing
    import signal

    import pika

    from enersis.common import topology
    from enersis.common.bus import Publisher
    from enersis.common.codec import decode
    from enersis.common.config import BrokerSettings

    info = broker_info()
    vhost = f"bench-arbiter-{os.getpid()}"
    api(info, "PUT", f"vhosts/{vhost}", {})
    for user, r in topology.ROLES.items():
        api(info, "PUT", f"permissions/{vhost}/{user}", {"configure": r["configure"], "write": r["write"], "read": r["read"]})

    def settings(user: str) -> BrokerSettings:
        return BrokerSettings(host="127.0.0.1", port=info["amqp_port"], vhost=vhost, user=user,
                              password=info["passwords"][user], heartbeat_s=30)

    conn = pika.BlockingConnection(settings("admin").pika_parameters())
    ch = conn.channel()
    topology.declare(ch)
    # The observer stands where the executors' queues would be: every migrate.<node> key lands here.
    observer_q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(observer_q, topology.EX_COMMANDS, routing_key="migrate.#")
    arrivals: dict[str, float] = {}
    arrived = threading.Condition()

    def on_migrate(channel, method, props, body):
        t = time.perf_counter()
        m = decode(body, props.content_type).message
        with arrived:
            arrivals.setdefault(m.source, t)
            arrived.notify_all()
        channel.basic_ack(method.delivery_tag)

    ch.basic_consume(observer_q, on_migrate)
    stop = threading.Event()

    def observe():
        while not stop.is_set():
            conn.process_data_events(time_limit=0.05)

    names = [f"n{i:04d}" for i in range(n_nodes)]
    interval = 5.0
    rng = random.Random(3)
    base = {n: [rng.uniform(3.0, 6.0) for _ in range(vms_per_node)] for n in names}  # ~45 % per node

    # The arbiter as deployed: its own process, `enersis arbiter --config`, state file on disk.
    tmp = Path(tempfile.mkdtemp(prefix="arbiter-bench-"))
    (tmp / "arbiter.password").write_text(info["passwords"]["arbiter"] + "\n")
    toml = [
        "[broker]",
        f'url = "amqp://127.0.0.1:{info["amqp_port"]}/{vhost}"',
        'user = "arbiter"',
        f'password_file = "{tmp / "arbiter.password"}"',
        "[arbiter]",
        "cycle_s = 3600", "warmup_s = 0", "stale_after_intervals = 1000",
        f'state_file = "{tmp / "state.json"}"', f"state_fsync = {'true' if fsync else 'false'}",
        "[commands]", "max_in_flight_migrations = 10000",
    ] + [f'[nodes."{n}"]' for n in names]
    (tmp / "arbiter.toml").write_text("\n".join(toml) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "ENERSIS_AMQP_URL"}
    proc = subprocess.Popen([sys.executable, "-m", "enersis.cli", "--log-level", os.environ.get("BENCH_ARBITER_LOG", "WARNING"), "arbiter", "--config",
                             str(tmp / "arbiter.toml")], env=env, stderr=open(tmp / "arbiter.log", "w"))
    agent = Publisher(settings("agent"), "bench-agent")
    mp = multiprocessing.get_context("spawn")
    bg_stop = mp.Event()
    bg = None
    obs = threading.Thread(target=observe, daemon=True)
    try:
        q = urllib.parse.quote(vhost, safe="")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            qi = api(info, "GET", f"queues/{q}/{topology.Q_ARBITER_TELEMETRY}")
            if qi.get("consumers", 0) >= 1:
                break
            if proc.poll() is not None:
                raise SystemExit(f"the arbiter exited: {(tmp / 'arbiter.log').read_text()[-2000:]}")
            time.sleep(0.2)
        obs.start()
        t = time.perf_counter()
        for n in names:
            agent.publish(_report(n, 1, base[n], interval))
        # A probe overload behind them: its command means every earlier report was folded.
        probe = names[0]
        agent.publish(_report(probe, 2, base[probe], interval, scale=2.1))
        with arrived:
            if not arrived.wait_for(lambda: probe in arrivals, timeout=60):
                raise SystemExit("the arbiter did not react to the probe")
        print(f"  {n_nodes:,} nodes / {n_nodes * vms_per_node:,} VMs folded by the arbiter process in "
              f"{time.perf_counter() - t:.1f} s")
        victims = rng.sample(names[1:], trials)
        quiet = [n for n in names if n not in set(victims) and n != probe]
        bg = mp.Process(target=_background, args=(settings("agent"), quiet, base, interval, bg_stop), daemon=True)
        bg.start()
        time.sleep(2.0)
        latencies = []
        missed = 0
        for k, node in enumerate(victims):
            msg = _report(node, 10_000 + k, base[node], interval, scale=2.1)  # ~95 %: completes the overload
            t0 = time.perf_counter()
            agent.publish(msg)
            with arrived:
                ok = arrived.wait_for(lambda: node in arrivals, timeout=5.0)
            if ok:
                latencies.append((arrivals[node] - t0) * 1000)
            else:
                missed += 1
            time.sleep(0.05)  # background reports in between trials
        qi = api(info, "GET", f"queues/{q}/{topology.Q_ARBITER_TELEMETRY}")
        rate = (qi.get("message_stats", {}).get("publish_details", {}) or {}).get("rate", 0.0)
        print(f"reaction latency at {n_nodes:,} nodes / {n_nodes * vms_per_node:,} VMs "
              f"(telemetry completing an overload -> MigrateVm on the broker), state file "
              f"{'with' if fsync else 'without'} fsync, target p99 <= 50 ms:")
        if latencies:
            print(f"  p50 {statistics.median(latencies):.1f} ms, p90 {pct(latencies, 90):.1f} ms, "
                  f"p99 {pct(latencies, 99):.1f} ms, max {max(latencies):.1f} ms over {len(latencies)} trials "
                  f"({missed} without a command within 5 s); background telemetry ~{rate:.0f} reports/s; "
                  f"machine load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    finally:
        stop.set()
        bg_stop.set()
        if bg is not None:
            bg.join(10)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        agent.close()
        try:
            obs.join(2)
            conn.close()
        except Exception:
            pass
        api(info, "DELETE", f"vhosts/{urllib.parse.quote(vhost, safe='')}")
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-broker", action="store_true", help="only the pure decide() figures")
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    bench_decide(10_000, 100_000, args.runs)
    bench_snapshot(10_000, 100_000)
    bench_decide(1_000, 10_000, args.runs)
    if not args.skip_broker:
        bench_reaction(1_000, 10, args.trials, fsync=True)
        bench_reaction(1_000, 10, args.trials, fsync=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
