"""The agent against a real RabbitMQ broker, with the simulated hypervisor behind it.

Users are the real roles: the agent publishes as `agent`, the test reads the
arbiter's telemetry queue as `arbiter`, so permissions are exercised.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from enersis.agent.hypervisor import MigrationTarget
from enersis.agent.sampler import Sampler
from enersis.agent.simulated import SimulatedCluster
from enersis.agent.telemetry import Agent, Identity
from enersis.common import topology
from enersis.common.bus import Consumer, Publisher
from enersis.common.messages import NodeOffline, NodeOnline, NodeTelemetry
from tests.conftest import BROKER_SCRIPT, Broker, wait_for

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces" / "planetlab"  # ../shared next to the repo


class Inbox:
    """Everything that arrives on the arbiter's telemetry queue, with arrival times."""

    def __init__(self, settings, name: str = "inbox"):
        self.items: list[tuple[float, object]] = []
        self.lock = threading.Lock()
        self.publisher = Publisher(settings, "test-arbiter")
        self.consumer = Consumer(settings, self.publisher, name=name, workers=1)
        self.consumer.subscribe(topology.Q_ARBITER_TELEMETRY, self._on, inline=True)

    def _on(self, delivery) -> None:
        with self.lock:
            self.items.append((time.monotonic(), delivery.message))

    def start(self) -> "Inbox":
        self.consumer.start()
        wait_for(self.consumer.ready.is_set, 30, what="telemetry consumer ready")
        return self

    def messages(self, kind: type, node: str | None = None) -> list:
        with self.lock:
            return [m for _, m in self.items if isinstance(m, kind) and (node is None or m.node == node)]

    def stop(self) -> None:
        self.consumer.stop()
        self.publisher.close()


@pytest.fixture
def cluster(tmp_path: Path) -> SimulatedCluster:
    day = TRACES / "20110303"
    if not day.is_dir():  # no PlanetLab files here: flat synthetic traces exercise the same path
        day = tmp_path / "traces"
        day.mkdir()
        for i, pct in enumerate((15, 35, 55, 75, 95)):
            (day / f"t{i}").write_text(f"{pct}\n" * 288)
    return SimulatedCluster.create(tmp_path / "cluster", nodes=2, vms=5, trace_dir=day,
                                   speedup=60, seed=3, cpus=2, vm_mem_mib=512, migration_mib_s=2048)


def run_agent(cluster: SimulatedCluster, node: str, settings, *, sample=0.1, publish=0.3, window=0.5):
    hv = cluster.hypervisor(node)
    ident = Identity(node, hv.boot_id(), "test", sample, publish, window)
    pub = Publisher(settings, f"agent.{node}")
    agent = Agent(ident, Sampler(hv, sample_interval_s=sample, window_s=window, facts_interval_s=publish), pub)
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()

    def halt() -> None:
        stop.set()
        thread.join(10)
        pub.close()

    return agent, halt


def test_telemetry_arrives_decoded_with_the_inventory(broker: Broker, vhost: str, cluster: SimulatedCluster) -> None:
    inbox = Inbox(broker.settings("arbiter", vhost)).start()
    a1, halt1 = run_agent(cluster, "node-1", broker.settings("agent", vhost))
    a2, halt2 = run_agent(cluster, "node-2", broker.settings("agent", vhost))
    try:
        wait_for(lambda: len(inbox.messages(NodeTelemetry, "node-1")) >= 4, 20, what="node-1 telemetry")
        on = inbox.messages(NodeOnline, "node-1")[0]
        assert on.hypervisor_ok and on.hypervisor_type == "Simulated" and on.domain_count == 3
        assert on.boot_id == cluster.hypervisor("node-1").boot_id()
        tel = inbox.messages(NodeTelemetry, "node-1")
        seqs = [t.seq for t in tel]
        assert seqs == sorted(seqs) and seqs[0] >= 1
        last = tel[-1]
        placement = cluster.placement()
        assert sorted(d.name for d in last.domains) == sorted(v for v, n in placement.items() if n == "node-1")
        assert last.hypervisor_ok and last.cpus == 2 and last.mem_total_kib == 8192 * 1024
        assert (last.sample_interval_s, last.publish_interval_s, last.window_s) == (0.1, 0.3, 0.5)
        # The measured load follows the traces (60x speed-up: they move slowly over 0.1 s).
        for d in last.domains:
            assert d.cpu_vcpu_pct == pytest.approx(cluster.vm_cpu_pct(d.name), abs=3), d.name
        assert last.cpu_pct == pytest.approx(sum(d.cpu_node_pct for d in last.domains), abs=0.1)

        # Inventory is republished every period: a migration shows up on both sides.
        n1 = cluster.hypervisor("node-1")
        vm = sorted(d.name for d in last.domains)[0]
        assert n1.migrate(vm, MigrationTarget("node-2", f"sim://{cluster.path}"), timeout_s=30).ok

        def moved() -> bool:
            t1, t2 = inbox.messages(NodeTelemetry, "node-1")[-1], inbox.messages(NodeTelemetry, "node-2")[-1]
            return vm not in {d.name for d in t1.domains} and vm in {d.name for d in t2.domains}

        wait_for(moved, 10, what="the migrated VM in both nodes' telemetry")
    finally:
        halt1()
        halt2()
    wait_for(lambda: inbox.messages(NodeOffline, "node-2"), 10, what="NodeOffline")
    inbox.stop()


