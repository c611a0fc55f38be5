"""Property-based tests: the safety invariants hold for any cluster, under both policies."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enersis.arbiter.policy import (
    NODE_STATES,
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


@st.composite
def clusters(draw):
    n_nodes = draw(st.integers(1, 8))
    nodes = []
    for i in range(n_nodes):
        cap = draw(st.sampled_from([1000.0, 2000.0, 4000.0]))
        nodes.append(NodeView(
            name=f"n{i}",
            state=draw(st.sampled_from(NODE_STATES + ("online", "online", "online"))),
            cpu_capacity=cap,
            cpu_used=draw(st.floats(0, cap * 1.1, allow_nan=False)),
            mem_mib=draw(st.sampled_from([1024, 4096, 16384])),
            busy=draw(st.booleans()) and draw(st.booleans()),
            frontend=(i == 0 and draw(st.booleans())),
            history=tuple(draw(st.lists(st.floats(0, 100, allow_nan=False), max_size=4))),
            power_cycles_last_hour=draw(st.integers(0, 3)),
            power_off_when_empty=draw(st.booleans()),
        ))
    names = [n.name for n in nodes]
    vms = []
    for j in range(draw(st.integers(0, 14))):
        busy = draw(st.booleans()) and draw(st.booleans())
        vms.append(VmView(
            name=f"vm{j}",
            node=draw(st.sampled_from(names + ["ghost"])),  # a VM on an unknown node must be ignored
            cpu=draw(st.floats(0, 1500, allow_nan=False)),
            mem_mib=draw(st.sampled_from([256, 512, 2048])),
            pinned=draw(st.booleans()) and draw(st.booleans()),
            busy=busy,
            target=draw(st.sampled_from(names)) if busy and draw(st.booleans()) else "",
        ))
    return Snapshot(nodes=tuple(nodes), vms=tuple(vms))


def params_for(policy: str, draw_k: int, reserve: int) -> Params:
    return Params(policy=policy, sustain_cycles=draw_k, reserve_nodes=reserve)


def check_invariants(s: Snapshot, p: Params, intents: list) -> None:
    nodes = {n.name: n for n in s.nodes}
    vms = {v.name: v for v in s.vms}
    hosting = {v.node for v in s.vms} | {v.target for v in s.vms if v.busy and v.target}
    migrates = [i for i in intents if isinstance(i, Migrate)]
    # Never two commands in flight for one VM, and never one for a VM already busy or pinned.
    assert all(c == 1 for c in Counter(m.vm for m in migrates).values())
    for m in migrates:
        # Every intent names things that exist, as they are.
        assert m.vm in vms and m.source in nodes and m.target in nodes
        v = vms[m.vm]
        assert v.node == m.source and m.source != m.target
        assert not v.busy and not v.pinned
        t = nodes[m.target]
        # Never target a stale, off, quarantined (or otherwise not-online) node, nor the frontend.
        assert t.state == "online" and not t.busy and not t.frontend
        assert nodes[m.source].state in ("online", "draining")
    targets = {m.target for m in migrates}
    sources = {m.source for m in migrates}
    for i in intents:
        if isinstance(i, Shutdown):
            n = nodes[i.node]
            # Never shut down a node hosting a VM, receiving one, or with anything in flight.
            assert i.node not in hosting and i.node not in targets and i.node not in sources
            assert n.state in ("online", "draining") and not n.busy and not n.frontend
        elif isinstance(i, Wake):
            n = nodes[i.node]
            assert n.state == "off" and not n.busy and not n.frontend
    assert len({(type(i).__name__, getattr(i, "node", None)) for i in intents if not isinstance(i, Migrate)}) == \
        len([i for i in intents if not isinstance(i, Migrate)])
    if p.policy == "enersis-hysteresis":
        in_flight = sum(1 for v in s.vms if v.busy and v.target in nodes and v.node in nodes and v.target != v.node)
        assert len(migrates) <= max(0, p.max_concurrent_migrations - in_flight)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=clusters(), policy=st.sampled_from(sorted(POLICIES)), k=st.integers(1, 3), reserve=st.integers(0, 2))
def test_invariants_hold_for_any_cluster(s, policy, k, reserve):
    p = params_for(policy, k, reserve)
    intents = decide(s, p, 0.0)
    check_invariants(s, p, intents)
    # Pure: the same snapshot gives the same answer, whatever the clock says.
    assert decide(s, p, 1e9) == intents


@settings(max_examples=150, deadline=None)
@given(s=clusters())
def test_2012_targets_stay_under_the_upper_threshold(s):
    p = Params()
    intents = decide(s, p, 0.0)
    nodes = {n.name: n for n in s.nodes}
    vms = {v.name: v for v in s.vms}
    load = {n: v.cpu_used for n, v in nodes.items()}
    for v in s.vms:
        if v.busy and v.target in nodes and v.node in nodes and v.target != v.node:
            # Projected: an in-flight VM counts on its target, no longer on its source.
            load[v.target] += v.cpu
            load[v.node] = max(0.0, load[v.node] - v.cpu)
    for m in intents:
        if isinstance(m, Migrate):
            load[m.target] += vms[m.vm].cpu
            assert load[m.target] * 100 / nodes[m.target].cpu_capacity < p.upper_pct


@settings(max_examples=100, deadline=None)
@given(s=clusters(), policy=st.sampled_from(sorted(POLICIES)))
def test_applying_the_plan_loses_and_duplicates_no_vm(s, policy):
    """Simulate the intents' success: every VM still exists exactly once, on an existing node."""
    p = Params(policy=policy, sustain_cycles=1)
    intents = decide(s, p, 0.0)
    where = {v.name: v.node for v in s.vms}
    for m in intents:
        if isinstance(m, Migrate):
            assert where[m.vm] == m.source
            where[m.vm] = m.target
    assert set(where) == {v.name for v in s.vms}
    off = {i.node for i in intents if isinstance(i, Shutdown)}
    assert not off & set(where.values())
