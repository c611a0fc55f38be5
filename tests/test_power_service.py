"""The power service against a real broker, with a hand-written fake switch (no hardware, no netns).

The fake records every wake and shutdown it is asked for, so "did the work
once" is counted, not assumed; the test itself plays the nodes' agents by
publishing NodeOnline / NodeTelemetry / NodeOffline as the `agent` user.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any, Callable

import pika
import pytest

from enersis.common import topology
from enersis.common.bus import Consumer, Publisher
from enersis.common.codec import JSON, encode, wrap
from enersis.common.messages import (
    CommandResult,
    DomainSample,
    MigrateVm,
    NodeOffline,
    NodeOnline,
    NodeTelemetry,
    ShutdownNode,
    WakeNode,
)
from enersis.power.inventory import parse_config
from enersis.power.main import PowerApp
from enersis.power.switch import ShutdownSent, SwitchError
from tests.conftest import Broker, wait_for

pytestmark = pytest.mark.broker

NODES = ("n1", "n2", "n3")


def power_config(**settings: Any):
    table = {
        "power": {"wake_timeout_s": 10, "shutdown_timeout_s": 10, "stale_after_s": 5, "wol_gap_s": 0, **settings},
        "nodes": {
            n: {"mac": f"52:54:00:00:00:0{i}", "address": f"10.99.0.{i}", "wol_broadcast": "10.99.0.255",
                "ssh_key": "/nonexistent/key", "known_hosts": "/nonexistent/known_hosts"}
            for i, n in enumerate(NODES, start=1)
        },
    }
    return parse_config(table, check_files=False, with_broker=False)


class FakeSwitch:
    """Records what it is asked; hooks let a test play the node's reaction."""

    def __init__(self) -> None:
        self.wakes: list[str] = []
        self.shutdowns: list[str] = []
        self.port_open: dict[str, bool] = {}
        self.on_wake: Callable[[str], None] | None = None
        self.on_shutdown: Callable[[str], None] | None = None
        self.shutdown_error: SwitchError | None = None
        self.shutdown_status: int | None = 0
        self._lock = threading.Lock()

    def wake(self, node) -> int:
        with self._lock:
            self.wakes.append(node.name)
        if self.on_wake:
            self.on_wake(node.name)
        return 3

    def shutdown(self, node) -> ShutdownSent:
        if self.shutdown_error:
            raise self.shutdown_error
        with self._lock:
            self.shutdowns.append(node.name)
        if self.on_shutdown:
            self.on_shutdown(node.name)
        return ShutdownSent(exit_status=self.shutdown_status)

    def ssh_port_open(self, node, timeout: float = 2.0) -> bool:
        return self.port_open.get(node.name, True)


class ResultWatcher:
    """Every CommandResult on enersis.results, seen through the operator's private queue."""

    def __init__(self, broker: Broker, vhost: str):
        self.results: list[CommandResult] = []
        self._lock = threading.Lock()
        self.publisher = Publisher(broker.settings("operator", vhost), "watcher")
        self.consumer = Consumer(broker.settings("operator", vhost), self.publisher, name="watcher")
        self.consumer.subscribe(self._declare, self._on, inline=True)
        self.consumer.start()
        wait_for(self.consumer.ready.is_set, 15, what="result watcher ready")

    @staticmethod
    def _declare(channel: Any) -> str:
        q = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        channel.queue_bind(q, topology.EX_RESULTS, routing_key="result.#")
        return q

    def _on(self, delivery) -> None:
        with self._lock:
            self.results.append(delivery.message)

    def of(self, command_id: str) -> list[CommandResult]:
        with self._lock:
            return [r for r in self.results if r.command_id == command_id]

    def final(self, command_id: str, timeout: float = 20.0) -> CommandResult:
        return wait_for(lambda: next((r for r in self.of(command_id) if r.final), None), timeout,
                        what=f"final result of {command_id}")

    def statuses(self, command_id: str) -> list[str]:
        return [r.status for r in self.of(command_id)]

    def close(self) -> None:
        self.consumer.stop()
        self.publisher.close()


