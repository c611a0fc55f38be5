"""The simulated hypervisor: trace arithmetic, shared state across processes, migrations, power."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from enersis.agent.hypervisor import HypervisorUnavailable, MigrationTarget
from enersis.agent.simulated import (
    RUNNING,
    SHUTOFF,
    TRACE_STEP_S,
    SimulatedCluster,
    SimulatedHypervisor,
    SimulationError,
    Trace,
    parse_uri,
)
from tests.conftest import wait_for

# The issue's ../shared/traces/planetlab, next to the repository.
TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces" / "planetlab"
needs_traces = pytest.mark.skipif(not (TRACES / "20110303").is_dir(), reason=f"PlanetLab traces not found at {TRACES}")


class FakeClock:
    """A clock the test moves by hand; `sleep` advances it (so migrations finish without waiting)."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def write_trace(tmp: Path, name: str, values: list[int]) -> str:
    p = tmp / name
    p.write_text("".join(f"{v}\n" for v in values))
    return str(p)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def flat_cluster(tmp_path: Path, clock: FakeClock) -> SimulatedCluster:
    """3 nodes (node-3 off), 4 VMs with constant traces 20/40/60/80 %, 1 GiB each, speed-up 10."""
    traces = [write_trace(tmp_path, f"t{v}", [v] * 288) for v in (20, 40, 60, 80)]
    return SimulatedCluster.create(tmp_path / "cluster", nodes=3, vms=4, traces=traces, speedup=10,
                                   powered_off=["node-3"], cpus=4, mem_mib=4096, vm_mem_mib=1024,
                                   migration_mib_s=512, clock=clock)


# ---------------------------------------------------------------- traces (pure)


def test_trace_interpolates_and_integrates_exactly() -> None:
    tr = Trace.from_values([0, 100, 50])
    assert tr.pct_at(0) == 0
    assert tr.pct_at(TRACE_STEP_S / 2) == pytest.approx(50)
    assert tr.pct_at(TRACE_STEP_S * 2.5) == pytest.approx(25)  # wraps: 50 -> 0
    assert tr.pct_at(tr.period_s + TRACE_STEP_S) == pytest.approx(100)  # repeats
    # The closed form matches a fine numeric integration, across a wrap.
    a, b, n = 100.0, tr.period_s * 1.7, 20000
    h = (b - a) / n
    numeric = sum(tr.pct_at(a + (i + 0.5) * h) for i in range(n)) * h
    assert tr.integral(b) - tr.integral(a) == pytest.approx(numeric, rel=1e-6)


def test_trace_values_are_clamped_and_bad_files_rejected(tmp_path: Path) -> None:
    assert Trace.from_values([-5, 250]).values == (0.0, 100.0)
    with pytest.raises(SimulationError, match="one number per line"):
        Trace.load(write_trace(tmp_path, "bad", ["x"]))  # type: ignore[list-item]
    with pytest.raises(SimulationError, match="cannot be read"):
        Trace.load(tmp_path / "missing")


@needs_traces
def test_real_planetlab_file_with_spaces_in_its_name_loads() -> None:
    files = [f for f in (TRACES / "20110303").iterdir() if " " in f.name]
    if not files:
        pytest.skip("no PlanetLab trace with a space in its name here")
    tr = Trace.load(files[0])
    assert len(tr.values) == 288 and all(0 <= v <= 100 for v in tr.values)


# ---------------------------------------------------------------- cluster and hypervisor


def test_uri_parsing() -> None:
    assert parse_uri("sim:///tmp/x") == Path("/tmp/x")
    with pytest.raises(ValueError, match="absolute"):
        parse_uri("sim://relative/x")
    with pytest.raises(ValueError, match="not a simulated"):
        parse_uri("qemu:///system")


def test_create_places_round_robin_and_reports_facts(flat_cluster: SimulatedCluster) -> None:
    assert flat_cluster.placement() == {"vm-1": "node-1", "vm-2": "node-2", "vm-3": "node-1", "vm-4": "node-2"}
    facts = flat_cluster.hypervisor("node-1").facts()
    assert (facts.hypervisor_type, facts.cpus, facts.mem_total_kib) == ("Simulated", 4, 4096 * 1024)
    assert facts.mem_free_kib == 2048 * 1024
    with pytest.raises(HypervisorUnavailable, match="powered off"):
        flat_cluster.hypervisor("node-3").read_domains()
    with pytest.raises(SimulationError, match="not in the simulated cluster"):
        flat_cluster.hypervisor("node-9")


