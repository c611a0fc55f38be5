"""`enersis send` and `enersis status` against the real broker, with hand-written node stand-ins.

The stand-ins publish telemetry and answer commands with the agent and power
roles, so the CLI's permissions (operator) are exercised.  The same commands
are also tested against a whole running demo cluster in test_demo_cluster.py.
"""

from __future__ import annotations

import json
import threading
import urllib.parse

import pika
import pytest

from enersis.cli import main as cli_main
from enersis.common import topology
from enersis.common.bus import Consumer, Delivery, Publisher
from enersis.common.codec import decode
from enersis.common.messages import CommandResult, DomainSample, NodeTelemetry
from enersis.ops import connect as ops_connect


pytestmark = pytest.mark.broker


def operator_url(broker, vhost: str) -> str:
    pw = urllib.parse.quote(broker.passwords["operator"], safe="")
    return f"amqp://operator:{pw}@127.0.0.1:{broker.amqp_port}/{urllib.parse.quote(vhost, safe='')}"


def telemetry(node: str, vms: list[str], seq: int = 1, cpu: float = 42.0) -> NodeTelemetry:
    domains = [DomainSample(vm, f"uuid-{vm}", 1, 1, 1048576, 1048576, 10.0, 40.0) for vm in vms]
    return NodeTelemetry(node, seq, "boot-1", True, "Simulated", 4, 2000, 8 * 1048576, 6 * 1048576,
                         cpu, cpu, 2.0, 0.5, 0.5, domains)


class FakeNodes:
    """Agents that publish telemetry every 0.5 s (a stand-in for enersis agent)."""

    def __init__(self, broker, vhost: str, placement: dict[str, list[str]]):
        self.pub = Publisher(broker.settings("agent", vhost), sender="fake-agent")
        self.placement = placement
        self.stop = threading.Event()
        conn = pika.BlockingConnection(broker.settings("agent", vhost).pika_parameters())
        for node in placement:  # as each agent does at start
            topology.declare_queue(conn.channel(), topology.migrate_queue_spec(node))
        conn.close()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        seq = 0
        while not self.stop.is_set():
            seq += 1
            for node, vms in self.placement.items():
                self.pub.publish(telemetry(node, vms, seq))
            self.stop.wait(0.5)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.pub.close()


class Responder:
    """Consumes one command queue as `user` and answers every command with the given statuses."""

    def __init__(self, broker, vhost: str, user: str, queue: str, statuses: tuple[tuple[str, str], ...]):
        self.pub = Publisher(broker.settings(user, vhost), sender=f"fake-{user}")
        self.consumer = Consumer(broker.settings(user, vhost), self.pub, name=f"fake-{user}")
        self.received: list = []
        self.statuses = statuses

        def handle(d: Delivery) -> None:
            m = d.message
            self.received.append(m)
            for status, reason in self.statuses:
                self.pub.publish(CommandResult(m.command_id, m.KIND, status, reason,
                                               node=getattr(m, "source", "") or getattr(m, "node", ""),
                                               vm=getattr(m, "vm", ""), details={"duration_s": 0.1}))

        self.consumer.subscribe(queue, handle, allow_json=True)
        self.consumer.start()
        assert self.consumer.ready.wait(10)

    def close(self) -> None:
        self.consumer.stop()
        self.pub.close()


def depth(broker, vhost: str, queue: str) -> int:
    # AMQP's count is current; the management API's lags by its stats interval.
    conn = pika.BlockingConnection(broker.settings("admin", vhost).pika_parameters())
    try:
        return conn.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        conn.close()


