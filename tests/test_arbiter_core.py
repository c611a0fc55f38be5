"""The arbiter's state, planner, tracking and operator commands, with a fake bus and a fake clock."""

from __future__ import annotations

from dataclasses import replace

import pytest

from enersis.arbiter.config import CommandSettings
from enersis.arbiter.policy import Params
from enersis.arbiter.service import Arbiter
from enersis.arbiter.store import StateFile
from enersis.common.messages import (
    ApproveRecommendation,
    CommandResult,
    DrainNode,
    NodeOnline,
    PauseAutomation,
    PinVm,
    ResumeAutomation,
    SetMode,
    SetThresholds,
    UndrainNode,
)

from .test_arbiter_fakes import FakeBus, FakeClock, Ids, config, domain, telemetry


def make(tmp_path=None, **kw):
    clock = FakeClock()
    bus = FakeBus()
    store = StateFile(tmp_path / "state.json") if tmp_path is not None else None
    arb = Arbiter(config(**kw), bus, clock=clock, new_id=Ids(), store=store)
    return arb, bus, clock


def ms(clock) -> int:
    return int(clock() * 1000)


def feed(arb, clock, node, pct, doms, **kw):
    arb.on_telemetry(telemetry(node, pct, doms, **kw), ms(clock))


def result(cmd, status, reason="", **kw):
    node = getattr(cmd, "source", None) or getattr(cmd, "node", "")
    details = {"source": cmd.source, "target": cmd.target} if cmd.KIND == "MigrateVm" else {}
    return CommandResult(command_id=cmd.command_id, command_kind=cmd.KIND, status=status, reason=reason,
                         node=node, vm=getattr(cmd, "vm", ""), details=details, **kw)


def overloaded_cluster(arb, clock):
    # a: 90 % with three VMs; b: 20 %; capacity 4000 MHz each.
    feed(arb, clock, "a", 90, [domain("v1", 50), domain("v2", 30), domain("v3", 10)])
    feed(arb, clock, "b", 20, [domain("w1", 20)])


def test_overload_is_acted_on_at_once_and_not_reissued():
    arb, bus, clock = make()
    feed(arb, clock, "b", 20, [domain("w1", 20)])
    feed(arb, clock, "a", 50, [domain("v1", 30), domain("v2", 15), domain("v3", 5)])
    arb.trigger.clear()
    feed(arb, clock, "a", 60, [domain("v1", 35), domain("v2", 20), domain("v3", 5)], seq=2)
    assert not arb.trigger.is_set()  # nothing crossed a threshold
    feed(arb, clock, "a", 90, [domain("v1", 50), domain("v2", 30), domain("v3", 10)], seq=3)
    assert arb.trigger.is_set()  # no waiting for the cycle
    arb.step()
    [m] = bus.of("MigrateVm")
    assert (m.vm, m.source, m.target) == ("v2", "a", "b")
    assert m.command_id and m.timeout_s > 0 and m.issued_by == "arbiter"
    # The same overload reported again: the command is in flight, nothing new.
    feed(arb, clock, "a", 90, [domain("v1", 50), domain("v2", 30), domain("v3", 10)], seq=4)
    arb.step(full=True)
    assert len(bus.of("MigrateVm")) == 1


def test_success_moves_the_vm_and_an_older_report_does_not_bring_it_back():
    arb, bus, clock = make()
    overloaded_cluster(arb, clock)
    old_ts = ms(clock)
    arb.step()
    [m] = bus.of("MigrateVm")
    clock.advance(2)
    arb.on_result(result(m, "accepted"), ms(clock))
    arb.on_result(result(m, "succeeded"), ms(clock))
    assert arb.state.vm_location("v2") == "b"
    # A report from a sampled before the migration finished still lists v2: ignored for v2.
    arb.on_telemetry(telemetry("a", 60, [domain("v1", 50), domain("v2", 30), domain("v3", 10)], seq=2), old_ts + 1)
    assert arb.state.vm_location("v2") == "b"
    assert not arb.log.records