def telemetry(node: str, *, running: int = 0, paused: int = 0, hypervisor_ok: bool = True,
              publish_interval_s: float = 0.5) -> NodeTelemetry:
    doms = [DomainSample(f"vm-{i}", str(uuid.uuid4()), 1, 1, 1024, 1024, 5.0, 20.0) for i in range(running)]
    doms += [DomainSample(f"vm-p{i}", str(uuid.uuid4()), 3, 1, 1024, 1024, 0.0, 0.0) for i in range(paused)]
    doms.append(DomainSample("old", str(uuid.uuid4()), 5, 1, 1024, 0, 0.0, 0.0))  # shut off: nothing to lose
    return NodeTelemetry(node=node, seq=1, boot_id="b1", hypervisor_ok=hypervisor_ok, hypervisor_type="test",
                         cpus=4, mhz=2000, mem_total_kib=8 << 20, mem_free_kib=4 << 20, cpu_pct=5.0,
                         cpu_pct_latest=5.0, window_s=1.0, sample_interval_s=0.1,
                         publish_interval_s=publish_interval_s, domains=doms,
                         error="" if hypervisor_ok else "libvirtd is not running")


class Harness:
    def __init__(self, broker: Broker, vhost: str, **settings: Any):
        self.broker, self.vhost = broker, vhost
        self.switch = FakeSwitch()
        self.app = PowerApp(power_config(**settings), broker=broker.settings("power", vhost), switch=self.switch)
        self.app.start()
        self.watcher = ResultWatcher(broker, vhost)
        self.agent = Publisher(broker.settings("agent", vhost), "agent.test")
        self.arbiter = Publisher(broker.settings("arbiter", vhost), "arbiter")
        self.operator = Publisher(broker.settings("operator", vhost), "operator")
        wait_for(self.app.ready.is_set, 15, what="power service ready")

    def node_says(self, message) -> None:
        """Publish as the node's agent and wait until the power service has folded it in."""
        before = self.app.tracker.status(message.node)
        self.agent.publish(message)
        attr = {NodeTelemetry: "telemetry_age_s", NodeOnline: "online_age_s", NodeOffline: "offline_age_s"}[type(message)]
        prev = getattr(before, attr)
        wait_for(lambda: (a := getattr(self.app.tracker.status(message.node), attr)) is not None
                 and (prev is None or a < prev), 10, what=f"{type(message).__name__} seen by the power service")

    def close(self) -> None:
        self.app.stop()
        self.watcher.close()
        for p in (self.agent, self.arbiter, self.operator):
            p.close()


@pytest.fixture
def h(broker, vhost):
    harness = Harness(broker, vhost)
    yield harness
    harness.close()


def cid() -> str:
    return uuid.uuid4().hex[:12]


# ---------------------------------------------------------------- wake


def test_wake_sends_packets_then_succeeds_on_node_online_with_boot_time(h):
    h.switch.on_wake = lambda node: h.agent.publish(NodeOnline(node=node, boot_id="b2", hypervisor_ok=True,
                                                               hypervisor_type="test", domain_count=0))
    c = cid()
    h.arbiter.publish(WakeNode(command_id=c, node="n1", issued_by="arbiter"))
    r = h.watcher.final(c)
    assert r.status == "succeeded", r
    assert r.details["evidence"] == "NodeOnline" and r.details["boot_id"] == "b2"
    assert r.details["boot_s"] >= 0 and r.details["packets"] == 3
    assert h.watcher.statuses(c) == ["accepted", "succeeded"]
    assert h.switch.wakes == ["n1"]


def test_wake_of_an_online_node_is_skipped_without_a_packet(h):
    h.node_says(telemetry("n1"))
    c = cid()
    h.arbiter.publish(WakeNode(command_id=c, node="n1"))
    r = h.watcher.final(c)
    assert r.status == "skipped" and "already online" in r.reason
    assert h.switch.wakes == []


def test_wake_without_node_online_fails_after_the_timeout(broker, vhost):
    h = Harness(broker, vhost, wake_timeout_s=1.5)
    try:
        c = cid()
        h.arbiter.publish(WakeNode(command_id=c, node="n2"))
        r = h.watcher.final(c)
        assert r.status == "failed" and "no NodeOnline from n2 within 2s" in r.reason, r.reason
        assert h.watcher.statuses(c) == ["accepted", "failed"]
        assert h.switch.wakes == ["n2"]
    finally:
        h.close()


