"""The arbiter on the real broker, with small real consumers standing in for the node side.

Fake executors (user `agent`, one migrate queue per node) and a fake power
service (user `power`, enersis.cmd.power) answer with CommandResults and move
an in-memory cluster; fake agents publish its telemetry every 0.3 s.  The
arbiter runs in-process as user `arbiter`; operators publish as `operator`.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field

import pika
import pytest

from enersis.arbiter.config import CommandSettings, NodeConfig
from enersis.arbiter.policy import Params
from enersis.arbiter.runner import ArbiterService
from enersis.common import topology
from enersis.common.bus import Consumer, Delivery, Publisher
from enersis.common.codec import decode
from enersis.common.messages import (
    CommandResult,
    MigrateVm,
    NodeOnline,
    ShutdownNode,
    WakeNode,
)

from .test_arbiter_fakes import config, domain, telemetry
from .conftest import wait_for

pytestmark = pytest.mark.broker

INTERVAL = 0.3


@dataclass
class FakeVm:
    name: str
    node: str
    pct: float  # share of its node's capacity (all nodes are the same size here)


@dataclass
class FakeCluster:
    """What "really" happens on the nodes: VM placement and power, shared by the fakes."""

    vms: dict[str, FakeVm]
    powered: dict[str, bool]
    lock: threading.Lock = field(default_factory=threading.Lock)
    migrate_commands: list[MigrateVm] = field(default_factory=list)
    power_commands: list = field(default_factory=list)
    hold_migrations: threading.Event = field(default_factory=threading.Event)  # set: answer accepted only
    held: list[MigrateVm] = field(default_factory=list)

    def load(self, node: str) -> float:
        return sum(v.pct for v in self.vms.values() if v.node == node)

    def on(self, node: str) -> list:
        return [domain(v.name, v.pct) for v in sorted(self.vms.values(), key=lambda v: v.name) if v.node == node]


class NodeSide:
    """Fake agents + executors + power service on the broker."""

    def __init__(self, broker, vhost: str, cluster: FakeCluster):
        self.cluster = cluster
        self.agent_pub = Publisher(broker.settings("agent", vhost), "fake-agent")
        self.power_pub = Publisher(broker.settings("power", vhost), "fake-power")
        self.executors = Consumer(broker.settings("agent", vhost), self.agent_pub, workers=2, name="fake-executor")
        for node in cluster.powered:
            def declare(ch, node=node):
                topology.declare_queue(ch, topology.migrate_queue_spec(node))
                return topology.migrate_queue(node)
            self.executors.subscribe(declare, self._migrate, allow_json=True, accept=frozenset({MigrateVm.KIND}))
        self.power = Consumer(broker.settings("power", vhost), self.power_pub, workers=1, name="fake-power")
        self.power.subscribe(topology.Q_POWER, self._power, allow_json=True,
                             accept=frozenset({WakeNode.KIND, ShutdownNode.KIND}))
        self.stop = threading.Event()
        self.seq = 0
        self.ticker = threading.Thread(target=self._tick, daemon=True)

    def start(self) -> "NodeSide":
        self.executors.start()
        self.power.start()
        wait_for(lambda: self.executors.ready.is_set() and self.power.ready.is_set(), 15, what="fake node side")
        self.publish_all()
        self.ticker.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.ticker.join(5)
        self.executors.stop()
        self.power.stop()
        self.agent_pub.close()
        self.power_pub.close()

    # -- agents

    def publish(self, node: str) -> None:
        with self.cluster.lock:
            if not self.cluster.powered[node]:
                return
            self.seq += 1
            msg = telemetry(node, self.cluster.load(node), self.cluster.on(node), seq=self.seq, interval=INTERVAL)
        self.agent_pub.publish(msg)

    def publish_all(self) -> None:
        for node in sorted(self.cluster.powered):
            self.publish(node)

    def _tick(self) -> None:
        while not self.stop.wait(INTERVAL):
            self.publish_all()

    # -- executor: validates like the real one, then moves the VM

    def _migrate(self, d: Delivery) -> None:
        cmd: MigrateVm = d.message  # type: ignore[assignment]
        c = self.cluster
        with c.lock:
            c.migrate_commands.append(cmd)
        base = dict(command_id=cmd.command_id, command_kind=cmd.KIND, node=cmd.source, vm=cmd.vm,
                    details={"source": cmd.source, "target": cmd.target})
        self.agent_pub.publish(CommandResult(status="accepted", **base))
        if c.hold_migrations.is_set():
            with c.lock:
                c.held.append(cmd)
            return
        self.finish(cmd)

    def finish(self, cmd: MigrateVm) -> None:
        c = self.cluster
        base = dict(command_id=cmd.command_id, command_kind=cmd.KIND, node=cmd.source, vm=cmd.vm,
                    details={"source": cmd.source, "target": cmd.target})
        with c.lock:
            vm = c.vms.get(cmd.vm)
            ok = vm is not None and vm.node == cmd.source and c.powered.get(cmd.target, False)
            if ok:
                vm.node = cmd.target
        if ok:
            self.agent_pub.publish(CommandResult(status="succeeded", reason=f"{cmd.vm} now runs on {cmd.target}", **base))
        else:
            self.agent_pub.publish(CommandResult(status="rejected", reason=f"{cmd.vm} is not running on {cmd.source}", **base))
        self.publish(cmd.source)
        self.publish(cmd.target)

    # -- power service: refuses to power off a node that hosts a VM

    def _power(self, d: Delivery) -> None:
        cmd = d.message
        c = self.cluster
        with c.lock:
            c.power_commands.append(cmd)
        base = dict(command_id=cmd.command_id, command_kind=cmd.KIND, node=cmd.node)
        self.power_pub.publish(CommandResult(status="accepted", **base))
        if isinstance(cmd, WakeNode):
            with c.lock:
                c.powered[cmd.node] = True
            self.agent_pub.publish(NodeOnline(node=cmd.node, boot_id=f"boot-{cmd.node}", hypervisor_ok=True,
                                              hypervisor_type="QEMU", domain_count=0, publish_interval_s=INTERVAL))
            self.publish(cmd.node)
            self.power_pub.publish(CommandResult(status="succeeded", reason="node is up", **base))
        else:
            with c.lock:
                hosting = [v.name for v in c.vms.values() if v.node == cmd.node]
                if not hosting:
                    c.powered[cmd.node] = False
            if hosting:
                self.power_pub.publish(CommandResult(status="failed", reason=f"hosts {hosting}", **base))
            else:
                self.power_pub.publish(CommandResult(status="succeeded", reason="node is off", **base))


class ResultWatcher:
    """An operator's private queue on enersis.results (what the management UI would show)."""

    def __init__(self, broker, vhost: str):
        self.conn = pika.BlockingConnection(broker.settings("operator", vhost).pika_parameters())
        self.ch = self.conn.channel()
        self.queue = self.ch.queue_declare("", exclusive=True).method.queue
        self.ch.queue_bind(self.queue, topology.EX_RESULTS, routing_key="#")
        self.seen: list = []

    def drain(self) -> list:
        while True:
            method, props, body = self.ch.basic_get(self.queue, auto_ack=True)
            if method is None:
                return self.seen
            self.seen.append(decode(body, props.content_type, allow_json=True).message)

    def find(self, command_id: str, status: str | None = None):
        for m in self.drain():
            if isinstance(m, CommandResult) and m.command_id == command_id and (status is None or m.status == status):
                return m
        return None

    def close(self) -> None:
        self.conn.close()


