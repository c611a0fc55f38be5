"""The migration executor against a real broker and the simulated hypervisor.

Real RabbitMQ (role users agent/operator, a vhost per test), the real
executor and consumer, the simulated cluster as Migrator (its migrations
finish by the clock, in another process too).  The same executor drives real
libvirt in tests/test_executor_qemu.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pika
import pytest

from enersis.agent.executor import ExecutorConfig, ExecutorService, MigrationExecutor
from enersis.agent.hypervisor import MigrationTarget
from enersis.agent.journal import Journal
from enersis.agent.simulated import SimulatedCluster, SimulatedHypervisor
from enersis.common import topology
from enersis.common.bus import Publisher
from enersis.common.codec import JSON, decode, encode, wrap
from enersis.common.messages import CommandResult, MigrateVm
from tests.conftest import REPO, wait_for

pytestmark = pytest.mark.broker


# ---------------------------------------------------------------- helpers (also used by test_executor_qemu.py)


class ResultWatcher:
    """An operator's private queue on enersis.results: every CommandResult, in order."""

    def __init__(self, broker: Any, vhost: str, key: str = "result.MigrateVm.#"):
        self.conn = pika.BlockingConnection(broker.settings("operator", vhost).pika_parameters())
        self.ch = self.conn.channel()
        self.queue = self.ch.queue_declare("", exclusive=True).method.queue
        self.ch.queue_bind(self.queue, topology.EX_RESULTS, routing_key=key)
        self.results: list[CommandResult] = []

    def poll(self) -> list[CommandResult]:
        while True:
            method, props, body = self.ch.basic_get(self.queue, auto_ack=True)
            if method is None:
                return self.results
            self.results.append(decode(body, props.content_type).message)

    def of(self, command_id: str) -> list[CommandResult]:
        return [r for r in self.poll() if r.command_id == command_id]

    def finals(self, command_id: str) -> list[CommandResult]:
        return [r for r in self.of(command_id) if r.final]

    def wait_final(self, command_id: str, timeout: float = 30.0, count: int = 1) -> list[CommandResult]:
        return wait_for(lambda: len(self.finals(command_id)) >= count and self.finals(command_id), timeout,
                        interval=0.05, what=f"{count} final result(s) of {command_id}")

    def close(self) -> None:
        if self.conn.is_open:
            self.conn.close()


def dead_letters(broker: Any, vhost: str) -> list[tuple[dict[str, Any], bytes]]:
    conn = pika.BlockingConnection(broker.settings("operator", vhost).pika_parameters())
    try:
        ch = conn.channel()
        out = []
        while True:
            method, props, body = ch.basic_get(topology.Q_DEAD_LETTERS, auto_ack=True)
            if method is None:
                return out
            out.append((dict(props.headers or {}), body))
    finally:
        conn.close()


def migrate(vm: str, source: str, target: str, **kw: Any) -> MigrateVm:
    return MigrateVm(command_id=kw.pop("command_id", f"test-{uuid.uuid4().hex[:12]}"), vm=vm, source=source,
                     target=target, **kw)


