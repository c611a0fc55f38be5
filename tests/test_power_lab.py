"""The power service against the network-namespace lab and a real broker.

Real magic packets cross a bridge into node namespaces; real sshds with
forced-command keys stand in for `shutdown -h now`; real `enersis agent`
processes (simulated hypervisor) are what a wake boots and a shutdown stops.
The lab is built and removed by the module fixture (deploy/lab/netns_lab.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from enersis.agent.simulated import SimulatedCluster
from enersis.common.bus import Publisher
from enersis.common.messages import ShutdownNode, WakeNode
from enersis.power.inventory import load_config, parse_config
from enersis.power.main import PowerApp
from enersis.power.switch import WolSshSwitch
from tests.conftest import REPO, Broker, wait_for
from tests.test_power_service import ResultWatcher

pytestmark = [pytest.mark.netns, pytest.mark.broker]

LAB = REPO / "deploy" / "lab" / "netns_lab.py"
NIC = REPO / "deploy" / "lab" / "standin_nic.py"
LAB_NAME = "pwtest"
SUBNET = "10.213.77.0/24"
VENV_BIN = Path(sys.executable).parent


def _missing_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return "needs root to build network namespaces (CI runs as root)"
    for tool in ("ip", "/usr/sbin/sshd", "ssh-keygen"):
        if not shutil.which(tool):
            return f"{tool} is not installed (deploy/scripts/install-deps.sh installs it)"
    if not (VENV_BIN / "enersis").exists():
        return f"no enersis console script next to {sys.executable}"
    return None


if _missing_prerequisite():
    pytestmark.append(pytest.mark.skip(reason=_missing_prerequisite()))


class CountingSwitch:
    """The real switch, with a tally of what it was asked (so 'work done once' is counted)."""

    def __init__(self, inner: WolSshSwitch):
        self.inner = inner
        self.wakes: list[str] = []
        self.shutdowns: list[str] = []

    def wake(self, node):
        self.wakes.append(node.name)
        return self.inner.wake(node)

    def shutdown(self, node):
        self.shutdowns.append(node.name)
        return self.inner.shutdown(node)

    def ssh_port_open(self, node, timeout: float = 2.0) -> bool:
        return self.inner.ssh_port_open(node, timeout)


def lab_cmd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ENERSIS_AMQP_URL"}
    r = subprocess.run([sys.executable, str(LAB), *args], capture_output=True, text=True, env=env, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"netns_lab.py {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def lab(broker: Broker, tmp_path_factory):
    import pika

    from enersis.common import topology

    vhost = broker.new_vhost()
    conn = pika.BlockingConnection(broker.settings("admin", vhost).pika_parameters())
    topology.declare(conn.channel())
    conn.close()
    tmp = tmp_path_factory.mktemp("powerlab")
    trace = tmp / "trace-30"
    trace.write_text("30\n" * 288)
    cluster = tmp / "cluster"
    # vm-1 runs on node-1; node-2 and node-3 start powered off and empty; node-4 is on and empty.
    SimulatedCluster.create(cluster, nodes=["node-1", "node-2", "node-3", "node-4"], vms=1, traces=[str(trace)],
                            powered_off=["node-2", "node-3"], speedup=1.0)
    for user in ("agent", "power"):
        (tmp / f"{user}.password").write_text(broker.passwords[user] + "\n")
    url = f"amqp://127.0.0.1:{broker.amqp_port}/{vhost}"
    for node in ("node-1", "node-2", "node-3", "node-4"):
        (tmp / f"{node}.toml").write_text(
            f'node = "{node}"\n[broker]\nurl = "{url}"\nuser = "agent"\npassword_file = "{tmp / "agent.password"}"\n'
            f'[hypervisor]\nuri = "sim://{cluster}"\n'
            "[telemetry]\nsample_interval_s = 0.2\npublish_interval_s = 1.0\nwindow_s = 1.0\n"
            "[executor]\nenabled = false\n")
    r = lab_cmd("up", "--name", LAB_NAME, "--nodes", "node-1,node-2,node-3,node-4", "--subnet", SUBNET,
                "--boot", f"{VENV_BIN / 'enersis'} agent --config {tmp}/{{node}}.toml",
                "--on", "node-1,node-4", "--ignore-packets", "node-3", "--hard-poweroff", "node-4",
                "--sim-cluster", str(cluster), "--sim-python", sys.executable,
                "--broker-url", url, "--broker-user", "power", "--broker-password-file", str(tmp / "power.password"))
    info = json.loads(r.stdout)
    info.update(vhost=vhost, tmp=tmp, cluster=cluster)
    info["by_node"] = {n["node"]: n for n in info["nodes"]}
    try:
        yield info
    finally:
        lab_cmd("down", "--name", LAB_NAME)
        broker.delete_vhost(vhost)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert LAB_NAME not in left, f"namespaces left behind: {left}"
        assert subprocess.run(["ip", "link", "show", f"{LAB_NAME}-h"], capture_output=True).returncode != 0
        assert not Path(info["state"]).exists()
        for n in info["nodes"]:
            assert not running(n["nic_pid"]) and not running(n["sshd_pid"]), f"{n['node']}: a process survived"


def running(pid: int) -> bool:
    """Alive and not a zombie waiting for init to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def agent_pid(lab, node: str) -> int | None:
    try:
        pid = int(Path(lab["by_node"][node]["agent_pid_file"]).read_text())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def poweroffs(lab, node: str) -> list[str]:
    p = Path(lab["by_node"][node]["poweroff_log"])
    return p.read_text().splitlines() if p.exists() else []


