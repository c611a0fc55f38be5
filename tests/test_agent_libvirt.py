"""The real libvirt adapter on libvirt's test:/// driver (real libvirt-python, no daemon).

The test driver's cpu time is wall-clock time, the same for every domain
(LAB.md §3): these tests prove the API use and the robustness, while the
arithmetic is checked against a fake (test_agent_core.py) and a real QEMU
guest (test_agent_qemu.py).
"""

from __future__ import annotations

import threading
import time
import uuid

import libvirt
import pytest

from enersis.agent.hypervisor import HypervisorUnavailable
from enersis.agent.libvirt_hv import LibvirtHypervisor
from enersis.agent.sampler import Sampler
from tests.conftest import wait_for

URI = "test:///default"  # one in-memory node shared by every connection in this process


def domain_xml(name: str, vcpus: int = 1, mem_kib: int = 262144) -> str:
    return (f"<domain type='test'><name>{name}</name><memory>{mem_kib}</memory>"
            f"<vcpu>{vcpus}</vcpu><os><type>hvm</type></os></domain>")


@pytest.fixture
def rw() -> libvirt.virConnect:
    """A read-write connection to the same test node, to change it behind the adapter's back."""
    conn = libvirt.open(URI)
    made: list[str] = []
    conn.made = made  # type: ignore[attr-defined]
    yield conn
    for name in made:
        try:
            dom = conn.lookupByName(name)
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError:
            pass
    conn.close()


def start_domain(rw: libvirt.virConnect, vcpus: int = 1) -> str:
    name = f"agent-{uuid.uuid4().hex[:8]}"
    rw.made.append(name)  # type: ignore[attr-defined]
    rw.createXML(domain_xml(name, vcpus), 0)
    return name


def test_facts_and_domains_through_the_api() -> None:
    hv = LibvirtHypervisor(URI)
    try:
        facts = hv.facts()
        assert (facts.hypervisor_type, facts.cpus, facts.mhz) == ("Test", 16, 1400)
        assert facts.mem_total_kib == 3072 * 1024 and 0 < facts.mem_free_kib <= facts.mem_total_kib
        doms = {d.name: d for d in hv.read_domains()}
        t = doms["test"]  # the driver's built-in running domain
        assert (t.vcpus, t.state, t.mem_max_kib) == (2, libvirt.VIR_DOMAIN_RUNNING, 8 * 1024 * 1024)
        assert len(t.uuid) == 36 and t.cpu_time_ns > 0
    finally:
        hv.close()


def test_sampler_on_the_test_driver_reads_its_wall_clock_cpu_time() -> None:
    # The driver reports cpu time = wall clock for each domain: the built-in
    # 2-vCPU domain reads 50 % of its vCPUs and 1/16 of the 16-CPU node.
    hv = LibvirtHypervisor(URI)
    try:
        s = Sampler(hv, sample_interval_s=0.2, window_s=1.0)
        s.sample_once()
        time.sleep(0.2)
        st = s.sample_once()
        test = next(d for d in st.domains if d.reading.name == "test")
        assert test.measured
        assert test.cpu_vcpu_pct == pytest.approx(50, abs=5)
        assert test.cpu_node_pct == pytest.approx(100 / 16, abs=0.7)
    finally:
        hv.close()


def test_domains_appear_and_vanish_between_readings(rw: libvirt.virConnect) -> None:
    hv = LibvirtHypervisor(URI)
    try:
        s = Sampler(hv, sample_interval_s=0.1, window_s=1.0)
        before = {d.reading.name for d in s.sample_once().domains}
        name = start_domain(rw, vcpus=3)
        st = s.sample_once()
        new = next(d for d in st.domains if d.reading.name == name)
        assert not new.measured and new.reading.vcpus == 3  # no delta on its first reading
        time.sleep(0.05)
        assert next(d for d in s.sample_once().domains if d.reading.name == name).measured
        rw.lookupByName(name).destroy()
        names = {d.reading.name for d in s.sample_once().domains}
        assert name not in names and before <= names
    finally:
        hv.close()


