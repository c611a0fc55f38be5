"""Named cluster scenarios for the pure policies (no broker, no clock)."""

from __future__ import annotations

import pytest

from enersis.arbiter.policy import (
    POLICIES,
    Migrate,
    NodeView,
    Params,
    Shutdown,
    Snapshot,
    VmView,
    Wake,
    decide,
)

P2012 = Params()
HYST = Params(policy="enersis-hysteresis", sustain_cycles=3, reserve_nodes=0)


def node(name, used, cap=1000.0, state="online", mem=8192, **kw) -> NodeView:
    return NodeView(name=name, state=state, cpu_capacity=cap, cpu_used=used, mem_mib=mem, **kw)


def vm(name, on, cpu, mem=512, **kw) -> VmView:
    return VmView(name=name, node=on, cpu=cpu, mem_mib=mem, **kw)


def snap(nodes, vms) -> Snapshot:
    return Snapshot(nodes=tuple(nodes), vms=tuple(vms))


# ---------------------------------------------------------------- enersis-2012


def test_2012_overload_moves_second_most_loaded_vm_to_least_loaded_node():
    s = snap(
        [node("a", 900), node("b", 400), node("c", 300)],
        [vm("big", "a", 500), vm("mid", "a", 300), vm("small", "a", 100), vm("x", "b", 400), vm("y", "c", 300)],
    )
    assert decide(s, P2012, 0) == [Migrate("mid", "a", "c", "a overloaded at 90% > 80%")]


def test_2012_single_vm_overload_is_left_alone():
    s = snap([node("a", 950), node("b", 100)], [vm("only", "a", 950), vm("x", "b", 100)])
    assert [i for i in decide(s, P2012, 0) if isinstance(i, Migrate)] == []


def test_2012_target_must_stay_under_upper_after_taking_the_vm():
    # b would reach exactly 80 % -> not "under" the threshold; c is less loaded but would reach 85 %.
    s = snap(
        [node("a", 900), node("b", 500), node("c", 450, cap=600)],
        [vm("v1", "a", 600), vm("v2", "a", 300), vm("x", "b", 500), vm("y", "c", 450)],
    )
    intents = decide(s, P2012, 0)
    assert not any(isinstance(i, Migrate) for i in intents)
    # No online room: wake an off node? none exists here, so nothing at all.
    assert intents == []


def test_2012_overload_without_room_wakes_first_off_node_by_name():
    s = snap(
        [node("a", 900), node("b", 790), node("z-off", 0, state="off"), node("m-off", 0, state="off")],
        [vm("v1", "a", 600), vm("v2", "a", 300), vm("x", "b", 790)],
    )
    intents = decide(s, P2012, 0)
    assert [type(i) for i in intents] == [Wake]
    assert intents[0].node == "m-off"  # deterministic: name order, never random


def test_2012_does_not_wake_a_second_node_while_one_is_waking():
    s = snap(
        [node("a", 900), node("b", 790), node("w", 0, state="waking"), node("off1", 0, state="off")],
        [vm("v1", "a", 600), vm("v2", "a", 300), vm("x", "b", 790)],
    )
    assert decide(s, P2012, 0) == []


def test_2012_never_targets_stale_off_quarantined_waking_draining_or_frontend():
    bad = ["stale", "off", "quarantined", "waking", "draining", "shutting_down"]
    nodes = [node("a", 900)] + [node(f"n-{st}", 0, state=st) for st in bad] + [node("fe", 0, frontend=True)]
    s = snap(nodes, [vm("v1", "a", 600), vm("v2", "a", 300)])
    for i in decide(s, P2012, 0):
        assert not isinstance(i, Migrate)


def test_2012_underloaded_node_is_emptied_then_shut_down_only_when_empty():
    s = snap([node("a", 50), node("b", 500)], [vm("v1", "a", 30), vm("v2", "a", 20), vm("x", "b", 500)])
    intents = decide(s, P2012, 0)
    assert sorted((i.vm, i.target) for i in intents if isinstance(i, Migrate)) == [("v1", "b"), ("v2", "b")]
    assert not any(isinstance(i, Shutdown) for i in intents)  # not empty yet: the seed's defect fixed
    # Next cycle, after the migrations succeeded, a is empty and gets shut down.
    s2 = snap([node("a", 2), node("b", 550)], [vm("v1", "b", 30), vm("v2", "b", 20), vm("x", "b", 500)])
    assert decide(s2, P2012, 0) == [Shutdown("a", "a empty and underloaded at 0% < 10%")]


def test_2012_no_shutdown_while_a_migration_is_in_flight_to_or_from_the_node():
    s = snap([node("a", 0), node("b", 500)], [vm("v1", "b", 30, busy=True, target="a"), vm("x", "b", 470)])
    assert not any(isinstance(i, Shutdown) and i.node == "a" for i in decide(s, P2012, 0))