class RecordingMigrator:
    """Wraps a real Migrator and records how many migrations ran at once (a recorder, not a mock)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self._lock = threading.Lock()
        self.running = 0
        self.max_running = 0
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def migrate(self, vm: str, target: MigrationTarget, **kw: Any) -> Any:
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.calls.append(vm)
        try:
            return self.inner.migrate(vm, target, **kw)
        finally:
            with self._lock:
                self.running -= 1


class Executors:
    """Start executors in this process; stop them all at teardown."""

    def __init__(self, broker: Any, vhost: str):
        self.broker, self.vhost = broker, vhost
        self.started: list[tuple[ExecutorService, Publisher]] = []

    def start(self, node: str, migrator: Any, state_dir: Path, peers: dict[str, MigrationTarget],
              max_outgoing: int = 1) -> ExecutorService:
        settings = self.broker.settings("agent", self.vhost)
        pub = Publisher(settings, sender=f"agent.{node}")
        cfg = ExecutorConfig(max_outgoing=max_outgoing, state_dir=str(state_dir), peers=peers)
        svc = ExecutorService.build(node, settings, pub, migrator, cfg).start()
        wait_for(svc.consumer.ready.is_set, 20, what=f"executor of {node} consuming")
        self.started.append((svc, pub))
        return svc

    def stop(self, svc: ExecutorService) -> None:
        for entry in list(self.started):
            if entry[0] is svc:
                entry[0].stop()
                entry[1].close()
                self.started.remove(entry)

    def close(self) -> None:
        for svc, pub in self.started:
            svc.stop()
            pub.close()


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def cluster(tmp_path: Path) -> SimulatedCluster:
    trace = tmp_path / "flat"
    trace.write_text("30\n" * 288)
    # 256 MiB at 512 MiB/s: every migration takes about half a second.
    return SimulatedCluster.create(tmp_path / "cluster", nodes=["node-1", "node-2"], vms=4, traces=[str(trace)],
                                   vm_mem_mib=256, migration_mib_s=512.0, downtime_ms=25.0)


@pytest.fixture
def peers() -> dict[str, MigrationTarget]:
    return {"node-2": MigrationTarget("node-2", "sim:///unused")}


@pytest.fixture
def executors(broker: Any, vhost: str):
    ex = Executors(broker, vhost)
    yield ex
    ex.close()


@pytest.fixture
def watcher(broker: Any, vhost: str):
    w = ResultWatcher(broker, vhost)
    yield w
    w.close()


@pytest.fixture
def operator(broker: Any, vhost: str):
    pub = Publisher(broker.settings("operator", vhost), sender="operator.test")
    yield pub
    pub.close()


# ---------------------------------------------------------------- tests


def test_migration_accepted_then_succeeded_and_acked(broker, vhost, cluster, peers, executors, watcher, operator, tmp_path):
    # vm-1 and vm-3 start on node-1 (round robin).
    assert cluster.placement()["vm-1"] == "node-1"
    executors.start("node-1", SimulatedHypervisor(cluster, "node-1"), tmp_path / "state", peers)
    cmd = migrate("vm-1", "node-1", "node-2", reason="test")
    operator.publish(cmd, mandatory=True)
    watcher.wait_final(cmd.command_id)
    statuses = [r.status for r in watcher.of(cmd.command_id)]
    assert statuses == ["accepted", "succeeded"]
    done = watcher.finals(cmd.command_id)[0]
    assert done.node == "node-1" and done.vm == "vm-1" and done.command_kind == "MigrateVm"
    assert done.details["target"] == "node-2" and done.details["downtime_ms"] == 25.0
    assert 0.3 < done.details["duration_s"] < 10
    assert cluster.placement()["vm-1"] == "node-2"
    # Acked only after the final result: the queue is empty, nothing unacked.
    wait_for(lambda: broker.queue_depth(vhost, topology.migrate_queue("node-1")) == 0, 10, what="queue drained")


def test_duplicate_command_migrates_once_and_answers_the_same(broker, vhost, cluster, peers, executors, watcher,
                                                              operator, tmp_path):
    svc = executors.start("node-1", SimulatedHypervisor(cluster, "node-1"), tmp_path / "state", peers, max_outgoing=2)
    cmd = migrate("vm-1", "node-1", "node-2")
    operator.publish(cmd)
    operator.publish(cmd)  # arrives while the first is still migrating
    finals = watcher.wait_final(cmd.command_id, count=2)
    assert [r.status for r in finals] == ["succeeded", "succeeded"]
    assert finals[0] == finals[1]  # the same answer, field for field
    assert svc.executor.migrations_started == 1
    assert sum(1 for h in cluster.state()["history"] if h["event"] == "migration-started") == 1

    # A restarted executor (same journal) still knows the command: same answer, no work.
    executors.stop(svc)
    svc2 = executors.start("node-1", SimulatedHypervisor(cluster, "node-1"), tmp_path / "state", peers)
    operator.publish(cmd)
    finals = watcher.wait_final(cmd.command_id, count=3)
    assert finals[2] == finals[0]
    assert svc2.executor.migrations_started == 0
    assert sum(1 for h in cluster.state()["history"] if h["event"] == "migration-started") == 1


def test_skipped_and_rejected_with_reasons(broker, vhost, cluster, peers, executors, watcher, operator, tmp_path):
    executors.start("node-1", SimulatedHypervisor(cluster, "node-1"), tmp_path / "state", peers)
    on_target = migrate("vm-2", "node-1", "node-2")  # vm-2 already runs on node-2
    missing = migrate("vm-99", "node-1", "node-2")
    unknown = migrate("vm-1", "node-1", "node-7")
    for cmd in (on_target, missing, unknown):
        operator.publish(cmd)
    skipped = watcher.wait_final(on_target.command_id)[0]
    assert skipped.status == "skipped" and "already runs on node-2" in skipped.reason
    rejected = watcher.wait_final(missing.command_id)[0]
    assert rejected.status == "rejected" and "vm-99 is not running on node-1" in rejected.reason
    bad_target = watcher.wait_final(unknown.command_id)[0]
    assert bad_target.status == "rejected" and "node-7 is not a known peer" in bad_target.reason
    assert all(len(watcher.of(c.command_id)) == 1 for c in (on_target, missing, unknown))  # no "accepted"

    # A command published by hand into node-1's queue but naming node-2 as its source.
    wrong = migrate("vm-2", "node-2", "node-1")
    env = wrap(wrong, "operator.test")
    operator.publish_raw(topology.EX_COMMANDS, "migrate.node-1", encode(env, JSON),
                         pika.BasicProperties(content_type=JSON, delivery_mode=2))
    res = watcher.wait_final(wrong.command_id)[0]
    assert res.status == "rejected" and "routing key migrate.node-2" in res.reason
    assert cluster.placement()["vm-2"] == "node-2"


def test_malformed_commands_are_dead_lettered_with_the_reason(broker, vhost, cluster, peers, executors, operator,
                                                              tmp_path):
    executors.start("node-1", SimulatedHypervisor(cluster, "node-1"), tmp_path / "state", peers)
    props = pika.BasicProperties(content_type=JSON, delivery_mode=2)
    bodies = {
        "garbage": b"{not json",
        "same source and target": json.dumps({
            "kind": "MigrateVm", "version": "1.0", "id": "m-1", "ts_ms": int(time.time() * 1000),
            "sender": "op", "body": {"command_id": "c-1", "vm": "vm-1", "source": "node-1", "target": "node-1"},
        }).encode(),
        "wrong kind": encode(wrap(CommandResult("c-2", "MigrateVm", "succeeded"), "op"), JSON),
    }
    for body in bodies.values():
        operator.publish_raw(topology.EX_COMMANDS, "migrate.node-1", body, props)
    letters = wait_for(lambda: (lambda got: len(got) >= 3 and got)(_collect(broker, vhost)), 15,
                       what="three dead letters")
    reasons = [h[topology.H_REJECT_REASON] for h, _ in letters]
    assert any("JSON" in r or "json" in r for r in reasons), reasons
    assert any("source and target are both" in r for r in reasons), reasons
    assert any("does not belong on this queue" in r for r in reasons), reasons
    assert all(h[topology.H_ORIGINAL_QUEUE] == topology.migrate_queue("node-1") for h, _ in letters)
    assert cluster.placement()["vm-1"] == "node-1"  # nothing moved


_LETTERS: list = []


def _collect(broker: Any, vhost: str) -> list:
    _LETTERS.extend(dead_letters(broker, vhost))
    return list(_LETTERS)


@pytest.fixture(autouse=True)
def _reset_letters():
    _LETTERS.clear()
    yield


def test_at_most_max_outgoing_at_once(broker, vhost, cluster, peers, executors, watcher, operator, tmp_path):
    recorder = RecordingMigrator(SimulatedHypervisor(cluster, "node-1"))
    executors.start("node-1", recorder, tmp_path / "state", peers, max_outgoing=1)
    cmds = [migrate("vm-1", "node-1", "node-2"), migrate("vm-3", "node-1", "node-2")]
    for cmd in cmds:
        operator.publish(cmd)
    for cmd in cmds:
        assert watcher.wait_final(cmd.command_id)[0].status == "succeeded"
    assert sorted(recorder.calls) == ["vm-1", "vm-3"]
    assert recorder.max_running == 1


def test_two_commands_for_one_vm_run_one_after_the_other(broker, vhost, cluster, peers, executors, watcher, operator,
                                                         tmp_path):
    recorder = RecordingMigrator(SimulatedHypervisor(cluster, "node-1"))
    executors.start("node-1", recorder, tmp_path / "state", peers, max_outgoing=2)
    first, second = migrate("vm-1", "node-1", "node-2"), migrate("vm-1", "node-1", "node-2")
    operator.publish(first)
    operator.publish(second)
    results = {c.command_id: watcher.wait_final(c.command_id)[0].status for c in (first, second)}
    assert sorted(results.values()) == ["skipped", "succeeded"]
    assert recorder.calls == ["vm-1"]


def test_timeout_aborts_and_vm_stays_on_source(broker, vhost, cluster, peers, executors, watcher, operator, tmp_path):
    executors.start("node-1", SimulatedHypervisor(cluster, "node-1"), tmp_path / "state", peers)
    cmd = migrate("vm-1", "node-1", "node-2", timeout_s=0.1)
    operator.publish(cmd)
    res = watcher.wait_final(cmd.command_id)[0]
    assert res.status == "failed" and res.retryable and "timed out" in res.reason
    assert cluster.placement()["vm-1"] == "node-1"


def test_target_down_fails_with_reason(broker, vhost, cluster, peers, executors, watcher, operator, tmp_path):
    cluster.set_reachable("node-2", False)
    executors.start("node-1", SimulatedHypervisor(cluster, "node-1"), tmp_path / "state", peers)
    cmd = migrate("vm-1", "node-1", "node-2")
    operator.publish(cmd)
    statuses = [r.status for r in (watcher.wait_final(cmd.command_id) and watcher.of(cmd.command_id))]
    res = watcher.finals(cmd.command_id)[0]
    assert statuses == ["accepted", "failed"]
    assert res.retryable and "node-2" in res.reason and "unreachable" in res.reason
    assert cluster.placement()["vm-1"] == "node-1"


def test_recovery_publishes_the_true_result_of_unfinished_commands(broker, vhost, cluster, peers, watcher, tmp_path):
    """Journal says "started", nobody reported: a new executor asks the hypervisor and answers truthfully."""
    state = tmp_path / "state"
    journal = Journal(state / "node-1")  # the executor keeps one journal folder per node
    hv = SimulatedHypervisor(cluster, "node-1")
    moved = migrate("vm-1", "node-1", "node-2")
    stayed = migrate("vm-3", "node-1", "node-2")
    journal.started(moved, now_ms=int(time.time() * 1000))
    journal.started(stayed, now_ms=int(time.time() * 1000))
    hv.migrate("vm-1", peers["node-2"], timeout_s=30)  # finished while "the executor was dead"
    pub = Publisher(broker.settings("agent", vhost), sender="agent.node-1")
    try:
        ex = MigrationExecutor("node-1", hv, pub, ExecutorConfig(state_dir=str(state), peers=peers))
        results = {r.command_id: r for r in ex.recover()}
    finally:
        pub.close()
    assert results[moved.command_id].status == "succeeded" and results[moved.command_id].details["recovered"]
    assert results[stayed.command_id].status == "failed" and results[stayed.command_id].retryable
    assert "still runs on node-1" in results[stayed.command_id].reason
    published = watcher.wait_final(moved.command_id)[0]
    assert (published.status, published.reason) == (results[moved.command_id].status, results[moved.command_id].reason)
    assert published.details == pytest.approx(results[moved.command_id].details)  # msgpack floats are 32-bit
    assert journal.unfinished() == []


def write_node_toml(path: Path, broker: Any, vhost: str, node: str, uri: str, state_dir: Path,
                    peers: dict[str, dict[str, str]]) -> Path:
    lines = [
        f'node = "{node}"',
        "[broker]",
        f'url = "amqp://127.0.0.1:{broker.amqp_port}/{vhost}"',
        'user = "agent"',
        'password_env = "ENERSIS_TEST_AGENT_PASSWORD"',
        "[hypervisor]",
        f'uri = "{uri}"',
        "[telemetry]",
        "sample_interval_s = 0.5",
        "publish_interval_s = 1.0",
        "window_s = 2.0",
        "[executor]",
        f'state_dir = "{state_dir}"',
    ]
    for name, peer in peers.items():
        lines.append(f"[peers.{name}]")
        lines += [f'{k} = "{v}"' for k, v in peer.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def agent_process(config: Path, broker: Any, log: Path) -> subprocess.Popen:
    """`enersis agent --config …` as a real subprocess (telemetry + executor)."""
    env = {k: v for k, v in os.environ.items() if k != "ENERSIS_AMQP_URL"}
    env["ENERSIS_TEST_AGENT_PASSWORD"] = broker.passwords["agent"]
    enersis = Path(sys.executable).parent / "enersis"
    fh = open(log, "ab")
    return subprocess.Popen([str(enersis), "agent", "--config", str(config)], stdout=fh, stderr=subprocess.STDOUT,
                            env=env, cwd=str(REPO))


def test_agent_killed_mid_migration_reports_after_restart(broker, vhost, tmp_path, watcher, operator):
    """kill -9 of `enersis agent` while a (simulated) migration runs; the restarted agent reports it."""
    trace = tmp_path / "flat"
    trace.write_text("30\n" * 288)
    # 512 MiB at 256 MiB/s: 2 s, long enough to kill the agent in the middle.
    cluster = SimulatedCluster.create(tmp_path / "cluster", nodes=["node-1", "node-2"], vms=2, traces=[str(trace)],
                                      vm_mem_mib=512, migration_mib_s=256.0)
    config = write_node_toml(tmp_path / "node-1.toml", broker, vhost, "node-1", f"sim://{cluster.path}",
                             tmp_path / "state", {"node-2": {"uri": "sim:///unused"}})
    proc = agent_process(config, broker, tmp_path / "agent.log")
    try:
        cmd = migrate("vm-1", "node-1", "node-2")
        wait_for(lambda: _queue_exists(broker, vhost), 30, interval=0.2, what="the agent consuming its migrate queue")
        operator.publish(cmd, mandatory=True)
        wait_for(lambda: [r for r in watcher.of(cmd.command_id) if r.status == "accepted"], 30, what="accepted")
        # Kill only once the migration runs: that is "mid-migration", not before it began.
        wait_for(lambda: cluster.state()["vms"]["vm-1"]["migration"] is not None, 10, interval=0.01,
                 what="the migration in flight")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert watcher.finals(cmd.command_id) == []  # it died before reporting
        assert cluster.state()["vms"]["vm-1"]["migration"] is not None  # still in flight
        proc = agent_process(config, broker, tmp_path / "agent.log")
        res = watcher.wait_final(cmd.command_id, timeout=60)[0]
        assert res.status == "succeeded" and res.details.get("recovered") is True
        assert cluster.placement()["vm-1"] == "node-2"
        # The unacked command was redelivered to the new process and acked after its (same) answer.
        wait_for(lambda: broker.queue_depth(vhost, topology.migrate_queue("node-1")) == 0, 20, what="acked")
        assert all(r == res for r in watcher.finals(cmd.command_id))
        assert sum(1 for h in cluster.state()["history"] if h["event"] == "migration-started") == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _queue_exists(broker: Any, vhost: str) -> bool:
    try:
        q = broker.api("GET", f"queues/{vhost}/{topology.migrate_queue('node-1')}")
    except Exception:
        return False
    return bool(q.get("consumers"))


def test_simulated_nodes_need_no_peers_table(broker, vhost, cluster, watcher, operator, tmp_path):
    from enersis.agent.executor import start_executor

    pub = Publisher(broker.settings("agent", vhost), sender="agent.node-1")
    svc = start_executor("node-1", f"sim://{cluster.path}", broker.settings("agent", vhost), pub,
                         {"executor": {"state_dir": str(tmp_path / "state")}})
    try:
        assert set(svc.executor.config.peers) == {"node-2"}
        wait_for(svc.consumer.ready.is_set, 20, what="executor consuming")
        cmd = migrate("vm-1", "node-1", "node-2")
        operator.publish(cmd)
        assert watcher.wait_final(cmd.command_id)[0].status == "succeeded"
        assert cluster.placement()["vm-1"] == "node-2"
    finally:
        svc.stop()
        pub.close()