def test_failures_are_retried_a_bounded_number_of_times():
    arb, bus, clock = make(commands=CommandSettings(max_retries=2, retry_hold_s=600, retry_backoff_s=10))
    feed(arb, clock, "a", 90, [domain("v1", 50), domain("v2", 40)])
    feed(arb, clock, "b", 20, [domain("w1", 20)])
    for attempt in range(2):
        arb.step(full=True)
        m = bus.of("MigrateVm")[-1]
        arb.on_result(result(m, "failed", "target refused", retryable=True), ms(clock))
        arb.step(full=True)
        assert len(bus.of("MigrateVm")) == attempt + 1  # no retry at once: the view may be stale
        clock.advance(10 * 2 ** attempt + 1)  # past the doubling backoff
        feed(arb, clock, "a", 90, [domain("v1", 50), domain("v2", 40)], seq=attempt + 2)
        feed(arb, clock, "b", 20, [domain("w1", 20)], seq=attempt + 2)
    arb.step(full=True)
    assert [m.vm for m in bus.of("MigrateVm")] == ["v2", "v2"]  # then held: v1, the most loaded, stays (2012 rule)
    assert arb.log.held("v2", clock())
    clock.advance(601)
    feed(arb, clock, "a", 90, [domain("v1", 50), domain("v2", 40)], seq=9)
    feed(arb, clock, "b", 20, [domain("w1", 20)], seq=9)
    arb.step(full=True)
    assert len(bus.of("MigrateVm")) == 3


def test_unroutable_migrate_is_a_failure_not_a_lost_command():
    arb, bus, clock = make()
    bus.unroutable_sources.add("a")
    overloaded_cluster(arb, clock)
    arb.step()
    assert bus.of("MigrateVm") == [] and not arb.log.records
    assert arb.log.failures["v2"].count == 1


def test_underloaded_node_is_emptied_then_shut_down_only_on_fresh_evidence():
    arb, bus, clock = make()
    feed(arb, clock, "a", 5, [domain("v1", 3), domain("v2", 2)])
    feed(arb, clock, "b", 50, [domain("w1", 50)])
    arb.step()
    migs = bus.of("MigrateVm")
    assert sorted(m.vm for m in migs) == ["v1", "v2"]
    assert bus.of("ShutdownNode") == []
    clock.advance(1)
    for m in migs:
        arb.on_result(result(m, "succeeded"), ms(clock))
    # The state says a is empty, but no report from a confirms it yet: no shutdown.
    arb.step(full=True)
    assert bus.of("ShutdownNode") == []
    clock.advance(1)
    feed(arb, clock, "a", 0, [], seq=2)
    feed(arb, clock, "b", 55, [domain("w1", 50), domain("v1", 3), domain("v2", 2)], seq=2)
    arb.step(full=True)
    [s] = bus.of("ShutdownNode")
    assert s.node == "a" and not s.force
    assert arb.state.nodes["a"].power == "shutting_down"
    arb.on_result(result(s, "succeeded"), ms(clock))
    assert arb.state.nodes["a"].power == "off"


def test_stale_node_is_never_a_target_nor_shut_down():
    arb, bus, clock = make()
    feed(arb, clock, "idle", 0, [])
    clock.advance(16)  # > 3 publish intervals of 5 s
    feed(arb, clock, "a", 90, [domain("v1", 50), domain("v2", 30)])
    arb.step(full=True)
    assert bus.sent == []
    assert arb.state.nodes["idle"].view_state(clock(), 3) == "stale"


def test_wake_then_wait_for_online_then_migrate_and_quarantine_on_failure():
    arb, bus, clock = make(commands=CommandSettings(wake_timeout_s=60), unknown_grace_s=5)
    arb.state.configure_node("spare", clock())
    arb.state.configure_node("spare2", clock())
    feed(arb, clock, "a", 95, [domain("v1", 50), domain("v2", 45)])
    clock.advance(6)  # spares never reported: assumed off
    feed(arb, clock, "a", 95, [domain("v1", 50), domain("v2", 45)], seq=2)
    arb.step(full=True)
    [w] = bus.of("WakeNode")
    assert w.node == "spare" and bus.of("MigrateVm") == []
    assert arb.state.nodes["spare"].power == "waking"
    arb.step(full=True)
    assert len(bus.of("WakeNode")) == 1  # one at a time, no migrate to a waking node
    arb.on_online(NodeOnline(node="spare", boot_id="b", hypervisor_ok=True, hypervisor_type="QEMU", domain_count=0))
    feed(arb, clock, "spare", 1, [])
    arb.on_result(result(w, "succeeded"), ms(clock))
    arb.step()
    [m] = bus.of("MigrateVm")
    assert (m.vm, m.target) == ("v2", "spare")
    # Now a wake that fails: spare2 is quarantined, never woken again by the policy.
    bus.clear()
    arb2, bus2, clock2 = make(commands=CommandSettings(wake_timeout_s=60), unknown_grace_s=0)
    arb2.state.configure_node("spare2", clock2())
    feed(arb2, clock2, "a", 95, [domain("v1", 50), domain("v2", 45)])
    arb2.step(full=True)
    [w2] = bus2.of("WakeNode")
    clock2.advance(61)
    arb2.step(full=True)  # deadline passed, no result
    assert arb2.state.nodes["spare2"].power == "quarantined"
    assert len(bus2.of("WakeNode")) == 1