def test_2012_underload_never_wakes_a_node():
    s = snap([node("a", 50), node("b", 790), node("off", 0, state="off")], [vm("v1", "a", 50), vm("x", "b", 790)])
    assert decide(s, P2012, 0) == []


def test_2012_underload_does_not_spread_onto_an_empty_node_about_to_shut_down():
    s = snap([node("a", 50), node("e", 0)], [vm("v1", "a", 50)])
    intents = decide(s, P2012, 0)
    assert intents == [Shutdown("e", "e empty and underloaded at 0% < 10%")]


def test_2012_frontend_vm_goes_to_least_loaded_node_and_frontend_never_shut_down():
    s = snap(
        [node("fe", 0, frontend=True), node("a", 300), node("b", 200)],
        [vm("new", "fe", 100), vm("x", "a", 300), vm("y", "b", 200)],
    )
    assert decide(s, P2012, 0) == [Migrate("new", "fe", "b", "started on the frontend")]
    s2 = snap([node("fe", 0, frontend=True), node("a", 300)], [vm("x", "a", 300)])
    assert decide(s2, P2012, 0) == []


def test_2012_pinned_and_busy_vms_stay_and_block_shutdown():
    s = snap([node("a", 50), node("b", 300)], [vm("p", "a", 20, pinned=True), vm("q", "a", 30, busy=True), vm("x", "b", 300)])
    assert decide(s, P2012, 0) == []


def test_2012_stale_node_is_never_shut_down_or_evacuated():
    s = snap([node("s", 0, state="stale"), node("b", 300)], [vm("v", "s", 0), vm("x", "b", 300)])
    assert decide(s, P2012, 0) == []


def test_draining_node_is_evacuated_and_powered_off_only_when_asked_and_empty():
    s = snap([node("d", 300, state="draining", power_off_when_empty=True), node("b", 300)],
             [vm("v1", "d", 200), vm("v2", "d", 100), vm("x", "b", 300)])
    for params in (P2012, HYST):
        intents = decide(s, params, 0)
        assert sorted(i.vm for i in intents if isinstance(i, Migrate)) == ["v1", "v2"] or params is HYST
        assert not any(isinstance(i, Shutdown) for i in intents)
    empty = snap([node("d", 0, state="draining", power_off_when_empty=True), node("b", 600)],
                 [vm("v1", "b", 200), vm("v2", "b", 100), vm("x", "b", 300)])
    for params in (P2012, HYST):
        assert decide(empty, params, 0) == [Shutdown("d", "d drained for maintenance")]
    keep_on = snap([node("d", 0, state="draining"), node("b", 600)], [vm("x", "b", 300)])
    assert decide(keep_on, P2012, 0) == []


def test_in_flight_migration_counts_on_its_target():
    # b already receives 'mid' (in flight): another VM must not be sent there if it no longer fits.
    s = snap(
        [node("a", 950), node("b", 500), node("c", 600)],
        [vm("big", "a", 400), vm("mid", "a", 300, busy=True, target="b"), vm("small", "a", 250), vm("x", "b", 500), vm("y", "c", 600)],
    )
    # Projected: a = 650 (65 %) -> no longer overloaded, nothing more to do.
    assert decide(s, P2012, 0) == []


# ---------------------------------------------------------------- enersis-hysteresis


def test_hysteresis_ignores_a_short_spike():
    s = snap([node("a", 900, history=(50, 50)), node("b", 100, history=(10, 10))],
             [vm("v1", "a", 600), vm("v2", "a", 300), vm("x", "b", 100)])
    assert decide(s, HYST, 0) == []


def test_hysteresis_acts_on_sustained_overload_with_best_fit():
    s = snap([node("a", 900, history=(85, 90)), node("b", 100, history=(10, 10)), node("c", 500, history=(50, 50))],
             [vm("v1", "a", 600), vm("v2", "a", 300), vm("x", "b", 100), vm("y", "c", 500)])
    intents = decide(s, HYST, 0)
    # Excess over the 75 % ceiling is 150 MHz: the smallest VM covering it is v2 (300);
    # best fit is the busiest node with room: c (free 250) cannot, b (650) can.
    assert intents == [Migrate("v2", "a", "b", "a overloaded at 90% > 80% (sustained)")]


def test_hysteresis_panics_without_history():
    s = snap([node("a", 990), node("b", 100)], [vm("v1", "a", 600), vm("v2", "a", 390), vm("x", "b", 100)])
    assert [type(i) for i in decide(s, HYST, 0)] == [Migrate]


def test_hysteresis_memory_aware_placement():
    # CPU best fit alone would pick b (tighter); b's memory cannot hold v2, so c.
    s = snap([node("a", 990), node("b", 300, mem=1024), node("c", 100, mem=8192)],
             [vm("v1", "a", 600, mem=512), vm("v2", "a", 390, mem=2048), vm("x", "b", 300), vm("y", "c", 100)])
    intents = decide(s, HYST, 0)
    assert [(i.vm, i.target) for i in intents if isinstance(i, Migrate)] == [("v2", "c")]


