"""The agent's pure parts: CPU arithmetic, the window, the sampler's schedule, messages, config.

A hand-written fake hypervisor stands in for libvirt here: it records what it
was asked and lets a test say exactly how much CPU time each domain used, so
the numbers can be checked (the test:/// driver's cpu time is wall clock).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from enersis.agent.config import TelemetrySettings, load_agent_config, parse_agent_config
from enersis.agent.cpu import DomainLoad, DomainWindows, Window, clamp_pct, compute_load
from enersis.agent.hypervisor import DomainReading, HypervisorUnavailable, NodeFacts
from enersis.agent.sampler import Sampler
from enersis.agent.telemetry import Agent, Identity, online_message, telemetry_message
from enersis.common.codec import decode, encode, wrap
from enersis.common.config import ConfigError
from enersis.common.messages import NodeOffline, NodeOnline, NodeTelemetry
from tests.conftest import wait_for

S = 1_000_000_000  # ns per s


def reading(name: str, cpu_ns: int, vcpus: int = 1, uuid: str | None = None) -> DomainReading:
    return DomainReading(name, uuid or f"uuid-{name}", 1, vcpus, 1024 * 1024, 1024 * 1024, cpu_ns)


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeHypervisor:
    """Domains whose cpu time the test advances by hand; records every call."""

    def __init__(self, cpus: int = 4):
        self.cpus = cpus
        self.domains: dict[str, list] = {}  # name -> [uuid, vcpus, cpu_ns]
        self.down: str | None = None
        self.calls: list[str] = []

    def add(self, name: str, vcpus: int = 1) -> None:
        self.domains[name] = [f"uuid-{name}", vcpus, 0]

    def burn(self, name: str, cpu_s: float) -> None:
        self.domains[name][2] += int(cpu_s * S)

    def facts(self) -> NodeFacts:
        self.calls.append("facts")
        if self.down:
            raise HypervisorUnavailable(self.down)
        return NodeFacts("Fake", self.cpus, 2400, 16 << 20, 8 << 20)

    def read_domains(self) -> list[DomainReading]:
        self.calls.append("read_domains")
        if self.down:
            raise HypervisorUnavailable(self.down)
        return [reading(n, cpu, vcpus, uuid) for n, (uuid, vcpus, cpu) in sorted(self.domains.items())]

    def close(self) -> None:
        self.calls.append("close")


# ---------------------------------------------------------------- arithmetic


def test_node_load_is_the_sum_of_deltas_over_interval_times_host_cpus() -> None:
    prev = {r.uuid: r for r in [reading("a", 10 * S), reading("b", 5 * S, vcpus=2)]}
    cur = [reading("a", 11 * S), reading("b", 6 * S, vcpus=2)]  # 1 s each over 2 s on 4 CPUs
    s = compute_load(prev, cur, 2.0, 4)
    assert s.node_pct == pytest.approx(2 * 100 / (2 * 4))  # 25 %
    a, b = s.domains
    assert (a.cpu_node_pct, a.cpu_vcpu_pct) == (pytest.approx(12.5), pytest.approx(50.0))
    assert (b.cpu_node_pct, b.cpu_vcpu_pct) == (pytest.approx(12.5), pytest.approx(25.0))  # 2 vCPUs
    assert a.measured and b.measured


def test_load_is_clamped() -> None:
    prev = {"uuid-a": reading("a", 0)}
    s = compute_load(prev, [reading("a", 9 * S)], 1.0, 4)  # 9 CPU-seconds in 1 s on 4 CPUs
    assert s.node_pct == 100.0 and s.domains[0].cpu_vcpu_pct == 100.0
    assert clamp_pct(-3) == 0.0


def test_domain_appearing_vanishing_or_restarting_has_no_delta() -> None:
    prev = {r.uuid: r for r in [reading("gone", 50 * S), reading("restarted", 90 * S), reading("stay", 0)]}
    cur = [reading("new", 70 * S), reading("restarted", 1 * S), reading("stay", S // 2)]
    s = compute_load(prev, cur, 1.0, 1)
    by = {d.reading.name: d for d in s.domains}
    assert set(by) == {"new", "restarted", "stay"}  # the vanished one is simply absent
    assert not by["new"].measured and not by["restarted"].measured and by["stay"].measured
    assert s.node_pct == pytest.approx(50.0)  # only "stay" counts: no jump from "new"'s 70 s


def test_same_name_new_uuid_is_a_new_domain() -> None:
    prev = {"u1": reading("vm", 5 * S, uuid="u1")}
    s = compute_load(prev, [reading("vm", 6 * S, uuid="u2")], 1.0, 1)
    assert s.node_pct == 0 and not s.domains[0].measured


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        compute_load({}, [], 0, 4)
    with pytest.raises(ValueError):
        compute_load({}, [], 1, 0)


def test_window_mean_and_bound() -> None:
    w = Window(10.0, max_samples=12)
    assert w.mean(0) is None
    for t in range(1, 31):
        w.add(float(t), float(t))
    assert len(w) == 12  # bounded, whatever the timestamps
    assert w.mean(30.0) == pytest.approx(sum(range(21, 31)) / 10)  # (20, 30]
    assert w.mean(100.0) is None  # all too old


def test_domain_windows_follow_the_inventory() -> None:
    w = DomainWindows(3.0, max_samples=5)

    def load(name: str, pct: float, measured: bool = True) -> DomainLoad:
        return DomainLoad(reading(name, 0), pct / 4, pct, measured)

    w.update(1.0, (load("a", 10), load("b", 50)))
    out = w.update(2.0, (load("a", 30), load("b", 70), load("c", 0, measured=False)))
    by = {d.reading.name: d for d in out}
    assert by["a"].cpu_vcpu_pct == pytest.approx(20) and by["b"].cpu_node_pct == pytest.approx(15)
    assert by["c"].cpu_vcpu_pct == 0 and not by["c"].measured  # nothing measured yet
    out = w.update(3.0, (load("a", 50), load("c", 90)))  # b vanished: its window goes
    assert {d.reading.name: d.cpu_vcpu_pct for d in out} == {"a": pytest.approx(30), "c": pytest.approx(90)}
    assert set(w._w) == {"uuid-a", "uuid-c"}
    assert w.update(10.0, (load("a", 0, measured=False),))[0].cpu_vcpu_pct == 0  # all samples too old


# ---------------------------------------------------------------- sampler


def make_sampler(hv: FakeHypervisor, clock: FakeClock, **kw) -> Sampler:
    return Sampler(hv, sample_interval_s=1.0, window_s=kw.pop("window_s", 3.0), clock=clock, **kw)


def test_sampler_measures_every_interval_and_averages_over_the_window() -> None:
    hv, clock = FakeHypervisor(cpus=2), FakeClock()
    hv.add("a")
    s = make_sampler(hv, clock)
    first = s.sample_once()
    assert first.hypervisor_ok and first.cpu_pct_latest == 0 and not first.domains[0].measured
    for pct in (10, 20, 30, 40):  # node % on 2 CPUs: a uses pct*2 % of one CPU
        clock.t += 1.0
        hv.burn("a", pct * 2 / 100)
        st = s.sample_once()
        assert st.cpu_pct_latest == pytest.approx(pct)
    assert st.cpu_pct_mean == pytest.approx((20 + 30 + 40) / 3)  # window of 3 s
    # Domains are averaged over the same window: their shares add up to the node's mean.
    assert st.domains[0].cpu_vcpu_pct == pytest.approx((40 + 60 + 80) / 3)
    assert st.domains[0].cpu_node_pct == pytest.approx(st.cpu_pct_mean)
    assert st.samples == 5
    assert hv.calls.count("read_domains") == 5


def test_sampler_domain_appears_and_vanishes() -> None:
    hv, clock = FakeHypervisor(cpus=1), FakeClock()
    hv.add("a")
    s = make_sampler(hv, clock)
    s.sample_once()
    clock.t += 1
    hv.add("b")
    hv.burn("a", 0.5)
    hv.domains["b"][2] = 123 * S  # cpu time accumulated elsewhere before it appeared here
    st = s.sample_once()
    assert st.cpu_pct_latest == pytest.approx(50) and [d.reading.name for d in st.domains] == ["a", "b"]
    clock.t += 1
    del hv.domains["a"]
    hv.burn("b", 0.25)
    st = s.sample_once()
    assert st.cpu_pct_latest == pytest.approx(25) and [d.reading.name for d in st.domains] == ["b"]


def test_unreachable_hypervisor_is_reported_and_keeps_the_last_inventory() -> None:
    hv, clock = FakeHypervisor(), FakeClock()
    hv.add("a")
    s = make_sampler(hv, clock)
    s.sample_once()
    clock.t += 1
    hv.burn("a", 0.5)
    assert s.sample_once().cpu_pct_latest == pytest.approx(12.5)
    clock.t += 1
    hv.down = "connection reset by peer"
    st = s.sample_once()
    assert not st.hypervisor_ok and "connection reset" in st.error
    # Last known load, not 0 %: an unreachable node must not look idle.
    assert st.cpu_pct_latest == pytest.approx(12.5) and st.cpu_pct_mean == pytest.approx(12.5)
    assert [d.reading.name for d in st.domains] == ["a"]  # an unreachable node never looks empty
    msg = telemetry_message(Identity("node-1", "b", "v", 1, 5, 10), st, 1)
    assert msg.hypervisor_ok is False and msg.error and len(msg.domains) == 1
    clock.t += 1
    hv.down = None
    st = s.sample_once()
    assert st.hypervisor_ok and st.error == "" and not st.domains[0].measured  # new baseline
    clock.t += 1
    hv.burn("a", 1.0)
    assert s.sample_once().cpu_pct_latest == pytest.approx(25)


def test_clock_jumps_restart_the_measurement_without_bogus_numbers() -> None:
    hv, clock = FakeHypervisor(cpus=1), FakeClock()
    hv.add("a")
    s = make_sampler(hv, clock, window_s=10.0)
    s.sample_once()
    clock.t += 1
    hv.burn("a", 0.5)
    assert s.sample_once().cpu_pct_latest == pytest.approx(50)
    # Backwards: no negative interval, the window is cleared.
    clock.t -= 30
    hv.burn("a", 0.2)
    st = s.sample_once()
    assert 0 <= st.cpu_pct_latest <= 100 and len(s.window) == 0
    # The VM keeps its last known load rather than reading 0 % for this one sample.
    assert not st.domains[0].measured and st.domains[0].cpu_vcpu_pct == pytest.approx(50)
    clock.t += 1
    hv.burn("a", 0.3)
    assert s.sample_once().cpu_pct_latest == pytest.approx(30)
    # Forwards by an hour (suspend): the long gap is not a measurement (it would read ~0 %).
    clock.t += 3600
    hv.burn("a", 0.9)
    st = s.sample_once()
    assert st.cpu_pct_latest == pytest.approx(30)  # the last real measurement, not 0.9/3600
    clock.t += 1
    hv.burn("a", 0.9)
    st = s.sample_once()
    assert st.cpu_pct_latest == pytest.approx(90) and st.cpu_pct_mean == pytest.approx(90)


def test_schedule_skips_missed_ticks_instead_of_bursting() -> None:
    hv, clock = FakeHypervisor(), FakeClock()
    hv.add("a")
    s = Sampler(hv, sample_interval_s=1.0, window_s=5.0, clock=clock)
    waits: list[float] = []

    class Stop(threading.Event):
        def wait(self, timeout=None):  # the only place the sampler sleeps
            waits.append(timeout)
            clock.t += timeout
            if len(waits) == 3:
                clock.t += 7.5  # the process was stopped for 7.5 s
            if len(waits) >= 6:
                self.set()
            return self.is_set()

    s.run(Stop())
    assert waits[0] == pytest.approx(1.0) and waits[1] == pytest.approx(1.0)
    # After the stall: one sample at once, then back on the 1 s grid, never a burst of zero waits.
    assert all(w > 0 for w in waits)
    assert waits[3] == pytest.approx(0.5)
    assert s.latest().samples == 6


def test_sampler_run_survives_a_bug_in_the_hypervisor() -> None:
    hv, clock = FakeHypervisor(), FakeClock()
    boom = {"n": 0}

    def broken() -> list[DomainReading]:
        boom["n"] += 1
        raise KeyError("a bug, not an outage")

    hv.read_domains = broken  # type: ignore[method-assign]
    s = Sampler(hv, sample_interval_s=1.0, clock=clock)

    class Stop(threading.Event):
        def wait(self, timeout=None):
            clock.t += timeout
            if boom["n"] >= 3:
                self.set()
            return self.is_set()

    s.run(Stop())
    assert boom["n"] == 3


# ---------------------------------------------------------------- messages


def test_telemetry_and_online_messages_round_trip() -> None:
    hv, clock = FakeHypervisor(cpus=8), FakeClock()
    for i in range(3):
        hv.add(f"vm-{i}", vcpus=2)
    s = make_sampler(hv, clock)
    s.sample_once()
    clock.t += 1
    hv.burn("vm-1", 1.0)
    st = s.sample_once()
    ident = Identity("node-7", "boot-1", "0.1.0", 1.0, 5.0, 3.0)
    msg = telemetry_message(ident, st, 42)
    env = decode(encode(wrap(msg, "agent.node-7")))
    got = env.message
    assert isinstance(got, NodeTelemetry)
    assert (got.node, got.seq, got.cpus, got.hypervisor_type, got.cpu_pct_latest) == ("node-7", 42, 8, "Fake", 12.5)
    assert [d.name for d in got.domains] == ["vm-0", "vm-1", "vm-2"]
    assert got.domains[1].cpu_vcpu_pct == 50.0 and got.domains[1].cpu_node_pct == 12.5
    on = online_message(ident, st)
    assert isinstance(on, NodeOnline) and on.domain_count == 3 and on.hypervisor_ok


class RecordingBus:
    """Records what the agent publishes; can be told the broker is down."""

    def __init__(self):
        self.sent: list = []
        self.down = False
        self.lock = threading.Lock()

    def publish(self, message, *, retry_for_s=None):
        from enersis.common.bus import BrokerUnavailable

        message.validate()
        if self.down:
            raise BrokerUnavailable("broker down (test)")
        with self.lock:
            self.sent.append(message)


def test_agent_publishes_online_then_latest_telemetry_and_offline() -> None:
    hv, clock = FakeHypervisor(), FakeClock()
    hv.add("a")
    s = make_sampler(hv, clock)
    bus = RecordingBus()
    agent = Agent(Identity("node-1", "boot", "v", 1.0, 5.0, 3.0), s, bus, clock=clock)
    s.sample_once()
    assert agent.publish_once(s.latest(), budget_s=1)
    bus.down = True
    for _ in range(3):  # the broker is down: sampling goes on, telemetry is dropped, nothing queues
        clock.t += 1
        hv.burn("a", 1)
        s.sample_once()
        assert not agent.publish_once(s.latest(), budget_s=1)
    bus.down = False
    assert agent.publish_once(s.latest(), budget_s=1)
    kinds = [type(m).__name__ for m in bus.sent]
    assert kinds == ["NodeOnline", "NodeTelemetry", "NodeTelemetry"]
    last = bus.sent[-1]
    assert last.seq == 5 and last.cpu_pct_latest == pytest.approx(25)  # the latest state, seq shows the gap
    assert agent.dropped == 3 and agent.published == 2
    # Hypervisor lost, then back: a new NodeOnline says it is reachable again.
    hv.down = "gone"
    clock.t += 1
    s.sample_once()
    agent.publish_once(s.latest(), budget_s=1)
    assert not bus.sent[-1].hypervisor_ok and len([m for m in bus.sent if isinstance(m, NodeOnline)]) == 1
    hv.down = None
    clock.t += 1
    s.sample_once()
    agent.publish_once(s.latest(), budget_s=1)
    assert isinstance(bus.sent[-2], NodeOnline) and bus.sent[-2].hypervisor_ok
    agent._offline("test over")
    assert isinstance(bus.sent[-1], NodeOffline) and bus.sent[-1].reason == "test over"


# ---------------------------------------------------------------- config


def test_config_defaults_and_values(tmp_path: Path) -> None:
    p = tmp_path / "node.toml"
    p.write_text('node = "node-1"\n[hypervisor]\nuri = "test:///default"\n[telemetry]\npublish_interval_s = 2\n'
                 '[executor]\nenabled = true\n[peers.node-2]\nuri = "x"\n')
    cfg = load_agent_config(p)
    assert cfg.node == "node-1" and cfg.hypervisor_uri == "test:///default"
    assert cfg.telemetry == TelemetrySettings(1.0, 2.0, 10.0)
    assert cfg.broker.connection_name == "agent-node-1"
    assert cfg.raw["peers"]["node-2"]["uri"] == "x"  # other tables kept for their owners


@pytest.mark.parametrize("text, error", [
    ('[hypervisor]\nuri = "qemu:///system"\n', "missing `node"),
    ('node = "bad name!"\n[hypervisor]\nuri = "qemu:///system"\n', "not a valid name"),
    ('node = "n1"\n', "uri is required"),
    ('node = "n1"\n[hypervisor]\nuri = "sim://rel/dir"\n', "absolute path"),
    ('node = "n1"\n[hypervisor]\nuri = "qemu"\n', "not a URI"),
    ('node = "n1"\n[hypervisor]\nuri = "qemu:///system"\nurl = "x"\n', "unknown key(s) url"),
    ('node = "n1"\n[hypervisor]\nuri = "qemu:///system"\n[telemetry]\nsample_intervall_s = 1\n', "unknown key"),
    ('node = "n1"\n[hypervisor]\nuri = "qemu:///system"\n[telemetry]\nsample_interval_s = 0\n', "positive number"),
    ('node = "n1"\n[hypervisor]\nuri = "qemu:///system"\n[telemetry]\nsample_interval_s = "1"\n', "positive number"),
    ('node = "n1"\n[hypervisor]\nuri = "qemu:///system"\n[telemetry]\nsample_interval_s = 5\npublish_interval_s = 1\n',
     "must be >= sample_interval_s"),
    ('node = "n1"\n[hypervisor]\nuri = "qemu:///system"\n[telemetry]\nwindow_s = 0.5\n', "a mean needs"),
    ('node = "n1"\nhypervisor = 3\n', "must be a table"),
    ('node = "n1"\n[hypervisor]\nuri = "qemu:///system"\n[broker]\npassword = "x"\n', "must not be inline"),
    ('node = "n1"\n[hypervisor\n', "not valid TOML"),
])
def test_config_errors_are_clear(tmp_path: Path, text: str, error: str) -> None:
    p = tmp_path / "node.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_agent_config(p)
    assert error in str(exc.value)
    assert str(p) in str(exc.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_agent_config(tmp_path / "nope.toml")


def test_unknown_top_level_key_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    cfg = parse_agent_config({"node": "n1", "hypervisor": {"uri": "test:///default"}, "telemetryy": {}})
    assert cfg.node == "n1" and "telemetryy" in caplog.text


def test_publish_loop_cadence_outage_retries_and_no_burst_after_a_stall() -> None:
    hv, clock = FakeHypervisor(), FakeClock()
    hv.add("a")
    s = make_sampler(hv, clock)
    assert not s.sample_once().measured  # one reading is no measurement yet
    clock.t += 1
    assert s.sample_once().measured
    bus = RecordingBus()
    agent = Agent(Identity("node-1", "boot", "v", 1.0, 5.0, 3.0), s, bus, clock=clock)
    waits: list[float] = []

    class Stop(threading.Event):
        def wait(self, timeout=None):  # the loop's only sleep: advance the fake clock instead
            waits.append(timeout)
            clock.t += timeout
            if len(waits) == 2:
                bus.down = True
            if len(waits) == 4:
                bus.down = False
            if len(waits) == 5:
                clock.t += 60  # the process was stopped for a minute
            if len(waits) >= 7:
                self.set()
            return self.is_set()

    agent._publish_loop(Stop())
    # Every period while the broker is up; every second (with the newest state) while it is down;
    # back on the period after it returns; one message, not a catch-up burst, after the stall.
    assert waits == pytest.approx([5, 5, 1, 1, 5, 5, 5])
    tel = [m for m in bus.sent if isinstance(m, NodeTelemetry)]
    assert [m.seq for m in tel] == [1, 2, 5, 6, 7]  # 3 and 4 were dropped, never resent
    assert agent.dropped == 2


def test_xen_host_domain_counts_in_the_load_but_is_not_a_vm() -> None:
    # On Xen the host OS is Domain-0 (the seed's reason to measure from the hypervisor):
    # its CPU is part of the node's load; it is not in the inventory the arbiter may migrate.
    hv, clock = FakeHypervisor(cpus=2), FakeClock()
    hv.add("vm-1")
    plain = hv.read_domains

    def with_dom0() -> list[DomainReading]:
        dom0 = DomainReading("Domain-0", "00000000-0000-0000-0000-000000000000", 1, 2, 1 << 20, 1 << 20,
                             int(clock.t * 0.5 * S), host=True)  # half a CPU, all the time
        return [dom0] + plain()

    hv.read_domains = with_dom0  # type: ignore[method-assign]
    s = make_sampler(hv, clock)
    s.sample_once()
    clock.t += 1
    hv.burn("vm-1", 1.0)
    st = s.sample_once()
    assert st.cpu_pct_latest == pytest.approx((0.5 + 1.0) / 2 * 100)
    ident = Identity("xen-1", "b", "v", 1, 5, 10)
    msg = telemetry_message(ident, st, 1)
    assert [d.name for d in msg.domains] == ["vm-1"]
    assert msg.cpu_pct_latest == pytest.approx(75)
    assert online_message(ident, st).domain_count == 1


def test_broker_outage_is_logged_at_start_every_minute_and_at_the_end(caplog: pytest.LogCaptureFixture) -> None:
    hv, clock = FakeHypervisor(), FakeClock()
    hv.add("a")
    s = make_sampler(hv, clock)
    s.sample_once()
    bus = RecordingBus()
    agent = Agent(Identity("node-1", "boot", "v", 1.0, 5.0, 3.0), s, bus, clock=clock)
    bus.down = True
    budgets = []
    real_publish = bus.publish

    def publish(message, *, retry_for_s=None):
        budgets.append(retry_for_s)
        return real_publish(message, retry_for_s=retry_for_s)

    bus.publish = publish  # type: ignore[method-assign]
    for _ in range(150):  # 150 s of one try per second
        agent.publish_once(s.latest(), budget_s=0.0)
        clock.t += 1
    bus.down = False
    assert agent.publish_once(s.latest(), budget_s=1.0)
    msgs = [r.getMessage() for r in caplog.records if r.name == "enersis.agent.telemetry"]
    assert sum("broker unreachable" in m for m in msgs) == 1
    assert sum("still unreachable" in m for m in msgs) == 2  # after 60 s and 120 s, not 150 lines
    assert any("reachable again after 150s" in m for m in msgs)
    agent._broker_ok = False
    agent._offline("stopping")  # broker known down: one attempt, no 3 s wait
    assert budgets[-1] == 0.0


def test_a_hanging_hypervisor_call_is_reported_not_hidden() -> None:
    # A remote libvirt connection to a dead host can block a call for minutes: the publisher
    # must not keep sending the last numbers as if the node were fine.
    hv = FakeHypervisor()
    hv.add("a")
    release = threading.Event()
    plain = hv.read_domains
    s = Sampler(hv, sample_interval_s=0.1, window_s=0.5)
    s.sample_once()
    s.sample_once()
    bus = RecordingBus()
    agent = Agent(Identity("node-1", "boot", "v", 0.1, 0.3, 0.5), s, bus)
    assert agent.publish_once(s.latest(), budget_s=1) and bus.sent[-1].hypervisor_ok

    def hang() -> list[DomainReading]:
        release.wait(30)
        return plain()

    hv.read_domains = hang  # type: ignore[method-assign]
    stop = threading.Event()
    t = threading.Thread(target=s.run, args=(stop,), daemon=True)
    t.start()
    try:
        def flagged() -> bool:
            agent.publish_once(s.latest(), budget_s=1)
            return not bus.sent[-1].hypervisor_ok

        wait_for(flagged, 10, what="telemetry saying the hypervisor hangs")
        assert "hangs" in bus.sent[-1].error and [d.name for d in bus.sent[-1].domains] == ["a"]
        release.set()  # the call returns: readings resume, and so does NodeOnline
        hv.read_domains = plain  # type: ignore[method-assign]
        wait_for(lambda: agent.publish_once(s.latest(), budget_s=1) and bus.sent[-1].hypervisor_ok, 10,
                 what="telemetry after the hang")
        assert isinstance(bus.sent[-2], NodeOnline) and bus.sent[-2].hypervisor_ok
    finally:
        release.set()
        stop.set()
        t.join(5)