@pytest.fixture
def url(broker, vhost, monkeypatch):
    u = operator_url(broker, vhost)
    monkeypatch.setenv("ENERSIS_AMQP_URL", u)
    return u


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_no_broker_configured_is_a_usage_error(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("ENERSIS_AMQP_URL", raising=False)
    monkeypatch.setattr(ops_connect, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    code, _, err = run_cli(capsys, "send", "pause")
    assert code == 2
    assert "no broker configured" in err


def test_unreachable_broker_exits_4(monkeypatch, capsys):
    monkeypatch.delenv("ENERSIS_AMQP_URL", raising=False)
    code, _, err = run_cli(capsys, "send", "wake", "node-1", "--broker-url", "amqp://operator:x@127.0.0.1:9/enersis",
                           "--connect-timeout", "0.5")
    assert code == 4
    assert "unreachable" in err


def test_wrong_password_exits_4(broker, vhost, monkeypatch, capsys):
    monkeypatch.delenv("ENERSIS_AMQP_URL", raising=False)
    code, _, err = run_cli(capsys, "status", "--broker-url",
                           f"amqp://operator:wrong@127.0.0.1:{broker.amqp_port}/{vhost}", "--listen", "1")
    assert code == 4
    assert "refused user 'operator'" in err


def test_password_file_and_config(broker, vhost, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("ENERSIS_AMQP_URL", raising=False)
    pw = tmp_path / "operator.password"
    pw.write_text(broker.passwords["operator"] + "\n")
    cfg = tmp_path / "operator.toml"
    cfg.write_text(f'[broker]\nurl = "amqp://127.0.0.1:{broker.amqp_port}/{vhost}"\nuser = "operator"\n'
                   f'password_file = "{pw}"\n')
    code, out, _ = run_cli(capsys, "send", "pause", "--config", str(cfg), "--no-wait")
    assert code == 0, out
    assert depth(broker, vhost, topology.Q_ARBITER_CONTROL) == 1


def test_impossible_values_are_refused_before_publishing(url, broker, vhost, capsys):
    code, _, err = run_cli(capsys, "send", "thresholds", "--upper", "20", "--lower", "30")
    assert code == 2
    assert "lower_pct < upper_pct" in err
    assert depth(broker, vhost, topology.Q_ARBITER_CONTROL) == 0


def test_no_wait_publishes_a_decodable_persistent_command(url, broker, vhost, capsys):
    code, out, _ = run_cli(capsys, "send", "shutdown", "node-3", "--force", "--no-wait", "--reason", "maintenance")
    assert code == 0
    assert "sent ShutdownNode" in out
    conn = pika.BlockingConnection(broker.settings("admin", vhost).pika_parameters())
    method, props, body = conn.channel().basic_get(topology.Q_POWER, auto_ack=True)
    conn.close()
    env = decode(body, props.content_type)
    assert (env.message.node, env.message.force, env.message.reason) == ("node-3", True, "maintenance")
    assert props.delivery_mode == 2 and props.type == "ShutdownNode" and props.message_id == env.id


def test_migrate_finds_the_source_in_telemetry_and_waits_for_success(url, broker, vhost, capsys):
    nodes = FakeNodes(broker, vhost, {"node-a": ["vm-1", "vm-2"], "node-b": ["vm-3"]})
    agent = Responder(broker, vhost, "agent", topology.migrate_queue("node-a"),
                      (("accepted", ""), ("succeeded", "migrated in 0.1s")))
    try:
        code, out, err = run_cli(capsys, "send", "migrate", "vm-2", "--to", "node-b", "--timeout", "20")
    finally:
        agent.close()
        nodes.close()
    assert code == 0, err
    assert [(m.vm, m.source, m.target) for m in agent.received] == [("vm-2", "node-a", "node-b")]
    assert "accepted: MigrateVm" in out
    assert "succeeded: MigrateVm vm=vm-2 node=node-a - migrated in 0.1s (duration_s=0.1)" in out


def test_migrate_of_an_unknown_vm_names_the_nodes_heard(url, broker, vhost, capsys):
    nodes = FakeNodes(broker, vhost, {"node-a": ["vm-1"], "node-b": []})
    try:
        code, _, err = run_cli(capsys, "send", "migrate", "vm-404", "--to", "node-b", "--lookup-timeout", "10")
    finally:
        nodes.close()
    assert code == 2
    assert "no reporting node runs a VM called 'vm-404' (nodes heard: node-a, node-b)" in err


def test_migrate_to_or_from_an_unknown_node(url, broker, vhost, capsys):
    conn = pika.BlockingConnection(broker.settings("agent", vhost).pika_parameters())
    topology.declare_queue(conn.channel(), topology.migrate_queue_spec("node-b"))
    conn.close()
    code, _, err = run_cli(capsys, "send", "migrate", "vm-1", "--from", "node-b", "--to", "node-zz")
    assert code == 2
    assert "unknown target node 'node-zz'" in err
    # The source check is the broker's: a mandatory publish nobody can route.
    code, _, err = run_cli(capsys, "send", "migrate", "vm-1", "--from", "node-yy", "--to", "node-b")
    assert code == 2
    assert "unknown source node 'node-yy'" in err
    code, _, err = run_cli(capsys, "send", "migrate", "vm-1", "--from", "node-b", "--to", "node-b")
    assert code == 2


def test_failed_and_rejected_results_exit_1_and_json_output(url, broker, vhost, capsys):
    power = Responder(broker, vhost, "power", topology.Q_POWER, (("rejected", "unknown node 'node-9'"),))
    try:
        code, out, _ = run_cli(capsys, "send", "wake", "node-9", "--json", "--timeout", "20")
    finally:
        power.close()
    assert code == 1
    result = json.loads(out.strip().splitlines()[-1])
    assert result["status"] == "rejected" and result["reason"] == "unknown node 'node-9'"
    assert result["command_kind"] == "WakeNode" and result["node"] == "node-9"


def test_replayed_command_id_reaches_the_consumer_with_the_same_id(url, broker, vhost, capsys):
    power = Responder(broker, vhost, "power", topology.Q_POWER, (("succeeded", "done"),))
    try:
        assert run_cli(capsys, "send", "wake", "node-1", "--command-id", "op-42", "--timeout", "20")[0] == 0
        assert run_cli(capsys, "send", "wake", "node-1", "--command-id", "op-42", "--timeout", "20")[0] == 0
    finally:
        power.close()
    assert [m.command_id for m in power.received] == ["op-42", "op-42"]


def test_no_final_result_exits_3_and_leaves_the_command_queued(url, broker, vhost, capsys):
    code, _, err = run_cli(capsys, "send", "resume", "--timeout", "1")
    assert code == 3
    assert "no result at all" in err
    assert depth(broker, vhost, topology.Q_ARBITER_CONTROL) == 1


def test_status_table_and_json(url, broker, vhost, capsys):
    nodes = FakeNodes(broker, vhost, {"node-a": ["vm-1", "vm-2"], "node-10": [], "node-2": ["vm-3"]})
    try:
        code, out, _ = run_cli(capsys, "status", "--listen", "10", "--vms")
        assert code == 0
        lines = out.splitlines()
        node_lines = [l for l in lines if l.startswith("node-")]
        assert [l.split()[0] for l in node_lines[:3]] == ["node-2", "node-10", "node-a"]
        assert "vm-1 vm-2" in node_lines[2] and " on " in node_lines[2] and "42.0" in node_lines[2]
        assert any(l.startswith("vm-3") and "node-2" in l for l in lines)
        code, out, _ = run_cli(capsys, "status", "--listen", "10", "--json",
                               "--mgmt-url", f"http://127.0.0.1:{broker.mgmt_port}/")
        view = json.loads(out)
        by_name = {n["node"]: n for n in view["nodes"]}
        assert by_name["node-a"]["vms"] == ["vm-1", "vm-2"] and by_name["node-a"]["state"] == "online"
    finally:
        nodes.close()


def test_status_with_nothing_reporting_exits_1(url, capsys):
    code, out, _ = run_cli(capsys, "status", "--listen", "1")
    assert code == 1
    assert "no node reported" in out