def test_operator_pause_resume_thresholds_and_replay():
    arb, bus, clock = make()
    [r] = arb.on_operator(PauseAutomation(command_id="op-1", reason="maintenance"))
    assert r.status == "succeeded" and r.command_kind == "PauseAutomation"
    overloaded_cluster(arb, clock)
    arb.step()
    assert bus.of("MigrateVm") == []
    [r] = arb.on_operator(SetThresholds(command_id="op-2", upper_pct=95, lower_pct=5))
    assert r.status == "succeeded" and arb.params.upper_pct == 95
    arb.on_operator(ResumeAutomation(command_id="op-3"))
    arb.step()
    assert bus.of("MigrateVm") == []  # 90 % is no longer an overload
    # Replaying op-2 answers the same and changes nothing.
    arb.on_operator(SetThresholds(command_id="op-4", upper_pct=80, lower_pct=10))
    [again] = arb.on_operator(SetThresholds(command_id="op-2", upper_pct=95, lower_pct=5))
    assert again.status == "succeeded" and arb.params.upper_pct == 80
    arb.step()
    assert len(bus.of("MigrateVm")) == 1


def test_advisory_mode_recommends_and_approval_executes_once():
    arb, bus, clock = make()
    arb.on_operator(SetMode(command_id="op-1", mode="advisory"))
    overloaded_cluster(arb, clock)
    arb.step()
    arb.step(full=True)
    assert bus.of("MigrateVm") == []
    [rec] = bus.of("Recommendation")  # not repeated every cycle
    assert rec.command_kind == "MigrateVm" and rec.command["vm"] == "v2"
    [ok] = arb.on_operator(ApproveRecommendation(command_id="op-2", recommendation_id=rec.recommendation_id))
    assert ok.status == "succeeded"
    [m] = bus.of("MigrateVm")
    assert m.command_id == ok.details["command_id"]
    [again] = arb.on_operator(ApproveRecommendation(command_id="op-3", recommendation_id=rec.recommendation_id))
    assert again.status == "rejected"
    assert len(bus.of("MigrateVm")) == 1


def test_approval_is_rechecked_against_the_current_state():
    arb, bus, clock = make()
    arb.on_operator(SetMode(command_id="op-1", mode="advisory"))
    overloaded_cluster(arb, clock)
    arb.step()
    [rec] = bus.of("Recommendation")
    clock.advance(16)  # b goes stale
    feed(arb, clock, "a", 90, [domain("v1", 50), domain("v2", 30), domain("v3", 10)], seq=2)
    [r] = arb.on_operator(ApproveRecommendation(command_id="op-2", recommendation_id=rec.recommendation_id))
    assert r.status == "rejected" and "stale" in r.reason
    assert bus.of("MigrateVm") == []


def test_drain_with_power_off_evacuates_then_powers_off_then_reports():
    arb, bus, clock = make()
    feed(arb, clock, "d", 40, [domain("v1", 20), domain("v2", 20)])
    feed(arb, clock, "b", 30, [domain("w1", 30)])
    [acc] = arb.on_operator(DrainNode(command_id="drain-1", node="d", power_off=True))
    assert acc.status == "accepted"
    arb.step()
    migs = bus.of("MigrateVm")
    assert sorted(m.vm for m in migs) == ["v1", "v2"] and all(m.target == "b" for m in migs)
    clock.advance(1)
    for m in migs:
        arb.on_result(result(m, "succeeded"), ms(clock))
    clock.advance(1)
    feed(arb, clock, "d", 0, [], seq=2)
    arb.step(full=True)
    [s] = bus.of("ShutdownNode")
    assert s.node == "d"
    arb.on_result(result(s, "succeeded"), ms(clock))
    arb.step(full=True)
    finals = [m for m in bus.of("CommandResult") if m.command_id == "drain-1" and m.status != "accepted"]
    assert [f.status for f in finals] == ["succeeded"]
    # Drained and off: never woken by the policy, until undrained.
    assert arb.state.nodes["d"].view_state(clock(), 3) == "quarantined"
    arb.on_operator(UndrainNode(command_id="undrain-1", node="d"))
    assert arb.state.nodes["d"].view_state(clock(), 3) == "off"