class ListThenDestroy:
    """A real connection whose listing is followed by a domain's destruction, before info() is read."""

    def __init__(self, conn: libvirt.virConnect, victim: str, rw: libvirt.virConnect):
        self._conn, self._victim, self._rw = conn, victim, rw

    def __getattr__(self, name: str):
        return getattr(self._conn, name)

    def listAllDomains(self, flags: int = 0):
        doms = self._conn.listAllDomains(flags)
        self.listed = [d.name() for d in doms]
        self._rw.lookupByName(self._victim).destroy()
        return doms


def test_domain_vanishing_during_a_reading_is_skipped(rw: libvirt.virConnect) -> None:
    victim = start_domain(rw)
    proxies: list[ListThenDestroy] = []
    hv = LibvirtHypervisor(URI, open_connection=lambda uri: proxies.append(
        ListThenDestroy(libvirt.openReadOnly(uri), victim, rw)) or proxies[-1])
    try:
        names = {d.name for d in hv.read_domains()}  # the victim is listed, then gone when its info is read
        assert victim in proxies[0].listed
        assert victim not in names and "test" in names
        assert hv.connected
    finally:
        hv.close()


def test_lost_connection_is_reported_then_reconnected(rw: libvirt.virConnect) -> None:
    opened: list[libvirt.virConnect] = []

    def opener(uri: str) -> libvirt.virConnect:
        conn = libvirt.openReadOnly(uri)
        opened.append(conn)
        return conn

    hv = LibvirtHypervisor(URI, open_connection=opener, backoff_initial_s=0.05, backoff_max_s=0.2)
    try:
        s = Sampler(hv, sample_interval_s=0.1, window_s=1.0)
        assert s.sample_once().hypervisor_ok
        opened[0].close()  # the connection dies under the adapter (daemon restart, network cut)
        st = s.sample_once()
        assert not st.hypervisor_ok and "unreachable" in st.error
        assert "test" in {d.reading.name for d in st.domains}  # last inventory kept
        wait_for(lambda: hv.connected, 10, what="reconnect")
        assert len(opened) == 2 and hv.connects == 2
        st = s.sample_once()
        assert st.hypervisor_ok and st.error == ""
    finally:
        hv.close()


def test_unreachable_at_start_retries_with_backoff_and_close_stops_it() -> None:
    attempts: list[float] = []
    ok_after = 3

    def opener(uri: str) -> libvirt.virConnect:
        attempts.append(time.monotonic())
        if len(attempts) <= ok_after:
            # A real failure from libvirt: a daemon socket that does not exist.
            return libvirt.openReadOnly("qemu+unix:///system?socket=/nonexistent/enersis-test-sock")
        return libvirt.openReadOnly(uri)

    hv = LibvirtHypervisor(URI, open_connection=opener, backoff_initial_s=0.05, backoff_max_s=0.4)
    try:
        with pytest.raises(HypervisorUnavailable, match="unreachable: .*nonexistent"):
            hv.read_domains()
        wait_for(lambda: hv.connected, 10, what="reconnect after failures")
        gaps = [b - a for a, b in zip(attempts, attempts[1:])]
        assert len(attempts) == ok_after + 1
        assert gaps[-1] > gaps[0]  # exponential backoff
        assert hv.read_domains()
    finally:
        hv.close()

    # Never reachable: close() interrupts the backoff promptly, no thread left behind.
    hv2 = LibvirtHypervisor("qemu+unix:///system?socket=/nonexistent/enersis-test-sock",
                            backoff_initial_s=5, backoff_max_s=30)
    with pytest.raises(HypervisorUnavailable):
        hv2.facts()
    t0 = time.monotonic()
    hv2.close()
    assert time.monotonic() - t0 < 3
    assert not any(t.name == "libvirt-reconnect" and t.is_alive() for t in threading.enumerate()
                   if t is getattr(hv2, "_reconnecting", None))