def test_create_refuses_what_does_not_fit(tmp_path: Path) -> None:
    tr = [write_trace(tmp_path, "t", [10])]
    with pytest.raises(SimulationError, match="fits on no powered-on node"):
        SimulatedCluster.create(tmp_path / "c1", nodes=1, vms=3, traces=tr, mem_mib=2048, vm_mem_mib=1024)
    with pytest.raises(SimulationError, match="unknown nodes"):
        SimulatedCluster.create(tmp_path / "c2", nodes=2, vms=1, traces=tr, powered_off=["node-7"])
    with pytest.raises(SimulationError, match="not a simulated cluster"):
        SimulatedCluster(tmp_path / "nothing")


def test_cpu_time_integrates_the_trace(flat_cluster: SimulatedCluster, clock: FakeClock) -> None:
    hv = flat_cluster.hypervisor("node-1")
    before = {d.name: d for d in hv.read_domains()}
    clock.t += 2.0
    after = {d.name: d for d in hv.read_domains()}
    assert set(after) == {"vm-1", "vm-3"}
    for name, pct in (("vm-1", 20), ("vm-3", 60)):
        delta_s = (after[name].cpu_time_ns - before[name].cpu_time_ns) / 1e9
        assert delta_s == pytest.approx(2.0 * pct / 100, rel=1e-9)  # 1 vCPU at pct % for 2 s
        assert flat_cluster.vm_cpu_pct(name) == pytest.approx(pct)
        assert after[name].state == RUNNING and after[name].vcpus == 1


@needs_traces
def test_real_traces_follow_their_values(tmp_path: Path, clock: FakeClock) -> None:
    day = TRACES / "20110306"
    c = SimulatedCluster.create(tmp_path / "c", nodes=2, vms=6, trace_dir=day, speedup=300, seed=7, clock=clock)
    hv = c.hypervisor("node-1")
    names = [d.name for d in hv.read_domains()]
    for step in range(3):
        before = {d.name: d.cpu_time_ns for d in hv.read_domains()}
        expected = {n: c.vm_cpu_pct(n) for n in names}
        clock.t += 0.01  # 3 simulated seconds: the trace barely moves
        after = {d.name: d.cpu_time_ns for d in hv.read_domains()}
        for n in names:
            assert (after[n] - before[n]) / 1e9 / 0.01 * 100 == pytest.approx(expected[n], abs=0.5)
        clock.t += 1.0  # 300 simulated seconds: next trace point


# ---------------------------------------------------------------- migrations


def target(c: SimulatedCluster, node: str) -> MigrationTarget:
    return MigrationTarget(node, f"sim://{c.path}")


def test_migration_moves_the_vm_after_a_time_proportional_to_memory(flat_cluster: SimulatedCluster,
                                                                    clock: FakeClock) -> None:
    src = flat_cluster.hypervisor("node-1", sleep=clock.sleep)
    dst = flat_cluster.hypervisor("node-2")
    assert src.has_domain("vm-1") and not src.target_has_domain("vm-1", target(flat_cluster, "node-2"))
    out = src.migrate("vm-1", target(flat_cluster, "node-2"), timeout_s=60)
    assert out.ok, out.error
    assert out.duration_s == pytest.approx(1024 / 512, abs=0.11)  # 1 GiB at 512 MiB/s
    assert out.downtime_ms == 30
    assert flat_cluster.placement()["vm-1"] == "node-2"
    assert not src.has_domain("vm-1") and dst.has_domain("vm-1")
    assert src.target_has_domain("vm-1", target(flat_cluster, "node-2"))
    # A new process on the target: cpu time restarts from zero.
    assert next(d for d in dst.read_domains() if d.name == "vm-1").cpu_time_ns == 0
    # Asking again is a clear failure, not a second copy.
    again = src.migrate("vm-1", target(flat_cluster, "node-2"), timeout_s=60)
    assert not again.ok and "not running on node-1" in again.error
    assert sum(1 for n in flat_cluster.placement() if n == "vm-1") == 1