def arbiter_config(tmp_path, cluster: FakeCluster, **kw):
    kw.setdefault("params", Params(cycle_s=0.5))
    # Nodes known from the config: a node that is off never reports, yet may be woken.
    kw.setdefault("nodes", tuple(NodeConfig(name=n) for n in sorted(cluster.powered)))
    kw.setdefault("commands", CommandSettings(migrate_timeout_s=20, wake_timeout_s=10, shutdown_timeout_s=10))
    return config(state_file=str(tmp_path / "arbiter-state.json"), unknown_grace_s=1.0, **kw)


@pytest.fixture
def side(broker, vhost):
    made = []

    def make(cluster: FakeCluster) -> NodeSide:
        s = NodeSide(broker, vhost, cluster).start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture
def arbiters(broker, vhost):
    started = []

    def start(cfg) -> ArbiterService:
        svc = ArbiterService(cfg, broker.settings("arbiter", vhost)).start()
        started.append(svc)
        wait_for(svc.consumer.ready.is_set, 15, what="arbiter consuming")
        return svc

    yield start
    for svc in started:
        svc.stop()


def no_vm_lost(cluster: FakeCluster, names: set[str]) -> None:
    assert set(cluster.vms) == names
    for v in cluster.vms.values():
        assert cluster.powered[v.node], f"{v.name} is on {v.node}, which is off"