def test_pinned_vm_is_not_moved():
    arb, bus, clock = make()
    arb.on_operator(PinVm(command_id="p1", vm="v2"))
    overloaded_cluster(arb, clock)
    arb.step()
    assert [m.vm for m in bus.of("MigrateVm")] == ["v3"]  # the next candidate after the most loaded


def test_operator_migration_by_hand_is_not_fought():
    arb, bus, clock = make()
    feed(arb, clock, "a", 50, [domain("v1", 30), domain("v2", 20)])
    feed(arb, clock, "b", 50, [domain("w1", 50)])
    # An operator moved w1 by hand to a; the executor's results are all the arbiter sees.
    hand = CommandResult(command_id="by-hand-1", command_kind="MigrateVm", status="accepted", node="b", vm="w1",
                         details={"source": "b", "target": "a"})
    arb.on_result(hand, ms(clock))
    assert arb.log.for_vm("w1") is not None and not arb.log.for_vm("w1").ours
    arb.on_result(replace(hand, status="succeeded"), ms(clock))
    clock.advance(1)
    feed(arb, clock, "a", 100, [domain("v1", 30), domain("v2", 20), domain("w1", 50)], seq=2)
    feed(arb, clock, "b", 0, [], seq=2)
    arb.step()
    # a is overloaded, but w1 (the operator's) is left alone: v2 is the second most loaded movable VM.
    assert all(m.vm != "w1" for m in bus.of("MigrateVm"))


def test_timeout_leaves_the_vm_alone_until_a_newer_report():
    arb, bus, clock = make(commands=CommandSettings(migrate_timeout_s=10, migrate_deadline_slack_s=5))
    overloaded_cluster(arb, clock)
    arb.step()
    clock.advance(16)
    arb.step(full=True)
    assert not arb.log.records and "v2" in arb.unconfirmed
    assert len(bus.of("MigrateVm")) == 1
    clock.advance(1)
    feed(arb, clock, "a", 90, [domain("v1", 50), domain("v2", 30), domain("v3", 10)], seq=3)
    feed(arb, clock, "b", 20, [domain("w1", 20)], seq=3)
    arb.step(full=True)
    assert len(bus.of("MigrateVm")) == 2 and "v2" not in arb.unconfirmed


def test_restart_keeps_in_flight_commands_and_operator_decisions(tmp_path):
    arb, bus, clock = make(tmp_path)
    arb.on_operator(PinVm(command_id="p1", vm="v3"))
    arb.on_operator(SetThresholds(command_id="t1", upper_pct=85, lower_pct=10))
    feed(arb, clock, "a", 90, [domain("v1", 50), domain("v2", 30), domain("v3", 10)])
    feed(arb, clock, "b", 20, [domain("w1", 20)])
    arb.step()
    [m] = bus.of("MigrateVm")
    arb.on_result(result(m, "accepted"), ms(clock))
    # The arbiter dies; a new one starts with the same state file and hears the same telemetry.
    bus2 = FakeBus()
    arb2 = Arbiter(config(), bus2, clock=clock, new_id=Ids("second"), store=StateFile(tmp_path / "state.json"))
    assert arb2.params.upper_pct == 85 and "v3" in arb2.pinned
    assert arb2.log.for_vm("v2").command_id == m.command_id
    feed(arb2, clock, "a", 90, [domain("v1", 50), domain("v2", 30), domain("v3", 10)])
    feed(arb2, clock, "b", 20, [domain("w1", 20)])
    arb2.step(full=True)
    assert bus2.of("MigrateVm") == []  # not issued again
    arb2.on_result(result(m, "succeeded"), ms(clock))
    assert arb2.state.vm_location("v2") == "b" and not arb2.log.records
    # A replayed operator command after the restart is acknowledged, not redone.
    [r] = arb2.on_operator(SetThresholds(command_id="t1", upper_pct=85, lower_pct=10))
    assert r.status == "skipped"


def test_warmup_waits_for_reports_before_deciding():
    arb, bus, clock = make(warmup_s=10)
    arb.state.configure_node("b", clock())
    feed(arb, clock, "a", 5, [])  # b has not reported: a's emptiness alone is not enough to act on
    arb.step(full=True)
    assert bus.sent == []
    feed(arb, clock, "b", 50, [domain("w", 50)])
    arb.step(full=True)
    assert [m.node for m in bus.of("ShutdownNode")] == ["a"]