def test_migration_refusals(flat_cluster: SimulatedCluster, clock: FakeClock) -> None:
    src = flat_cluster.hypervisor("node-1", sleep=clock.sleep)
    off = src.migrate("vm-1", target(flat_cluster, "node-3"), timeout_s=60)
    assert not off.ok and off.retryable and "powered off" in off.error
    assert not src.migrate("vm-1", target(flat_cluster, "node-1"), timeout_s=60).ok
    assert "unknown target" in src.migrate("vm-1", target(flat_cluster, "node-9"), timeout_s=60).error
    assert "not running on node-1" in src.migrate("vm-2", target(flat_cluster, "node-2"), timeout_s=60).error
    # node-2 has 2 GiB free: two more 1 GiB VMs fill it, a third does not fit.
    assert src.migrate("vm-1", target(flat_cluster, "node-2"), timeout_s=60).ok
    assert src.migrate("vm-3", target(flat_cluster, "node-2"), timeout_s=60).ok
    flat_cluster.set_powered("node-3", True)
    n3 = flat_cluster.hypervisor("node-3", sleep=clock.sleep)
    full = flat_cluster.hypervisor("node-2", sleep=clock.sleep)
    assert full.migrate("vm-1", target(flat_cluster, "node-3"), timeout_s=60).ok
    assert n3.has_domain("vm-1")


def test_not_enough_memory_on_target(tmp_path: Path, clock: FakeClock) -> None:
    tr = [write_trace(tmp_path, "t", [10])]
    c = SimulatedCluster.create(tmp_path / "c", nodes=2, vms=3, traces=tr, mem_mib=2048, vm_mem_mib=1024, clock=clock)
    # node-1: vm-1, vm-3 (full); node-2: vm-2 (1 GiB free)
    out = c.hypervisor("node-2", sleep=clock.sleep).migrate("vm-2", target(c, "node-1"), timeout_s=60)
    assert not out.ok and not out.retryable and "not enough free memory" in out.error


def test_timeout_aborts_and_the_vm_stays(flat_cluster: SimulatedCluster, clock: FakeClock) -> None:
    src = flat_cluster.hypervisor("node-1", sleep=clock.sleep)
    out = src.migrate("vm-1", target(flat_cluster, "node-2"), timeout_s=0.5)
    assert not out.ok and out.retryable and "timed out" in out.error
    assert flat_cluster.placement()["vm-1"] == "node-1" and not src.job_active("vm-1")
    clock.t += 10  # nothing completes later behind our back
    assert flat_cluster.placement()["vm-1"] == "node-1"


def test_abort_from_another_thread(flat_cluster: SimulatedCluster) -> None:
    # Real clock here: one thread migrates, the other aborts it.
    c = SimulatedCluster(flat_cluster.path)
    src = c.hypervisor("node-1")
    results = []
    t = threading.Thread(target=lambda: results.append(src.migrate("vm-1", target(c, "node-2"), timeout_s=60)))
    t.start()
    wait_for(lambda: src.job_active("vm-1"), 5, what="migration job")
    src.abort("vm-1")
    t.join(10)
    assert results and not results[0].ok and "aborted" in results[0].error
    assert c.placement()["vm-1"] == "node-1"


def test_target_powered_off_during_migration_fails_and_keeps_the_vm(flat_cluster: SimulatedCluster,
                                                                     clock: FakeClock) -> None:
    flat_cluster.set_powered("node-3", True)

    def sleep(s: float) -> None:
        flat_cluster.set_powered("node-3", False)  # no VM there yet, so allowed
        clock.sleep(s)

    out = flat_cluster.hypervisor("node-1", sleep=sleep).migrate("vm-1", target(flat_cluster, "node-3"), timeout_s=60)
    assert not out.ok and "powered off" in out.error
    assert flat_cluster.placement()["vm-1"] == "node-1"


def _migrate_in_child(path: str, ready: "multiprocessing.synchronize.Event") -> None:
    hv = SimulatedHypervisor(SimulatedCluster(path), "node-1", sleep=lambda s: (ready.set(), __import__("time").sleep(s)))
    hv.migrate("vm-1", MigrationTarget("node-2", f"sim://{path}"), timeout_s=60)


def test_migration_completes_even_if_the_executor_process_dies(flat_cluster: SimulatedCluster) -> None:
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_migrate_in_child, args=(str(flat_cluster.path), ready))
    child.start()
    assert ready.wait(10)
    os.kill(child.pid, signal.SIGKILL)
    child.join(5)
    # Another process (this one, real clock) sees the job, then the VM on the target, exactly once.
    c = SimulatedCluster(flat_cluster.path)
    src = c.hypervisor("node-1")
    assert src.job_active("vm-1") or c.placement()["vm-1"] == "node-2"
    wait_for(lambda: c.placement()["vm-1"] == "node-2", 10, what="migration to complete without its caller")
    assert not src.job_active("vm-1")
    st = c.state()
    assert [h["event"] for h in st["history"] if h.get("vm") == "vm-1"] == ["migration-started", "migrated"]