def test_duplicate_wake_does_the_work_once_and_a_replay_republishes_the_result(h):
    release = threading.Event()
    h.switch.on_wake = lambda node: threading.Thread(target=lambda: (release.wait(10), h.agent.publish(
        NodeOnline(node=node, boot_id="b3", hypervisor_ok=True, hypervisor_type="test", domain_count=0)))).start()
    c = cid()
    h.arbiter.publish(WakeNode(command_id=c, node="n1"))
    h.arbiter.publish(WakeNode(command_id=c, node="n1"))  # the same command, delivered twice while in flight
    wait_for(lambda: "accepted" in h.watcher.statuses(c), 10, what="accepted")
    release.set()
    first = h.watcher.final(c)
    assert first.status == "succeeded"
    # Both deliveries are settled (acked) only after the work: the queue empties.
    wait_for(lambda: h.broker.queue_depth(h.vhost, topology.Q_POWER) == 0, 15, what="power queue drained")
    assert h.watcher.statuses(c).count("succeeded") == 1
    h.arbiter.publish(WakeNode(command_id=c, node="n1"))  # a replay, after the fact
    wait_for(lambda: h.watcher.statuses(c).count("succeeded") == 2, 10, what="republished result")
    assert h.switch.wakes == ["n1"], "one packet burst for one command"


def test_a_second_wake_joins_and_an_opposite_command_waits_its_turn(h, caplog):
    release = threading.Event()
    h.switch.on_wake = lambda node: threading.Thread(target=lambda: (release.wait(10), h.agent.publish(
        NodeOnline(node=node, boot_id="b4", hypervisor_ok=True, hypervisor_type="test", domain_count=0)))).start()
    h.switch.on_shutdown = lambda node: h.agent.publish(NodeOffline(node=node, boot_id="b4", reason="SIGTERM"))
    c1, c2, c3 = cid(), cid(), cid()
    h.arbiter.publish(WakeNode(command_id=c1, node="n1"))
    wait_for(lambda: "accepted" in h.watcher.statuses(c1), 10, what="first wake accepted")
    h.arbiter.publish(WakeNode(command_id=c2, node="n1"))
    h.arbiter.publish(ShutdownNode(command_id=c3, node="n1", issued_by="arbiter"))
    wait_for(lambda: "accepted" in h.watcher.statuses(c2), 10, what="second wake joined")
    wait_for(lambda: any(f"{c3}: n1 is waking (command {c1}); waiting" in r.getMessage() for r in caplog.records),
             10, what="the shutdown queued behind the wake")
    assert h.watcher.of(c3) == [] and h.switch.shutdowns == []
    release.set()
    r1, r2 = h.watcher.final(c1), h.watcher.final(c2)
    assert r1.status == r2.status == "succeeded"
    assert r2.details["joined"] == c1
    # Its turn: judged afresh on the woken node's telemetry (empty), so it goes ahead.
    h.node_says(telemetry("n1"))
    r3 = h.watcher.final(c3)
    assert r3.status == "succeeded", r3
    assert h.switch.wakes == ["n1"] and h.switch.shutdowns == ["n1"]


def test_unknown_node_is_rejected_with_the_fix(h):
    c = cid()
    h.arbiter.publish(WakeNode(command_id=c, node="nowhere"))
    r = h.watcher.final(c)
    assert r.status == "rejected" and "[nodes.nowhere]" in r.reason


# ---------------------------------------------------------------- shutdown


def test_shutdown_of_a_node_with_running_or_paused_domains_is_rejected_and_nothing_runs(h):
    h.node_says(telemetry("n1", running=2))
    c = cid()
    h.arbiter.publish(ShutdownNode(command_id=c, node="n1", issued_by="arbiter"))
    r = h.watcher.final(c)
    assert r.status == "rejected" and "2 active domain(s)" in r.reason and "vm-0 (running)" in r.reason
    h.node_says(telemetry("n2", paused=1))
    c2 = cid()
    h.arbiter.publish(ShutdownNode(command_id=c2, node="n2", issued_by="arbiter"))
    r2 = h.watcher.final(c2)
    assert r2.status == "rejected" and "vm-p0 (paused)" in r2.reason
    assert h.watcher.statuses(c) == ["rejected"] and h.switch.shutdowns == []


def test_shutdown_with_a_blind_hypervisor_is_rejected(h):
    h.node_says(telemetry("n1", hypervisor_ok=False))
    c = cid()
    h.arbiter.publish(ShutdownNode(command_id=c, node="n1", issued_by="arbiter"))
    r = h.watcher.final(c)
    assert r.status == "rejected" and "libvirtd is not running" in r.reason
    assert h.switch.shutdowns == []