def test_overload_and_underload_end_to_end(tmp_path, side, arbiters):
    cluster = FakeCluster(
        vms={"v1": FakeVm("v1", "n1", 50), "v2": FakeVm("v2", "n1", 30), "v3": FakeVm("v3", "n1", 10),
             "w1": FakeVm("w1", "n2", 40), "x1": FakeVm("x1", "n4", 20)},
        powered={"n1": True, "n2": True, "n3": False, "n4": True},
    )
    side(cluster)
    # Warm-up: decide only once every configured node has reported (or is known off).
    arbiters(arbiter_config(tmp_path, cluster, warmup_s=3 * INTERVAL))
    # n1 (90 %) sheds its second most loaded VM to the least loaded node that stays under 80 %.
    wait_for(lambda: cluster.vms["v2"].node != "n1", 20, what="v2 moved off n1")
    assert cluster.vms["v2"].node == "n4"
    # n2 goes nearly idle: its VM leaves, then it is powered off once confirmed empty.
    with cluster.lock:
        cluster.vms["w1"].pct = 5
    wait_for(lambda: not cluster.powered["n2"], 20, what="n2 emptied and powered off")
    assert cluster.vms["w1"].node == "n4"  # least loaded: n4 at 50 % vs n1 at 60 %
    no_vm_lost(cluster, {"v1", "v2", "v3", "w1", "x1"})
    shutdowns = [c for c in cluster.power_commands if isinstance(c, ShutdownNode)]
    assert [c.node for c in shutdowns] == ["n2"]  # never a node with a VM
    # Every migrate command got exactly one execution (none repeated).
    ids = [c.command_id for c in cluster.migrate_commands]
    assert len(ids) == len(set(ids)) and sorted(c.vm for c in cluster.migrate_commands) == ["v2", "w1"]


def test_wake_then_migrate_onto_the_woken_node(tmp_path, side, arbiters):
    cluster = FakeCluster(
        vms={"v1": FakeVm("v1", "n1", 60), "v2": FakeVm("v2", "n1", 35), "w1": FakeVm("w1", "n2", 79)},
        powered={"n1": True, "n2": True, "n3": False},
    )
    side(cluster)
    arbiters(arbiter_config(tmp_path, cluster))
    wait_for(lambda: cluster.vms["v2"].node == "n3", 20, what="v2 on the woken n3")
    kinds = [type(c).__name__ for c in cluster.power_commands]
    assert kinds[0] == "WakeNode" and cluster.power_commands[0].node == "n3"
    first_migrate = cluster.migrate_commands[0]
    assert first_migrate.target == "n3"
    no_vm_lost(cluster, {"v1", "v2", "w1"})


def test_restart_mid_plan_does_not_reissue(tmp_path, side, arbiters, broker, vhost):
    cluster = FakeCluster(
        vms={"v1": FakeVm("v1", "n1", 50), "v2": FakeVm("v2", "n1", 40), "w1": FakeVm("w1", "n2", 20)},
        powered={"n1": True, "n2": True},
    )
    cluster.hold_migrations.set()
    ns = side(cluster)
    cfg = arbiter_config(tmp_path, cluster)
    first = arbiters(cfg)
    wait_for(lambda: cluster.held, 20, what="a migration accepted and held by the executor")
    [cmd] = cluster.held
    wait_for(lambda: first.arbiter.log.get(cmd.command_id) is not None and first.arbiter.log.get(cmd.command_id).accepted,
             10, what="the arbiter saw `accepted`")
    first.stop()  # the arbiter dies mid-plan
    second = arbiters(arbiter_config(tmp_path, cluster, warmup_s=2 * INTERVAL))
    assert second.arbiter.log.get(cmd.command_id) is not None  # it knows the command is in flight
    # Let it run a few cycles over fresh telemetry: no second command for v2.
    wait_for(lambda: second.arbiter.decisions >= 4, 10, what="a few decisions after the restart")
    assert [c.vm for c in cluster.migrate_commands] == ["v2"]
    ns.finish(cmd)  # the executor completes; the result reaches the new arbiter
    wait_for(lambda: second.arbiter.log.get(cmd.command_id) is None, 10, what="the result folded after restart")
    with second.arbiter.lock:
        assert second.arbiter.state.vm_location("v2") == "n2"
    assert [c.vm for c in cluster.migrate_commands] == ["v2"]
    no_vm_lost(cluster, {"v1", "v2", "w1"})