# ---------------------------------------------------------------- power, reachability, VMs


def test_power_off_refuses_with_running_vms_unless_forced(flat_cluster: SimulatedCluster) -> None:
    with pytest.raises(SimulationError, match="running VMs vm-2, vm-4"):
        flat_cluster.set_powered("node-2", False)
    boot = flat_cluster.hypervisor("node-3").boot_id()
    flat_cluster.set_powered("node-3", True)
    assert flat_cluster.hypervisor("node-3").boot_id() != boot  # a new boot
    assert flat_cluster.hypervisor("node-3").read_domains() == []
    flat_cluster.set_powered("node-2", False, force=True)
    st = flat_cluster.state()
    assert st["vms"]["vm-2"]["state"] == SHUTOFF and st["vms"]["vm-2"]["lost"]
    assert "vm-2" not in flat_cluster.placement()
    events = [(h["event"], h.get("node"), h.get("vm")) for h in flat_cluster.history()]
    assert events == [("powered-on", "node-3", None), ("vm-killed-by-power-off", "node-2", "vm-2"),
                      ("vm-killed-by-power-off", "node-2", "vm-4"), ("powered-off", "node-2", None)]
    # The history is an append-only file of its own: the state every agent reads each second stays small.
    assert "history" not in json.loads((flat_cluster.path / "cluster.json").read_text())


def test_unreachable_hypervisor_and_vm_start_stop(flat_cluster: SimulatedCluster) -> None:
    hv = flat_cluster.hypervisor("node-1")
    flat_cluster.set_reachable("node-1", False)
    with pytest.raises(HypervisorUnavailable, match="does not answer"):
        hv.read_domains()
    with pytest.raises(HypervisorUnavailable):
        hv.facts()
    flat_cluster.set_reachable("node-1", True)
    assert len(hv.read_domains()) == 2
    flat_cluster.stop_vm("vm-1")
    assert [d.name for d in hv.read_domains()] == ["vm-3"]
    flat_cluster.start_vm("vm-1", "node-2")
    assert flat_cluster.placement()["vm-1"] == "node-2"
    with pytest.raises(SimulationError, match="already running"):
        flat_cluster.start_vm("vm-1")


@needs_traces
def test_command_line(tmp_path: Path) -> None:
    d = tmp_path / "cli"
    run = lambda *a: subprocess.run([sys.executable, "-m", "enersis.agent.simulated", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    r = run("init", str(d), "--nodes", "3", "--vms", "4", "--trace-dir", str(TRACES / "20110309"),
            "--speedup", "60", "--powered-off", "node-3")
    assert r.returncode == 0, r.stderr
    assert f'uri = "sim://{d}"' in r.stdout
    r = run("show", str(d))
    assert r.returncode == 0 and "node-3       off" in r.stdout and "vm-1" in r.stdout
    st = json.loads(run("show", str(d), "--json").stdout)
    assert sorted(st["vms"]) == ["vm-1", "vm-2", "vm-3", "vm-4"] and st["speedup"] == 60
    r = run("power", str(d), "node-1", "off")
    assert r.returncode == 1 and "refusing to power off node-1" in r.stderr
    assert run("power", str(d), "node-3", "on").returncode == 0
    r = run("init", str(d), "--nodes", "1", "--vms", "1", "--trace-dir", str(TRACES / "20110309"))
    assert r.returncode == 1 and "already holds" in r.stderr


def _toggle_in_child(path: str, vm: str, times: int) -> None:
    c = SimulatedCluster(path)
    for _ in range(times):
        c.stop_vm(vm)
        c.start_vm(vm)


def test_concurrent_processes_lose_no_update(tmp_path: Path) -> None:
    tr = [write_trace(tmp_path, "t", [50])]
    c = SimulatedCluster.create(tmp_path / "c", nodes=2, vms=4, traces=tr)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_toggle_in_child, args=(str(c.path), f"vm-{i}", 25)) for i in range(1, 5)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    # Every read-modify-write held the lock: all 200 changes are in the history, every VM runs.
    events = c.history()
    assert len(events) == 4 * 25 * 2
    assert sorted(c.placement()) == ["vm-1", "vm-2", "vm-3", "vm-4"]
    for i in range(1, 5):
        mine = [e["event"] for e in events if e["vm"] == f"vm-{i}"]
        assert mine == ["stopped", "started"] * 25