def test_force_is_honoured_only_from_an_operator(h):
    h.node_says(telemetry("n1", running=1))
    h.switch.on_shutdown = lambda node: h.agent.publish(NodeOffline(node=node, boot_id="b1", reason="SIGTERM"))
    c1, c2 = cid(), cid()
    h.arbiter.publish(ShutdownNode(command_id=c1, node="n1", force=True, issued_by="arbiter"))
    assert h.watcher.final(c1).status == "rejected"
    assert h.switch.shutdowns == []
    h.operator.publish(ShutdownNode(command_id=c2, node="n1", force=True, issued_by="operator"))
    r = h.watcher.final(c2)
    assert r.status == "succeeded" and r.details["evidence"] == "NodeOffline"
    accepted = [x for x in h.watcher.of(c2) if x.status == "accepted"][0]
    assert "forced by an operator" in accepted.reason and "vm-0" in accepted.reason
    assert h.switch.shutdowns == ["n1"]


def test_shutdown_confirmed_by_node_offline_then_duplicates_and_new_commands_do_nothing(h):
    h.node_says(telemetry("n1"))
    h.switch.on_shutdown = lambda node: h.agent.publish(NodeOffline(node=node, boot_id="b1", reason="SIGTERM"))
    c = cid()
    h.arbiter.publish(ShutdownNode(command_id=c, node="n1", issued_by="arbiter"))
    r = h.watcher.final(c)
    assert r.status == "succeeded" and r.details["evidence"] == "NodeOffline" and r.details["down_s"] >= 0
    assert h.watcher.statuses(c) == ["accepted", "succeeded"]
    h.arbiter.publish(ShutdownNode(command_id=c, node="n1", issued_by="arbiter"))
    wait_for(lambda: h.watcher.statuses(c).count("succeeded") == 2, 10, what="republished result")
    c2 = cid()
    h.arbiter.publish(ShutdownNode(command_id=c2, node="n1", issued_by="arbiter"))
    r2 = h.watcher.final(c2)
    assert r2.status == "skipped" and "already off" in r2.reason
    assert h.switch.shutdowns == ["n1"]


def test_shutdown_confirmed_by_silence_and_a_closed_ssh_port(h):
    h.node_says(telemetry("n1", publish_interval_s=0.5))

    def node_dies_without_a_word(node: str) -> None:
        h.switch.port_open[node] = False  # no NodeOffline: a hard power-off

    h.switch.on_shutdown = node_dies_without_a_word
    c = cid()
    h.arbiter.publish(ShutdownNode(command_id=c, node="n1", issued_by="arbiter"))
    r = h.watcher.final(c)
    assert r.status == "succeeded" and r.details["evidence"] == "silence+ssh-closed", r


def test_shutdown_not_confirmed_in_time_fails(broker, vhost):
    h = Harness(broker, vhost, shutdown_timeout_s=2)
    try:
        h.node_says(telemetry("n1"))
        c = cid()
        h.arbiter.publish(ShutdownNode(command_id=c, node="n1", issued_by="arbiter"))
        r = h.watcher.final(c)
        assert r.status == "failed" and "not confirmed down within 2s" in r.reason, r.reason
    finally:
        h.close()


def test_shutdown_with_stale_telemetry_probes_ssh(broker, vhost):
    h = Harness(broker, vhost, stale_after_s=1)
    try:
        h.switch.port_open["n2"] = True
        c = cid()
        h.arbiter.publish(ShutdownNode(command_id=c, node="n2", issued_by="arbiter"))
        r = h.watcher.final(c)
        assert r.status == "rejected" and "no fresh telemetry" in r.reason and "SSH port answers" in r.reason
        h.switch.port_open["n3"] = False
        c2 = cid()
        h.arbiter.publish(ShutdownNode(command_id=c2, node="n3", issued_by="arbiter"))
        r2 = h.watcher.final(c2)
        assert r2.status == "skipped" and "looks off already" in r2.reason
        assert h.switch.shutdowns == []
    finally:
        h.close()


def test_refused_host_key_fails_and_a_nonzero_exit_fails(h):
    h.node_says(telemetry("n1"))
    h.switch.shutdown_error = SwitchError("host key of 10.99.0.1:22 does not match known_hosts; nothing was run")
    c = cid()
    h.arbiter.publish(ShutdownNode(command_id=c, node="n1", issued_by="arbiter"))
    r = h.watcher.final(c)
    assert r.status == "failed" and "does not match" in r.reason and not r.retryable
    h.switch.shutdown_error = None
    h.switch.shutdown_status = 1
    c2 = cid()
    h.arbiter.publish(ShutdownNode(command_id=c2, node="n1", issued_by="arbiter"))
    r2 = h.watcher.final(c2)
    assert r2.status == "failed" and "exited with status 1" in r2.reason