def test_hysteresis_underload_is_all_or_nothing():
    idle = (5, 5)
    s = snap([node("a", 50, history=idle), node("b", 700, history=(70, 70))],
             [vm("v1", "a", 10), vm("v2", "a", 40, mem=8000), vm("x", "b", 700)])
    assert decide(s, HYST, 0) == []  # v2 cannot fit on b's memory: do not move v1 for nothing


def test_hysteresis_evacuates_one_at_a_time_per_node_and_keeps_reserve():
    idle = (3, 3)
    params = Params(policy="enersis-hysteresis", reserve_nodes=1, max_migrations_per_node=1)
    s = snap([node("a", 50, history=idle), node("b", 500, history=(50, 50)),
              node("e1", 0, history=idle), node("e2", 0, cap=2000, history=idle)],
             [vm("v1", "a", 10), vm("v2", "a", 40), vm("x", "b", 500)])
    intents = decide(s, params, 0)
    assert [i for i in intents if isinstance(i, Migrate)] == [Migrate("v2", "a", "b", "a underloaded at 5% < 10% (sustained)")]
    # Two spare empty nodes, reserve 1: the smaller one is powered off, the bigger kept on.
    assert [i.node for i in intents if isinstance(i, Shutdown)] == ["e1"]


def test_hysteresis_respects_power_cycle_limit():
    idle = (0, 0)
    params = Params(policy="enersis-hysteresis", reserve_nodes=0, max_power_cycles_per_hour=2)
    s = snap([node("e", 0, history=idle, power_cycles_last_hour=2), node("b", 500, history=(50, 50))], [vm("x", "b", 500)])
    assert decide(s, params, 0) == []


def test_hysteresis_wakes_enough_capacity_largest_first():
    s = snap([node("a", 990), node("b", 790), node("s1", 0, cap=500, state="off"), node("s2", 0, cap=2000, state="off")],
             [vm("v1", "a", 600), vm("v2", "a", 390), vm("x", "b", 790)])
    intents = decide(s, HYST, 0)
    assert [type(i) for i in intents] == [Wake]
    assert intents[0].node == "s2"
    # While it wakes, nothing else is woken for the same demand.
    waking = snap([node("a", 990), node("b", 790), node("s1", 0, cap=500, state="off"), node("s2", 0, cap=2000, state="waking")],
                  [vm("v1", "a", 600), vm("v2", "a", 390), vm("x", "b", 790)])
    assert decide(waking, HYST, 0) == []


def test_hysteresis_limits_concurrent_migrations():
    params = Params(policy="enersis-hysteresis", max_concurrent_migrations=2, sustain_cycles=1)
    nodes = [node(f"hot{i}", 990) for i in range(4)] + [node(f"cold{i}", 0) for i in range(4)]
    vms = [vm(f"v{i}{j}", f"hot{i}", 495) for i in range(4) for j in range(2)]
    intents = decide(snap(nodes, vms), params, 0)
    assert len([i for i in intents if isinstance(i, Migrate)]) == 2


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_decide_is_deterministic_and_order_independent(policy):
    nodes = [node("a", 900), node("b", 50), node("c", 300), node("d", 0, state="off")]
    vms = [vm("v1", "a", 500), vm("v2", "a", 400), vm("v3", "b", 50), vm("v4", "c", 300)]
    params = Params(policy=policy, sustain_cycles=1)
    first = decide(snap(nodes, vms), params, 0)
    assert first == decide(snap(list(reversed(nodes)), list(reversed(vms))), params, 123)


def test_params_validation():
    with pytest.raises(ValueError, match="unknown policy"):
        Params(policy="nope").validate()
    with pytest.raises(ValueError, match="lower_pct"):
        Params(upper_pct=10, lower_pct=20).validate()
    Params().validate()
    Params(policy="enersis-hysteresis").validate()


def test_hysteresis_consolidates_a_lightly_loaded_node_onto_busier_ones():
    mid = (30, 30)
    s = snap([node("a", 300, history=mid), node("b", 400, history=(40, 40)), node("c", 600, history=(60, 60))],
             [vm("v1", "a", 200), vm("v2", "a", 100), vm("x", "b", 400), vm("y", "c", 600)])
    intents = decide(s, HYST, 0)
    # a (30 %) is above lower_pct but below consolidate_pct (50): its VMs fit on the busier nodes, one at a time.
    [m] = [i for i in intents if isinstance(i, Migrate)]
    assert m.source == "a" and m.vm == "v1" and m.target == "b" and "consolidated" in m.reason
    off = replace_params(HYST, consolidate_pct=0)
    assert decide(s, off, 0) == []


def replace_params(p, **kw):
    from dataclasses import replace
    return replace(p, **kw)