def nic_log(lab, node: str) -> str:
    return Path(lab["by_node"][node]["nic_log"]).read_text()


class Service:
    """An in-process power service on the lab's inventory, with its own result watcher."""

    def __init__(self, broker: Broker, lab, **overrides):
        config = load_config(lab["power_toml"])
        wanted = {"wake_timeout_s": 30, "shutdown_timeout_s": 20, "stale_after_s": 5, "wol_gap_s": 0.05,
                  **{k: v for k, v in overrides.items() if k != "nodes"}}
        settings = dataclasses.replace(config.settings, **wanted)
        nodes = dict(config.nodes)
        for name, changes in overrides.get("nodes", {}).items():
            nodes[name] = dataclasses.replace(nodes[name], **changes)
        config = dataclasses.replace(config, settings=settings, nodes=nodes)
        self.switch = CountingSwitch(WolSshSwitch(repeats=settings.wol_repeats, gap_s=settings.wol_gap_s,
                                                  connect_timeout_s=5, command_timeout_s=15))
        self.app = PowerApp(config, broker=broker.settings("power", lab["vhost"]), switch=self.switch).start()
        self.watcher = ResultWatcher(broker, lab["vhost"])
        self.arbiter = Publisher(broker.settings("arbiter", lab["vhost"]), "arbiter")
        wait_for(self.app.ready.is_set, 15, what="power service ready")

    def send(self, message):
        self.arbiter.publish(message)
        return message.command_id

    def close(self):
        self.app.stop()
        self.watcher.close()
        self.arbiter.close()


@pytest.fixture
def service(broker, lab):
    s = Service(broker, lab)
    yield s
    s.close()


def cid() -> str:
    return uuid.uuid4().hex[:12]


def ensure_on(lab, node: str, svc: Service) -> None:
    if agent_pid(lab, node) is None:
        import wakeonlan

        n = lab["by_node"][node]
        wakeonlan.wake(n["mac"], host=lab["broadcast"], port=lab["wol_port"], interface=lab["host_address"])
        wait_for(lambda: agent_pid(lab, node), 15, what=f"{node}'s agent started")
    wait_for(lambda: (a := svc.app.tracker.status(node).telemetry_age_s) is not None and a < 2, 20,
             what=f"telemetry from {node}")