def test_hysteresis_policy_through_the_arbiter_needs_sustained_load():
    arb, bus, clock = make(params=Params(policy="enersis-hysteresis", sustain_cycles=2, reserve_nodes=0, cycle_s=10))
    feed(arb, clock, "b", 20, [domain("w1", 20)])
    feed(arb, clock, "a", 90, [domain("v1", 50), domain("v2", 40)])
    arb.step(full=True)
    assert bus.of("MigrateVm") == []  # one high report is a spike
    clock.advance(10)
    feed(arb, clock, "a", 90, [domain("v1", 50), domain("v2", 40)], seq=2)
    feed(arb, clock, "b", 20, [domain("w1", 20)], seq=2)
    arb.step(full=True)
    assert len(bus.of("MigrateVm")) == 1


@pytest.mark.parametrize("bad", [SetThresholds(command_id="x", upper_pct=50, lower_pct=10)])
def test_thresholds_reply_names_the_new_values(bad):
    arb, bus, clock = make()
    [r] = arb.on_operator(bad)
    assert r.status == "succeeded" and r.details == {"upper_pct": 50, "lower_pct": 10}


def test_reports_sampled_before_a_migration_finished_are_corrected():
    """An older report of the source still counts the VM that left; it must not trigger a second move."""
    arb, bus, clock = make()
    feed(arb, clock, "a", 90, [domain("v1", 50), domain("v2", 30), domain("v3", 10)])
    feed(arb, clock, "b", 20, [domain("w1", 20)])
    arb.step()
    [m] = bus.of("MigrateVm")
    sampled_before = ms(clock) + 5
    clock.advance(1)
    arb.on_result(result(m, "succeeded"), ms(clock))
    # Reports from both nodes sampled before the result arrive late.
    arb.on_telemetry(telemetry("a", 90, [domain("v1", 50), domain("v2", 30), domain("v3", 10)], seq=2), sampled_before)
    arb.on_telemetry(telemetry("b", 20, [domain("w1", 20)], seq=2), sampled_before)
    assert arb.state.nodes["a"].cpu_pct == pytest.approx(60)
    assert arb.state.nodes["b"].cpu_pct == pytest.approx(50) and arb.state.vm_location("v2") == "b"
    arb.step(full=True)
    assert len(bus.of("MigrateVm")) == 1
    # The target's own report confirms it; from then on reports are taken as they are.
    clock.advance(1)
    feed(arb, clock, "b", 52, [domain("w1", 20), domain("v2", 32)], seq=3)
    assert not arb.state.moved and arb.state.nodes["b"].cpu_pct == 52


def test_queued_old_reports_do_not_make_a_dead_node_look_alive():
    """After a restart the arbiter first reads reports queued while it was down (up to the queue's TTL)."""
    arb, bus, clock = make(warmup_s=10)
    old = ms(clock) - 40_000
    arb.on_telemetry(telemetry("gone", 0, []), old)  # its last words, 40 s ago
    arb.on_telemetry(telemetry("b", 50, [domain("w", 50)]), ms(clock))
    assert arb.state.nodes["gone"].view_state(clock(), 3) == "stale"
    assert not arb.warm(clock())  # still waiting: "gone" has not reported afresh
    arb.step(full=True)
    assert bus.sent == []  # in particular no shutdown of "gone" on 40-second-old data
    clock.advance(11)
    feed(arb, clock, "b", 50, [domain("w", 50)], seq=2)
    arb.step(full=True)
    assert bus.of("ShutdownNode") == []  # warm now, but a stale node is never shut down


def test_a_restarted_arbiter_is_ready_after_one_round_of_reports(tmp_path):
    """Rebuilt within 2 publish intervals: every node reports once per interval, and that is all it needs."""
    arb, bus, clock = make(tmp_path, warmup_s=10)
    for n in ("a", "b", "c"):
        feed(arb, clock, n, 50, [domain(f"{n}-vm", 50)])
    arb.step(full=True)
    clock.advance(30)
    arb2 = Arbiter(config(warmup_s=10), FakeBus(), clock=clock, new_id=Ids("2"), store=StateFile(tmp_path / "state.json"))
    assert not arb2.warm(clock())  # knows a, b and c were up: waits for them
    for i, n in enumerate(("a", "b", "c")):
        clock.advance(1.5)  # one 5 s publish interval, spread over the nodes
        assert not arb2.warm(clock())
        feed(arb2, clock, n, 95 if n == "c" else 20, [domain(f"{n}-vm", 60), domain(f"{n}-vm2", 35)] if n == "c"
             else [domain(f"{n}-vm", 20)], seq=2)
    assert arb2.warm(clock())  # 4.5 s after the first report, well within 2 intervals (10 s)
    arb2.step()
    assert [m.vm for m in arb2.bus.of("MigrateVm")] == ["c-vm2"]
