"""Real live migration through the bus: libvirt daemons of the lab, QEMU guests, the real broker.

The session fixture `libvirt_lab` (tests/conftest.py) brings two libvirt
daemons up (deploy/lab/libvirt_lab.py) and down again.  Each test starts its
own tiny guest (64 MiB, a busy loop that writes to COM1) and removes it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from enersis.agent.hypervisor import MigrationTarget
from enersis.agent.libvirt_migrator import LibvirtMigrator
from enersis.common import topology
from tests.conftest import wait_for
from tests.test_executor_sim import (  # helpers and fixtures, not tests
    agent_process,
    executors,  # noqa: F401  (fixture)
    migrate,
    operator,  # noqa: F401  (fixture)
    watcher,  # noqa: F401  (fixture)
    write_node_toml,
)

pytestmark = [pytest.mark.qemu, pytest.mark.broker]

A, B = "node-a", "node-b"


def targets(lab: Any) -> dict[str, MigrationTarget]:
    return {name: MigrationTarget(name, rec["uri"], rec["migration_uri"], rec["listen_address"])
            for name, rec in lab.info()["nodes"].items()}


def where(lab: Any, name: str) -> dict[str, str]:
    """{node: state} of every lab node that has `name` defined or running."""
    out = {}
    for node in lab.nodes()[:2]:
        if lab.node_up(node):
            state = lab.domains(node).get(name)
            if state is not None:
                out[node] = state
    return out


def serial_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def assert_still_executing(serial: Path) -> None:
    before = serial_size(serial)
    wait_for(lambda: serial_size(serial) > before + 5, 15, interval=0.1, what=f"{serial.name} to keep growing")


@pytest.fixture
def guest(libvirt_lab: Any, tmp_path: Path):
    """A busy guest on node-a writing to a serial file; destroyed and undefined afterwards, wherever it is."""
    name = f"g-{uuid.uuid4().hex[:8]}"
    serial = tmp_path / f"{name}.serial"
    libvirt_lab.guest(A, name, "busy", str(serial))
    wait_for(lambda: serial_size(serial) > 0, 15, interval=0.1, what="the guest's first serial output")
    yield name, serial
    for node in libvirt_lab.nodes()[:2]:
        if libvirt_lab.node_up(node):
            libvirt_lab.virsh(node, "destroy", name, check=False)
            libvirt_lab.virsh(node, "undefine", name, check=False)


def test_busy_guest_migrates_a_to_b_once_per_command_id(libvirt_lab, guest, executors, watcher, operator, tmp_path):
    name, serial = guest
    peers = {B: targets(libvirt_lab)[B]}
    svc = executors.start(A, LibvirtMigrator(libvirt_lab.uri(A)), tmp_path / "state", peers, max_outgoing=2)
    # A bandwidth cap and auto-converge reach libvirt as VIR_MIGRATE_PARAM_BANDWIDTH / VIR_MIGRATE_AUTO_CONVERGE.
    cmd = migrate(name, A, B, reason="test", bandwidth_mib_s=200, auto_converge=True)
    operator.publish(cmd, mandatory=True)
    operator.publish(cmd)  # the duplicate arrives while the migration runs
    finals = watcher.wait_final(cmd.command_id, timeout=60, count=2)
    statuses = [r.status for r in watcher.of(cmd.command_id)]
    assert statuses == ["accepted", "succeeded", "succeeded"], statuses
    assert finals[0] == finals[1]
    res = finals[0]
    assert 0 < res.details["duration_s"] < 30
    assert res.details.get("downtime_ms") is not None and res.details["downtime_ms"] < 5000
    assert svc.executor.migrations_started == 1
    # Runs on B only (persisted there, undefined on A) and keeps executing.
    assert where(libvirt_lab, name) == {B: "running"}
    assert_still_executing(serial)


def test_migration_to_a_dead_daemon_fails_and_guest_stays_on_a(libvirt_lab, guest, executors, watcher, operator,
                                                                tmp_path):
    name, serial = guest
    peers = {B: targets(libvirt_lab)[B]}
    executors.start(A, LibvirtMigrator(libvirt_lab.uri(A)), tmp_path / "state", peers)
    libvirt_lab.stop_node(B)  # node-b's libvirtd is gone (its guests, if any, keep running)
    try:
        assert not libvirt_lab.node_up(B)
        cmd = migrate(name, A, B)
        operator.publish(cmd)
        res = watcher.wait_final(cmd.command_id, timeout=60)[0]
    finally:
        libvirt_lab.start_node(B)
    assert [r.status for r in watcher.of(cmd.command_id)] == ["accepted", "failed"]
    assert res.retryable and "libvirt" in res.reason and "libvirt-sock" in res.reason, res.reason
    assert where(libvirt_lab, name) == {A: "running"}
    assert_still_executing(serial)


def test_agent_killed_mid_migration_publishes_the_true_result(libvirt_lab, guest, broker, vhost, watcher, operator,
                                                             tmp_path):
    """kill -9 of `enersis agent` right after "accepted"; libvirt (peer-to-peer) finishes the job; the restarted
    agent finds it and reports it."""
    name, serial = guest
    info = libvirt_lab.info()["nodes"]
    peer = {k: info[B][k] for k in ("uri", "migration_uri", "listen_address")}
    config = write_node_toml(tmp_path / "node-a.toml", broker, vhost, A, info[A]["uri"], tmp_path / "state", {B: peer})
    proc = agent_process(config, broker, tmp_path / "agent.log")
    try:
        wait_for(lambda: _queue_exists_for(broker, vhost, A), 30, interval=0.2, what="node-a's agent consuming")
        cmd = migrate(name, A, B)
        operator.publish(cmd, mandatory=True)
        wait_for(lambda: [r for r in watcher.of(cmd.command_id) if r.status == "accepted"], 30, interval=0.02,
                 what="accepted")
        # Kill only once libvirt runs the job: that is "mid-migration", not before it began.
        probe = LibvirtMigrator(info[A]["uri"])
        wait_for(lambda: probe.job_active(name), 10, interval=0.01, what="the migration job on node-a")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        killed_at = time.monotonic()
        assert watcher.finals(cmd.command_id) == []
        probe.close()
        proc = agent_process(config, broker, tmp_path / "agent.log")
        res = watcher.wait_final(cmd.command_id, timeout=90)[0]
        assert res.status == "succeeded", res.reason
        assert res.details.get("recovered") is True
        assert where(libvirt_lab, name) == {B: "running"}
        assert_still_executing(serial)
        wait_for(lambda: broker.queue_depth(vhost, topology.migrate_queue(A)) == 0, 30, what="the command acked")
        assert all(r == res for r in watcher.finals(cmd.command_id))
        assert time.monotonic() - killed_at < 90
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _queue_exists_for(broker: Any, vhost: str, node: str) -> bool:
    try:
        q = broker.api("GET", f"queues/{vhost}/{topology.migrate_queue(node)}")
    except Exception:
        return False
    return bool(q.get("consumers"))


def test_guest_not_on_a_is_rejected_and_vm_on_target_is_skipped(libvirt_lab, guest, executors, watcher, operator,
                                                                 tmp_path):
    name, _serial = guest
    peers = {B: targets(libvirt_lab)[B]}
    executors.start(B, LibvirtMigrator(libvirt_lab.uri(B)), tmp_path / "state-b", {A: targets(libvirt_lab)[A]})
    executors.start(A, LibvirtMigrator(libvirt_lab.uri(A)), tmp_path / "state-a", peers)
    wrong_source = migrate(name, B, A)  # the guest is on A, not on B... and A is its target
    operator.publish(wrong_source)
    res = watcher.wait_final(wrong_source.command_id, timeout=30)[0]
    assert res.status == "skipped" and f"already runs on {A}" in res.reason
    missing = migrate("no-such-guest", A, B)
    operator.publish(missing)
    res = watcher.wait_final(missing.command_id, timeout=30)[0]
    assert res.status == "rejected" and "no-such-guest is not running on node-a" in res.reason
    assert where(libvirt_lab, name) == {A: "running"}


def test_timeout_aborts_the_job_and_guest_keeps_running_on_a(libvirt_lab, guest, executors, watcher, operator,
                                                             tmp_path):
    name, serial = guest
    executors.start(A, LibvirtMigrator(libvirt_lab.uri(A)), tmp_path / "state", {B: targets(libvirt_lab)[B]})
    cmd = migrate(name, A, B, timeout_s=0.2)
    operator.publish(cmd)
    res = watcher.wait_final(cmd.command_id, timeout=60)[0]
    assert res.status == "failed" and res.retryable and "timed out after 0.2s" in res.reason, res.reason
    assert where(libvirt_lab, name) == {A: "running"}
    assert_still_executing(serial)
