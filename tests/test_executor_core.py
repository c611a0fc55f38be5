"""The executor's pure decisions, its config and its journal (no broker, no hypervisor)."""

from __future__ import annotations

import os
import time

import pytest

from enersis.agent import migration
from enersis.agent.executor import ExecutorConfig
from enersis.agent.journal import FINAL, STARTED, Journal
from enersis.common.config import ConfigError
from enersis.common.messages import MigrateVm

CMD = MigrateVm(command_id="c-1", vm="vm-1", source="node-1", target="node-2", timeout_s=60)


@pytest.mark.parametrize(
    "here,on_target,status,words",
    [
        (True, False, None, ""),
        (True, None, None, ""),  # the VM is here: the target need not be asked
        (False, True, "skipped", "already runs on node-2"),
        (False, False, "rejected", "vm-1 is not running on node-1"),
        (False, None, "rejected", "could not be asked"),
    ],
)
def test_admit(here, on_target, status, words):
    verdict = migration.admit(CMD, "node-1", here=here, on_target=on_target)
    if status is None:
        assert isinstance(verdict, migration.Go)
    else:
        assert verdict.status == status and words in verdict.reason
        assert verdict.command_id == "c-1" and verdict.node == "node-1" and verdict.vm == "vm-1"
        verdict.validate()


def test_misaddressed_and_unknown_targets():
    assert migration.misaddressed(CMD, "node-1") is None
    wrong = migration.misaddressed(CMD, "node-3")
    assert wrong.status == "rejected" and "migrate.node-1" in wrong.reason
    assert migration.unknown_target(CMD, "node-1", frozenset({"node-2"})) is None
    unknown = migration.unknown_target(CMD, "node-1", frozenset({"node-3"}))
    assert unknown.status == "rejected" and "[peers.node-2]" in unknown.reason and "node-3" in unknown.reason


def test_outcome_results():
    ok = migration.outcome_result(CMD, "node-1", ok=True, duration_s=2.34567, downtime_ms=20.0, error="", retryable=False)
    assert ok.status == "succeeded" and ok.details == {"source": "node-1", "target": "node-2", "duration_s": 2.346,
                                                       "downtime_ms": 20.0}
    no_downtime = migration.outcome_result(CMD, "node-1", ok=True, duration_s=1, downtime_ms=None, error="", retryable=False)
    assert "downtime_ms" not in no_downtime.details  # details carry scalars only, never None
    bad = migration.outcome_result(CMD, "node-1", ok=False, duration_s=0.1, downtime_ms=None,
                                   error="libvirt: Failed to connect socket", retryable=True)
    assert bad.status == "failed" and bad.retryable and bad.reason == "libvirt: Failed to connect socket"
    for r in (ok, no_downtime, bad):
        r.validate()


@pytest.mark.parametrize(
    "job,here,on_target,elapsed,expect",
    [
        (True, True, None, 10, "wait"),
        (True, True, None, 61, "abort"),  # past the command's 60 s timeout
        (False, False, True, 5, "succeeded"),
        (False, True, False, 5, "failed-retryable"),
        (False, True, True, 5, "failed-operator"),
        (False, False, False, 5, "failed-operator"),
        (False, False, None, 5, "failed-operator"),
    ],
)
def test_recovered_result(job, here, on_target, elapsed, expect):
    v = migration.recovered_result(CMD, "node-1", job_active=job, here=here, on_target=on_target, elapsed_s=elapsed)
    if expect in ("wait", "abort"):
        assert isinstance(v, migration.Wait) and v.abort == (expect == "abort")
        return
    assert v.details["recovered"] is True
    if expect == "succeeded":
        assert v.status == "succeeded"
    elif expect == "failed-retryable":
        assert v.status == "failed" and v.retryable and "still runs on node-1" in v.reason
    else:
        assert v.status == "failed" and not v.retryable


def test_config_parse_and_errors():
    cfg = ExecutorConfig.parse({
        "executor": {"max_outgoing": 2, "state_dir": "/tmp/x", "peer2peer": False},
        "peers": {"node-2": {"uri": "qemu+ssh://node-2/system", "migration_uri": "tcp://10.0.0.2",
                             "listen_address": "10.0.0.2"}},
    }, node="node-1")
    assert cfg.max_outgoing == 2 and cfg.enabled and not cfg.peer2peer
    assert cfg.peers["node-2"].migration_uri == "tcp://10.0.0.2"
    assert ExecutorConfig.parse({}, node="node-1").max_outgoing == 1
    bad = [
        ({"executor": {"max_outgoing": 0}}, "max_outgoing"),
        ({"executor": {"maxoutgoing": 1}}, "unknown key(s) maxoutgoing"),
        ({"executor": {"enabled": "yes"}}, "enabled must be true or false"),
        ({"peers": {"node-2": {}}}, "uri (the target's libvirt URI) is required"),
        ({"peers": {"node-2": {"uri": "x", "port": 1}}}, "unknown key(s) port"),
        ({"peers": {"node-1": {"uri": "x"}}}, "not its own peer"),
    ]
    for data, words in bad:
        with pytest.raises(ConfigError, match=".*") as info:
            ExecutorConfig.parse(data, source="node.toml", node="node-1")
        assert words in str(info.value), (data, str(info.value))


def test_journal_survives_a_new_instance_and_prunes_old_finals(tmp_path):
    j = Journal(tmp_path)
    assert j.get("c-1") is None
    j.started(CMD, now_ms=1000)
    assert [r["command_id"] for r in Journal(tmp_path).unfinished()] == ["c-1"]
    res = migration.outcome_result(CMD, "node-1", ok=True, duration_s=2, downtime_ms=None, error="", retryable=False)
    j.final(CMD, res, now_ms=3000)
    rec = Journal(tmp_path).get("c-1")
    assert rec["state"] == FINAL and rec["started_ms"] == 1000
    assert Journal.result_of(rec) == res and Journal.command_of(rec) == CMD
    assert Journal(tmp_path).unfinished() == []
    # Odd ids are safe file names; a journal file of another id never answers for this one.
    odd = MigrateVm(command_id="../../etc/passwd x", vm="vm-1", source="node-1", target="node-2")
    j.started(odd, now_ms=1)
    assert j.get(odd.command_id)["state"] == STARTED
    assert all(p.parent == j.dir for p in j.dir.iterdir())
    old = time.time() - 10 * 86400
    for p in j.dir.iterdir():
        os.utime(p, (old, old))
    assert j.prune(7 * 86400) == 1  # only the final record; the started one is kept for recovery
    assert j.get("c-1") is None and j.get(odd.command_id) is not None