def test_operator_json_drain_from_the_management_api(tmp_path, side, arbiters, broker, vhost):
    cluster = FakeCluster(
        vms={"a1": FakeVm("a1", "n1", 30), "a2": FakeVm("a2", "n1", 25), "b1": FakeVm("b1", "n2", 40),
             "c1": FakeVm("c1", "n3", 40)},
        powered={"n1": True, "n2": True, "n3": True},
    )
    side(cluster)
    watcher = ResultWatcher(broker, vhost)
    try:
        svc = arbiters(arbiter_config(tmp_path, cluster))
        # What an operator pastes into the management UI's "Publish message" form.
        body = {"kind": "DrainNode", "version": "1.0",
                "body": {"command_id": "drain-n1", "node": "n1", "power_off": True, "reason": "RAM swap"}}
        routed = broker.api("POST", f"exchanges/{vhost}/{topology.EX_COMMANDS}/publish", {
            "properties": {"content_type": "application/json", "delivery_mode": 2},
            "routing_key": "arbiter.DrainNode", "payload": json.dumps(body), "payload_encoding": "string"},
            user="operator")
        assert routed == {"routed": True}
        wait_for(lambda: watcher.find("drain-n1", "accepted"), 10, what="the drain accepted")
        wait_for(lambda: watcher.find("drain-n1", "succeeded"), 30, what="the drain finished")
        assert not cluster.powered["n1"]
        assert {v.node for v in cluster.vms.values()} <= {"n2", "n3"}
        no_vm_lost(cluster, {"a1", "a2", "b1", "c1"})
        # Pause by JSON too; while paused nothing moves even when n2 overloads.
        pause = {"kind": "PauseAutomation", "version": "1.0", "body": {"command_id": "pause-1"}}
        broker.api("POST", f"exchanges/{vhost}/{topology.EX_COMMANDS}/publish", {
            "properties": {"content_type": "application/json"}, "routing_key": "arbiter.PauseAutomation",
            "payload": json.dumps(pause), "payload_encoding": "string"}, user="operator")
        wait_for(lambda: watcher.find("pause-1", "succeeded"), 10, what="pause acknowledged")
        n_before = len(cluster.migrate_commands)
        with cluster.lock:
            cluster.vms["b1"].pct = 80
            cluster.vms["a1"].pct = 30  # n2 = 80 + a1/a2 wherever they are: some node is overloaded now
        wait_for(lambda: any(n.cpu_pct > 80 for n in list(svc.arbiter.state.nodes.values())), 10,
                 what="the overload reported to the paused arbiter")
        seen = svc.arbiter.decisions
        wait_for(lambda: svc.arbiter.decisions >= seen + 3, 10, what="three more decisions while paused")
        assert len(cluster.migrate_commands) == n_before
    finally:
        watcher.close()


def test_bad_operator_input_is_dead_lettered_with_a_reason(tmp_path, side, arbiters, broker, vhost):
    cluster = FakeCluster(vms={"v": FakeVm("v", "n1", 30)}, powered={"n1": True})
    side(cluster)
    arbiters(arbiter_config(tmp_path, cluster))
    bad = {"kind": "SetThresholds", "version": "1.0", "body": {"command_id": "t-1", "upper_pct": 10, "lower_pct": 50}}
    broker.api("POST", f"exchanges/{vhost}/{topology.EX_COMMANDS}/publish", {
        "properties": {"content_type": "application/json"}, "routing_key": "arbiter.SetThresholds",
        "payload": json.dumps(bad), "payload_encoding": "string"}, user="operator")
    wait_for(lambda: broker.queue_depth(vhost, topology.Q_DEAD_LETTERS) == 1, 10, what="the dead letter")
    conn = pika.BlockingConnection(broker.settings("operator", vhost).pika_parameters())
    try:
        method, props, _ = conn.channel().basic_get(topology.Q_DEAD_LETTERS, auto_ack=True)
        assert "lower_pct" in props.headers[topology.H_REJECT_REASON]
    finally:
        conn.close()


def test_advisory_mode_recommends_then_an_approval_executes(tmp_path, side, arbiters, broker, vhost):
    cluster = FakeCluster(
        vms={"v1": FakeVm("v1", "n1", 50), "v2": FakeVm("v2", "n1", 40), "w1": FakeVm("w1", "n2", 20)},
        powered={"n1": True, "n2": True},
    )
    side(cluster)
    watcher = ResultWatcher(broker, vhost)
    conn = pika.BlockingConnection(broker.settings("operator", vhost).pika_parameters())
    try:
        arbiters(arbiter_config(tmp_path, cluster, mode="advisory"))
        ch = conn.channel()

        def recommendation():
            method, props, body = ch.basic_get(topology.Q_ADVICE, auto_ack=True)
            return decode(body, props.content_type).message if method else None

        rec = wait_for(recommendation, 10, what="a Recommendation on enersis.res.advice")
        assert rec.command_kind == "MigrateVm" and rec.command["vm"] == "v2" and "n1 overloaded" in rec.summary
        assert cluster.migrate_commands == []  # advisory: nothing executed
        approve = {"kind": "ApproveRecommendation", "version": "1.0",
                   "body": {"command_id": "approve-1", "recommendation_id": rec.recommendation_id}}
        broker.api("POST", f"exchanges/{vhost}/{topology.EX_COMMANDS}/publish", {
            "properties": {"content_type": "application/json"}, "routing_key": "arbiter.ApproveRecommendation",
            "payload": json.dumps(approve), "payload_encoding": "string"}, user="operator")
        ok = wait_for(lambda: watcher.find("approve-1", "succeeded"), 10, what="the approval's result")
        wait_for(lambda: cluster.vms["v2"].node == "n2", 10, what="the approved migration executed")
        assert [c.command_id for c in cluster.migrate_commands] == [ok.details["command_id"]]
        assert cluster.migrate_commands[0].issued_by == "operator"
    finally:
        conn.close()
        watcher.close()