def ensure_off(lab, node: str) -> None:
    pid = agent_pid(lab, node)
    if pid is not None:
        subprocess.run([sys.executable, str(NIC), "--poweroff", lab["by_node"][node]["agent_pid_file"]],
                       check=True, capture_output=True)
        wait_for(lambda: agent_pid(lab, node) is None, 15, what=f"{node}'s agent stopped")


# ---------------------------------------------------------------- wake


def test_wake_boots_the_node_and_reports_its_boot_time(lab, service):
    ensure_off(lab, "node-2")
    c = service.send(WakeNode(command_id=cid(), node="node-2", issued_by="arbiter"))
    r = service.watcher.final(c, timeout=40)
    assert r.status == "succeeded", (r, nic_log(lab, "node-2")[-2000:])
    assert r.details["evidence"] == "NodeOnline" and 0 < r.details["boot_s"] < 30
    print(f"node-2 booted in {r.details['boot_s']:.2f}s")
    assert service.watcher.statuses(c) == ["accepted", "succeeded"]
    assert agent_pid(lab, "node-2") is not None
    assert f"magic packet from {lab['host_address']}" in nic_log(lab, "node-2")
    # The same command again: its result again, no packet.  A new command: the node is already online.
    service.send(WakeNode(command_id=c, node="node-2", issued_by="arbiter"))
    wait_for(lambda: service.watcher.statuses(c).count("succeeded") == 2, 15, what="republished result")
    c2 = service.send(WakeNode(command_id=cid(), node="node-2", issued_by="arbiter"))
    r2 = service.watcher.final(c2)
    assert r2.status == "skipped" and "already online" in r2.reason
    assert service.switch.wakes == ["node-2"]


def test_wake_of_a_node_whose_nic_ignores_packets_fails_after_the_timeout(broker, lab):
    s = Service(broker, lab, wake_timeout_s=3)
    try:
        c = s.send(WakeNode(command_id=cid(), node="node-3", issued_by="arbiter"))
        r = s.watcher.final(c, timeout=20)
        assert r.status == "failed" and "no NodeOnline from node-3 within 3s" in r.reason, r
        assert s.watcher.statuses(c) == ["accepted", "failed"]
        assert "ignored (--ignore-packets)" in nic_log(lab, "node-3")
        assert agent_pid(lab, "node-3") is None
    finally:
        s.close()


# ---------------------------------------------------------------- shutdown


def test_shutdown_of_a_node_with_a_running_domain_is_rejected_and_nothing_runs(lab, service):
    ensure_on(lab, "node-1", service)
    before = poweroffs(lab, "node-1")
    c = service.send(ShutdownNode(command_id=cid(), node="node-1", issued_by="arbiter"))
    r = service.watcher.final(c)
    assert r.status == "rejected" and "vm-1 (running)" in r.reason, r
    assert service.watcher.statuses(c) == ["rejected"]
    assert service.switch.shutdowns == [] and poweroffs(lab, "node-1") == before
    assert agent_pid(lab, "node-1") is not None
    vm = SimulatedCluster(lab["cluster"]).state()["vms"]["vm-1"]
    assert vm["node"] == "node-1" and vm["state"] == 1


def test_shutdown_with_a_wrong_or_unknown_host_key_fails_and_nothing_runs(broker, lab, tmp_path):
    impostor = tmp_path / "impostor"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)], check=True)
    wrong = tmp_path / "known_hosts.wrong"
    addr = lab["by_node"]["node-2"]["address"]
    wrong.write_text(f"{addr} {' '.join(Path(f'{impostor}.pub').read_text().split()[:2])}\n")
    empty = tmp_path / "known_hosts.empty"
    empty.write_text("")
    for known_hosts, words in ((wrong, "does not match"), (empty, "has no entry")):
        s = Service(broker, lab, nodes={"node-2": {"known_hosts": str(known_hosts)}})
        try:
            ensure_on(lab, "node-2", s)
            pid, before = agent_pid(lab, "node-2"), poweroffs(lab, "node-2")
            c = s.send(ShutdownNode(command_id=cid(), node="node-2", issued_by="arbiter"))
            r = s.watcher.final(c)
            assert r.status == "failed" and words in r.reason and "nothing was run" in r.reason, r
            assert not r.retryable
            assert poweroffs(lab, "node-2") == before, "the forced command must not have run"
            assert agent_pid(lab, "node-2") == pid
        finally:
            s.close()