# ---------------------------------------------------------------- bad input


def test_malformed_commands_are_dead_lettered_with_a_reason(h):
    conn = pika.BlockingConnection(h.broker.settings("admin", h.vhost).pika_parameters())
    ch = conn.channel()
    try:
        bad = {
            "garbage": (b"{not json", "application/json"),
            "wrong-kind": (encode(wrap(MigrateVm(command_id="m1", vm="v", source="n1", target="n2"), "x"), JSON),
                           "application/json"),
            "bad-node": (json.dumps({"kind": "WakeNode", "version": "1.0",
                                     "body": {"command_id": "w1", "node": "n1; rm -rf /"}}).encode(), "application/json"),
        }
        for name, (payload, ctype) in bad.items():
            ch.basic_publish(topology.EX_COMMANDS, "power.wake.n1", payload,
                             pika.BasicProperties(content_type=ctype, message_id=name))
        # A command id reused for another command is refused the same way.
        c = cid()
        h.node_says(telemetry("n1"))
        h.arbiter.publish(WakeNode(command_id=c, node="n1"))
        h.watcher.final(c)
        h.arbiter.publish(ShutdownNode(command_id=c, node="n2"))
        dead: dict[str, str] = {}

        def collect() -> bool:
            while True:
                method, props, body = ch.basic_get(topology.Q_DEAD_LETTERS, auto_ack=True)
                if method is None:
                    return len(dead) == 4
                dead[props.message_id or json.loads(body)["body"]["command_id"]] = props.headers[topology.H_REJECT_REASON]

        wait_for(collect, 15, what="four dead letters")
    finally:
        conn.close()
    assert "not valid JSON" in dead["garbage"]
    assert "does not belong on this queue" in dead["wrong-kind"]
    assert "not a valid name" in dead["bad-node"]
    reused = [v for k, v in dead.items() if k not in bad]
    assert reused and "already used for WakeNode" in reused[0]
    assert h.switch.wakes == [] and h.switch.shutdowns == []


# ---------------------------------------------------------------- several instances on one queue


def test_instances_sharing_the_queue_do_a_duplicate_once_and_queue_the_opposite(broker, vhost, caplog):
    # One command in flight each (prefetch 1), so the next delivery goes to the other instance.
    h = Harness(broker, vhost, max_parallel=1)
    other_switch = FakeSwitch()
    other = PowerApp(power_config(max_parallel=1), broker=broker.settings("power", vhost), switch=other_switch).start()
    release = threading.Event()

    def boots_when_released(node: str) -> None:
        threading.Thread(target=lambda: (release.wait(20), h.agent.publish(NodeOnline(
            node=node, boot_id="b9", hypervisor_ok=True, hypervisor_type="test", domain_count=0)))).start()

    h.switch.on_wake = other_switch.on_wake = boots_when_released
    h.switch.on_shutdown = other_switch.on_shutdown = lambda node: h.agent.publish(
        NodeOffline(node=node, boot_id="b9", reason="SIGTERM"))
    apps = (h.app, other)
    try:
        wait_for(lambda: other.ready.is_set() and other.peers_ready.is_set() and h.app.peers_ready.is_set(), 15,
                 what="both instances ready")
        c1 = cid()
        h.arbiter.publish(WakeNode(command_id=c1, node="n1"))
        wait_for(lambda: any(app.peers.get(c1) for app in apps), 10, what="the peer saw 'accepted'")
        h.arbiter.publish(WakeNode(command_id=c1, node="n1"))  # the duplicate lands on the idle instance
        wait_for(lambda: any(f"{c1} for n1 is in progress on power@" in r.getMessage() for r in caplog.records),
                 10, what="the idle instance waiting for its peer")
        release.set()
        assert h.watcher.final(c1).status == "succeeded"
        wait_for(lambda: any(f"{c1}: power@" in r.getMessage() and "nothing to do here" in r.getMessage()
                             for r in caplog.records), 10, what="the waiting instance done")
        assert h.watcher.statuses(c1) == ["accepted", "succeeded"], "the waiting instance published nothing"
        assert len(h.switch.wakes) + len(other_switch.wakes) == 1

        release.clear()
        c2, c3 = cid(), cid()
        h.arbiter.publish(WakeNode(command_id=c2, node="n2"))
        wait_for(lambda: any(app.peers.busy("n2") for app in apps), 10, what="the peer saw the wake of n2")
        h.arbiter.publish(ShutdownNode(command_id=c3, node="n2", issued_by="arbiter"))
        wait_for(lambda: any(f"{c3}: n2 is waking (command {c2} on power@" in r.getMessage() for r in caplog.records),
                 10, what="the shutdown queued behind the peer's wake")
        assert h.watcher.of(c3) == []
        release.set()
        assert h.watcher.final(c2).status == "succeeded"
        h.node_says(telemetry("n2"))
        assert h.watcher.final(c3).status == "succeeded"
        assert len(h.switch.shutdowns) + len(other_switch.shutdowns) == 1
    finally:
        release.set()
        other.stop()
        h.close()


