"""The pure parts of the operator tools and the demo: the bus view's node states and the energy ledger."""

from __future__ import annotations

import pytest

from enersis.common.codec import wrap
from enersis.common.messages import CommandResult, DomainSample, NodeOffline, NodeOnline, NodeTelemetry
from enersis.demo.energy import Ledger, PowerModel, Tally
from enersis.ops.render import bar, node_rows
from enersis.ops.view import ClusterView


def tel(node: str, vms: tuple[str, ...] = (), cpu: float = 50.0, seq: int = 1, interval: float = 2.0) -> NodeTelemetry:
    doms = [DomainSample(v, "u-" + v, 1, 1, 1 << 20, 1 << 20, 5.0, 20.0) for v in vms]
    return NodeTelemetry(node, seq, "b", True, "Simulated", 4, 2000, 8 << 20, 4 << 20, cpu, cpu, 4.0, 0.5,
                         interval, doms)


def feed(view: ClusterView, message, ts: int) -> None:
    view.apply(wrap(message, "test", ts_ms=ts))


def result(kind: str, status: str, node: str, cid: str) -> CommandResult:
    return CommandResult(cid, kind, status, node=node)


def test_a_node_goes_through_shutdown_and_wake():
    v = ClusterView()
    feed(v, tel("n1", ("vm-1",)), 1_000)
    assert v.nodes["n1"].state(1_500) == "online"
    feed(v, result("ShutdownNode", "accepted", "n1", "c1"), 2_000)
    feed(v, tel("n1", (), seq=2), 2_100)  # still reporting while it shuts down
    assert v.nodes["n1"].state(2_200) == "shutting_down"
    feed(v, NodeOffline("n1", "b", "received SIGTERM"), 2_300)
    feed(v, result("ShutdownNode", "succeeded", "n1", "c1"), 2_400)
    assert v.nodes["n1"].state(60_000) == "off"  # silence does not make an off node "stale"
    feed(v, result("WakeNode", "accepted", "n1", "c2"), 70_000)
    assert v.nodes["n1"].state(70_100) == "waking"
    feed(v, NodeOnline("n1", "b2", True, "Simulated", 0), 71_000)
    assert v.nodes["n1"].state(71_100) == "online"
    assert v.nodes["n1"].telemetry is None  # the report from before the power-off says nothing now
    feed(v, result("WakeNode", "succeeded", "n1", "c2"), 71_200)
    feed(v, tel("n1", seq=3), 72_000)
    assert v.nodes["n1"].state(72_100) == "online"
    assert [c.status for c in v.commands.values()] == ["succeeded", "succeeded"]


def test_a_failed_wake_leaves_the_node_off_and_a_late_accepted_reopens_nothing():
    v = ClusterView()
    feed(v, result("ShutdownNode", "succeeded", "n2", "c1"), 1_000)
    feed(v, result("WakeNode", "accepted", "n2", "c2"), 2_000)
    feed(v, result("WakeNode", "failed", "n2", "c2"), 3_000)
    assert v.nodes["n2"].state(3_100) == "off"
    feed(v, result("WakeNode", "accepted", "n2", "c2"), 2_500)  # redelivered, older
    assert v.commands["c2"].status == "failed" and v.in_flight() == []


def test_silence_makes_a_node_stale_after_three_intervals():
    v = ClusterView()
    feed(v, tel("n3", interval=2.0), 10_000)
    assert v.nodes["n3"].state(15_900) == "online"
    assert v.nodes["n3"].state(16_100) == "stale"


def test_where_is_prefers_the_newest_report_during_a_migration():
    v = ClusterView()
    feed(v, tel("a", ("vm-7",)), 1_000)
    feed(v, tel("b", ("vm-7",)), 1_500)  # the target reports first; the source's old report still lists it
    assert v.where_is("vm-7", 2_000) == "b"
    assert v.where_is("vm-8", 2_000) is None


def test_render_orders_nodes_naturally_and_shows_off_nodes():
    v = ClusterView()
    for n in ("node-10", "node-2"):
        feed(v, tel(n, ("vm-1",) if n == "node-2" else ()), 1_000)
    lines = node_rows(v, 1_500, extra_nodes=("node-1",))
    assert [l.split()[0] for l in lines[1:]] == ["node-1", "node-2", "node-10"]
    assert lines[1].split()[1] == "silent" and "vm-1" in lines[2]
    assert bar(50, 10) == "[#####.....]" and bar(140, 4) == "[####]"


def test_energy_ledger_against_all_on():
    model = PowerModel(idle_w=120, max_w=250, off_w=5, transition_w=180)
    v = ClusterView()
    feed(v, tel("n1", cpu=50.0), 1_000)
    feed(v, result("ShutdownNode", "succeeded", "n2", "c"), 1_000)
    ledger = Ledger(model, ("n1", "n2"))
    ledger.step(v, 1_500, 3600.0)
    # n1: 120 + 130 * 0.5 = 185 W; n2 off: 5 W.  All on: 2 * 120 + 65 = 305 W.
    assert ledger.actual_kwh == pytest.approx(0.190)
    assert ledger.baseline_kwh == pytest.approx(0.305)
    assert ledger.saved_pct == pytest.approx(100 * (1 - 190 / 305))
    assert ledger.state_s == {"online": 3600.0, "off": 3600.0}
    tally = Tally()
    tally.update(v)
    assert tally.get("ShutdownNode") == 1 and tally.failed("ShutdownNode") == 0


def test_vm_table_shows_a_migrating_vm_once_where_the_newest_report_puts_it():
    from enersis.ops.render import vm_rows

    v = ClusterView()
    feed(v, tel("a", ("vm-1", "vm-2")), 1_000)
    feed(v, tel("b", ("vm-2",)), 1_200)
    rows = vm_rows(v, 1_500)[1:]
    assert [(r.split()[0], r.split()[1]) for r in rows] == [("vm-1", "a"), ("vm-2", "b")]