def test_shutdown_powers_the_node_off_confirmed_by_node_offline(lab, service):
    ensure_on(lab, "node-2", service)
    before = len(poweroffs(lab, "node-2"))
    c = service.send(ShutdownNode(command_id=cid(), node="node-2", issued_by="arbiter"))
    r = service.watcher.final(c, timeout=30)
    assert r.status == "succeeded" and r.details["evidence"] == "NodeOffline", (r, nic_log(lab, "node-2")[-2000:])
    assert service.watcher.statuses(c) == ["accepted", "succeeded"]
    lines = poweroffs(lab, "node-2")
    assert len(lines) == before + 1 and "asked='shutdown -h now'" in lines[-1]
    assert agent_pid(lab, "node-2") is None
    assert SimulatedCluster(lab["cluster"]).state()["nodes"]["node-2"]["powered"] is False
    # Replay: the result again, no second SSH session.  A new command: already off.
    service.send(ShutdownNode(command_id=c, node="node-2", issued_by="arbiter"))
    wait_for(lambda: service.watcher.statuses(c).count("succeeded") == 2, 15, what="republished result")
    c2 = service.send(ShutdownNode(command_id=cid(), node="node-2", issued_by="arbiter"))
    assert service.watcher.final(c2).status == "skipped"
    assert len(poweroffs(lab, "node-2")) == before + 1
    assert service.switch.shutdowns == ["node-2"]


def test_a_pulled_plug_is_confirmed_by_silence_and_a_closed_ssh_port(lab, service):
    # node-4's poweroff kills its agent at once (no NodeOffline), then its sshd.
    ensure_on(lab, "node-4", service)
    c = service.send(ShutdownNode(command_id=cid(), node="node-4", issued_by="arbiter"))
    r = service.watcher.final(c, timeout=40)
    assert r.status == "succeeded" and r.details["evidence"] == "silence+ssh-closed", r
    assert "(hard)" in poweroffs(lab, "node-4")[-1]
    assert agent_pid(lab, "node-4") is None
    assert service.switch.ssh_port_open(service.app.config.nodes["node-4"], timeout=1) is False


# ---------------------------------------------------------------- the command line


def test_enersis_power_command_runs_on_the_lab_inventory(broker, lab):
    ensure_off(lab, "node-2")
    config = parse_config(__import__("tomllib").loads(Path(lab["power_toml"]).read_text()))
    assert config.broker is not None and config.broker.user == "power"
    env = {k: v for k, v in os.environ.items() if k != "ENERSIS_AMQP_URL"}
    proc = subprocess.Popen([str(VENV_BIN / "enersis"), "power", "--config", lab["power_toml"]],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    watcher = ResultWatcher(broker, lab["vhost"])
    arbiter = Publisher(broker.settings("arbiter", lab["vhost"]), "arbiter")
    try:
        # No need to wait for it: the command waits in its durable queue until the service consumes,
        # and the service binds its telemetry queue before it takes commands.
        c = cid()
        arbiter.publish(WakeNode(command_id=c, node="node-2", issued_by="arbiter"))
        r = watcher.final(c, timeout=40)
        assert r.status == "succeeded" and r.details["evidence"] == "NodeOnline", r
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        watcher.close()
        arbiter.close()
    assert proc.returncode == 0, out
    assert "power service for 4 node(s)" in out