def test_commands_still_work_where_the_broker_refuses_the_peer_results_queue(broker, vhost):
    # A broker whose definitions predate the power role's read access to enersis.results.
    old_read = r"^(enersis\.(cmd\.power|telemetry)|amq\.gen-.*)$"
    role = topology.ROLES["power"]
    broker.api("PUT", f"permissions/{vhost}/power", {"configure": role["configure"], "write": role["write"],
                                                     "read": old_read})
    h = Harness(broker, vhost)
    try:
        h.switch.on_wake = lambda node: h.agent.publish(NodeOnline(node=node, boot_id="b2", hypervisor_ok=True,
                                                                   hypervisor_type="test", domain_count=0))
        c = cid()
        h.arbiter.publish(WakeNode(command_id=c, node="n1"))
        assert h.watcher.final(c).status == "succeeded"
        assert not h.app.peers_ready.is_set()
        wait_for(lambda: h.app.peer_consumer.stopped, 5, what="the refused peer subscription given up")
    finally:
        h.close()


def test_stopping_mid_wake_returns_promptly_and_the_command_is_finished_by_the_next_instance(broker, vhost):
    import time

    h = Harness(broker, vhost, wake_timeout_s=60)
    c = cid()
    h.arbiter.publish(WakeNode(command_id=c, node="n1"))
    wait_for(lambda: "accepted" in h.watcher.statuses(c), 10, what="accepted")
    t = time.monotonic()
    h.app.stop()
    assert time.monotonic() - t < 5, "stop must not sit out the 60 s wake"
    switch = FakeSwitch()
    switch.on_wake = lambda node: h.agent.publish(NodeOnline(node=node, boot_id="b5", hypervisor_ok=True,
                                                             hypervisor_type="test", domain_count=0))
    successor = PowerApp(power_config(), broker=broker.settings("power", vhost), switch=switch).start()
    try:
        r = h.watcher.final(c, timeout=30)
        assert r.status == "succeeded" and h.watcher.statuses(c) == ["accepted", "accepted", "succeeded"]
        assert switch.wakes == ["n1"]
    finally:
        successor.stop()
        h.close()


def test_a_peer_takes_over_at_once_when_the_holder_dies_mid_command(broker, vhost):
    h = Harness(broker, vhost, wake_timeout_s=60)
    other = PowerApp(power_config(wake_timeout_s=60), broker=broker.settings("power", vhost), switch=FakeSwitch()).start()
    switches = {h.app: h.switch, other: other.switch}
    calls: list[str] = []

    def first_boot_never_comes(node: str) -> None:
        calls.append(node)
        if len(calls) > 1:  # the taker's packets wake it
            h.agent.publish(NodeOnline(node=node, boot_id="b6", hypervisor_ok=True, hypervisor_type="test",
                                       domain_count=0))

    h.switch.on_wake = other.switch.on_wake = first_boot_never_comes
    try:
        wait_for(lambda: all(a.ready.is_set() and a.peers_ready.is_set() for a in switches), 15, what="both ready")
        c = cid()
        h.arbiter.publish(WakeNode(command_id=c, node="n1"))
        wait_for(lambda: "accepted" in h.watcher.statuses(c), 10, what="accepted")
        holder = next(a for a, sw in switches.items() if sw.wakes)
        taker = other if holder is h.app else h.app
        wait_for(lambda: taker.peers.get(c) is not None, 10, what="the taker saw 'accepted'")
        holder.stop()  # dies mid-wait: its delivery goes back to the queue, redelivered to the taker
        r = h.watcher.final(c, timeout=20)  # far less than the 60 s+ the taker would wait for a live holder
        assert r.status == "succeeded" and switches[taker].wakes == ["n1"]
        # Its own final settles the dead holder's entry: later commands for n1 wait for nobody.
        wait_for(lambda: taker.peers.busy("n1") is None, 10, what="the holder's wake settled")
    finally:
        other.stop()
        h.close()