def test_enersis_agent_command_runs_and_stops_cleanly_on_sigterm(broker: Broker, vhost: str,
                                                                 cluster: SimulatedCluster, tmp_path: Path) -> None:
    pw = tmp_path / "agent.password"
    pw.write_text(broker.passwords["agent"] + "\n")
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'''node = "node-2"
[broker]
url = "amqp://127.0.0.1:{broker.amqp_port}/{vhost}"
user = "agent"
password_file = "{pw}"
[hypervisor]
uri = "sim://{cluster.path}"
[telemetry]
sample_interval_s = 0.1
publish_interval_s = 0.3
window_s = 1.0
''')
    inbox = Inbox(broker.settings("arbiter", vhost)).start()
    env = {k: v for k, v in os.environ.items() if k != "ENERSIS_AMQP_URL"}
    proc = subprocess.Popen([sys.executable, "-m", "enersis.cli", "agent", "--config", str(cfg)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: len(inbox.messages(NodeTelemetry, "node-2")) >= 2, 30, what="telemetry from `enersis agent`")
        assert inbox.messages(NodeOnline, "node-2")[0].hypervisor_ok
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    off = wait_for(lambda: inbox.messages(NodeOffline, "node-2"), 10, what="NodeOffline")
    assert off[0].reason == "received SIGTERM"
    assert "node-2 online" in out and "node-2 offline" in out
    inbox.stop()


def test_enersis_agent_reports_config_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('node = "node-1"\n[hypervisor]\nuri = "sim:///nonexistent/cluster"\n')
    r = subprocess.run([sys.executable, "-m", "enersis.cli", "agent", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "is not a simulated cluster" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "enersis.cli", "agent", "--config", str(tmp_path / "none.toml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "does not exist" in r.stderr


# ---------------------------------------------------------------- broker outage (a broker of its own)


@pytest.fixture
def outage_broker(broker: Broker, tmp_path_factory: pytest.TempPathFactory):
    """A second private broker this test may kill and restart without disturbing the session's."""
    env = dict(os.environ,
               ENERSIS_BROKER_DIR=str(tmp_path_factory.mktemp("outage-broker")),
               ENERSIS_AMQP_PORT=str(broker.amqp_port + 1000),
               ENERSIS_MGMT_PORT=str(broker.mgmt_port + 1000),
               ENERSIS_BROKER_NAME=os.environ.get("ENERSIS_BROKER_NAME", "enersis") + "-outage")

    def ctl(cmd: str) -> None:
        r = subprocess.run([sys.executable, str(BROKER_SCRIPT), cmd], env=env, capture_output=True, text=True,
                           timeout=180)
        assert r.returncode == 0, f"broker {cmd}: {r.stdout}{r.stderr}"

    ctl("start")
    info = __import__("json").loads((Path(env["ENERSIS_BROKER_DIR"]) / "broker.json").read_text())
    b = Broker(info)
    b.ctl = ctl  # type: ignore[attr-defined]
    yield b
    subprocess.run([sys.executable, str(BROKER_SCRIPT), "kill9"], env=env, capture_output=True, timeout=60)
    subprocess.run([sys.executable, str(BROKER_SCRIPT), "stop"], env=env, capture_output=True, timeout=180)


def test_broker_down_keeps_sampling_and_sends_the_latest_state_when_back(outage_broker: Broker,
                                                                         cluster: SimulatedCluster) -> None:
    b = outage_broker
    inbox = Inbox(b.settings("arbiter"), name="outage-inbox").start()
    agent, halt = run_agent(cluster, "node-1", b.settings("agent"), sample=0.1, publish=0.3)
    try:
        wait_for(lambda: len(inbox.messages(NodeTelemetry)) >= 2, 20, what="telemetry before the outage")
        b.ctl("kill9")  # type: ignore[attr-defined]
        down_at = time.monotonic()
        seq_before = inbox.messages(NodeTelemetry)[-1].seq
        samples_at_kill = agent.sampler.latest().samples
        # While it is down the node changes: a VM stops.
        gone = sorted(v for v, n in cluster.placement().items() if n == "node-1")[0]
        cluster.stop_vm(gone)
        wait_for(lambda: agent.dropped >= 2, 30, what="telemetry dropped while the broker is down")
        # Sampling never stops while the broker is down.
        wait_for(lambda: agent.sampler.latest().samples > samples_at_kill + 10, 10, what="sampling during the outage")
        before = len(inbox.items)
        b.ctl("start")  # type: ignore[attr-defined]
        wait_for(lambda: len(inbox.items) > before and inbox.messages(NodeTelemetry)[-1].seq > 0, 60,
                 what="telemetry after the broker came back")
        with inbox.lock:
            after = [(t, m) for t, m in inbox.items[before:] if isinstance(m, NodeTelemetry)]
        first = after[0][1]
        # The first message after the outage is the current state, not a backlog.
        assert gone not in {d.name for d in first.domains}
        assert first.seq > seq_before + 1  # the gap shows what was dropped
        wait_for(lambda: len(inbox.messages(NodeTelemetry)) >= before + 4, 20, what="steady telemetry again")
        with inbox.lock:
            seqs = [m.seq for t, m in inbox.items[before:] if isinstance(m, NodeTelemetry)]
        # Nothing dropped during the outage is sent late: after it, sequence numbers only go up
        # from the first (current) one, and the dropped ones never appear.
        assert seqs == sorted(set(seqs)) and seqs[0] == first.seq
        assert agent.dropped >= first.seq - seq_before - 1 >= 1
        assert time.monotonic() - down_at > 1
    finally:
        halt()
        inbox.stop()


def test_wrong_credentials_are_reported_not_crashed(broker: Broker, vhost: str, cluster: SimulatedCluster,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    hv = cluster.hypervisor("node-1")
    sampler = Sampler(hv, sample_interval_s=0.1, window_s=0.5)
    sampler.sample_once()
    pub = Publisher(broker.settings("agent", vhost).with_(password="not-the-password"), "agent.node-1")
    agent = Agent(Identity("node-1", "b", "test", 0.1, 0.3, 0.5), sampler, pub)
    try:
        assert agent.publish_once(sampler.sample_once(), budget_s=2) is False
        assert agent.publish_once(sampler.sample_once(), budget_s=2) is False
    finally:
        pub.close()
    errors = [r for r in caplog.records if r.name == "enersis.agent.telemetry" and r.levelname == "ERROR"]
    assert len(errors) == 1 and "check [broker] user, password and permissions" in errors[0].getMessage()


def test_enersis_agent_check_prints_one_measurement(cluster: SimulatedCluster, tmp_path: Path) -> None:
    import json

    cfg = tmp_path / "node.toml"
    cfg.write_text(f'node = "node-1"\n[hypervisor]\nuri = "sim://{cluster.path}"\n[telemetry]\nsample_interval_s = 0.2\n')
    cmd = [sys.executable, "-m", "enersis.cli", "agent", "--config", str(cfg), "--check"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["hypervisor_ok"] and body["hypervisor_type"] == "Simulated"
    on_node = sorted(v for v, n in cluster.placement().items() if n == "node-1")
    assert sorted(d["name"] for d in body["domains"]) == on_node
    assert any(d["cpu_vcpu_pct"] > 0 for d in body["domains"])  # measured, not a first-reading 0
    cluster.set_reachable("node-1", False)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "hypervisor unreachable" in r.stderr and "does not answer" in r.stderr
