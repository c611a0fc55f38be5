"""A simulated hypervisor: a whole cluster of nodes on one machine, for the demo and tests.

Kept apart from the real adapter (libvirt_hv.py): nothing here imports libvirt.

A *cluster folder* is shared by every simulated node, across processes:
``cluster.json`` (the state) guarded by ``cluster.lock`` (an fcntl lock).  It
says which VM is on which node, its PlanetLab trace, memory and vCPUs, which
nodes are powered, and which migrations are in flight.

CPU time is *integrated* from the trace, so the agent's arithmetic is exactly
the one it does on real libvirt: a VM's cumulative ``cpu_time_ns`` grows at
``trace% / 100 × vcpus`` CPU-seconds per second.  Simulated time runs
``speedup`` times faster than the real (monotonic) clock; a trace has one
integer percentage every 300 simulated seconds, linearly interpolated and
repeated when it ends.  As with a real QEMU process, a VM's cpu time restarts
from zero when it starts on a node (after a migration, too).

Migrations take ``mem_mib / migration_mib_s`` real seconds (capped by the
command's bandwidth).  They complete by the clock, not by the caller: any
process that touches the state settles migrations whose time is up, so a
migration finishes even if the executor that started it died — as a libvirt
migration job outlives its client.  A migration whose target is off or
unreachable at the end fails and the VM stays on the source.

Command line (``python -m enersis.agent.simulated --help``)::

    init DIR --nodes N --vms M --trace-dir D --speedup S [--powered-off node-5,...]
    show DIR [--json]
    power DIR NODE on|off [--force]
    reachable DIR NODE yes|no
    start DIR VM [--node NODE]  /  stop DIR VM

Agents use it with ``[hypervisor] uri = "sim:///abs/path/to/cluster-dir"``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .hypervisor import (
    DomainReading,
    HypervisorUnavailable,
    MigrationOutcome,
    MigrationTarget,
    NodeFacts,
)

SCHEME = "sim://"
STATE_FILE = "cluster.json"
LOCK_FILE = "cluster.lock"
TRACE_STEP_S = 300.0  # PlanetLab: one sample every 5 minutes
RUNNING, SHUTOFF = 1, 5  # libvirt virDomainState
HISTORY_FILE = "history.jsonl"  # append-only events (migrations, power): kept out of the state read every second


class SimulationError(RuntimeError):
    """A request the simulated cluster cannot honour (unknown node, not enough memory, ...)."""


def parse_uri(uri: str) -> Path:
    """``sim:///abs/path`` -> Path('/abs/path')."""
    if not uri.startswith(SCHEME):
        raise ValueError(f"not a simulated hypervisor URI: {uri!r} (expected sim:///abs/path/to/cluster-dir)")
    path = uri[len(SCHEME):]
    if not path.startswith("/"):
        raise ValueError(f"simulated hypervisor URI {uri!r}: the cluster folder must be an absolute path (sim:///abs/path)")
    return Path(path)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


# ---------------------------------------------------------------- traces (pure)


@dataclass(frozen=True)
class Trace:
    """A PlanetLab CPU trace: values in %, one per TRACE_STEP_S, with its running integral."""

    values: tuple[float, ...]
    prefix: tuple[float, ...]  # prefix[k] = ∫ u ds over [0, k·step] in %·s

    @classmethod
    def from_values(cls, values: list[float]) -> "Trace":
        if not values:
            raise ValueError("a trace needs at least one value")
        vals = tuple(min(100.0, max(0.0, float(v))) for v in values)
        n = len(vals)
        prefix = [0.0]
        for i in range(n):
            prefix.append(prefix[-1] + (vals[i] + vals[(i + 1) % n]) / 2 * TRACE_STEP_S)
        return cls(vals, tuple(prefix))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Trace":
        p = Path(path)
        try:
            lines = p.read_text().split()
        except OSError as exc:
            raise SimulationError(f"trace {str(p)!r} cannot be read: {exc}") from None
        try:
            values = [float(x) for x in lines]
        except ValueError:
            raise SimulationError(f"trace {str(p)!r}: expected one number per line") from None
        if not values:
            raise SimulationError(f"trace {str(p)!r} is empty")
        return cls.from_values(values)

    @property
    def period_s(self) -> float:
        return len(self.values) * TRACE_STEP_S

    def pct_at(self, sim_s: float) -> float:
        """Interpolated CPU % (of the VM's own vCPUs) at simulated time sim_s."""
        n = len(self.values)
        r = sim_s % self.period_s
        k = int(r // TRACE_STEP_S)
        x = (r - k * TRACE_STEP_S) / TRACE_STEP_S
        a, b = self.values[k % n], self.values[(k + 1) % n]
        return a + (b - a) * x

    def integral(self, sim_s: float) -> float:
        """∫ pct ds over [0, sim_s], in %·s (exact for the piecewise-linear trace)."""
        n = len(self.values)
        q, r = divmod(sim_s, self.period_s)
        k = min(int(r // TRACE_STEP_S), n - 1)
        x = r - k * TRACE_STEP_S
        a, b = self.values[k], self.values[(k + 1) % n]
        partial = a * x + (b - a) * x * x / (2 * TRACE_STEP_S)
        return q * self.prefix[n] + self.prefix[k] + partial


_TRACES: dict[str, Trace] = {}


def trace_for(path: str) -> Trace:
    trace = _TRACES.get(path)
    if trace is None:
        trace = _TRACES[path] = Trace.load(path)
    return trace


# ---------------------------------------------------------------- the shared cluster state


class SimulatedCluster:
    """The cluster folder: every read and change goes through an fcntl lock on cluster.lock.

    `clock` must be the same for every process sharing the folder; the default,
    time.monotonic, is system-wide on Linux.  A folder made before a reboot is
    re-based on first use (its times would be meaningless).
    """

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self.clock = clock
        self._check_boot = clock is time.monotonic
        if not (self.path / STATE_FILE).exists():
            raise SimulationError(
                f"{self.path} is not a simulated cluster (no {STATE_FILE}); create one with "
                f"`python -m enersis.agent.simulated init {self.path} --nodes N --vms M --trace-dir D --speedup S`"
            )

    # -- creation

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        nodes: int | list[str],
        vms: int,
        trace_dir: str | os.PathLike[str] | None = None,
        traces: list[str] | None = None,
        speedup: float = 1.0,
        powered_off: list[str] | tuple[str, ...] = (),
        cpus: int = 4,
        mhz: int = 2000,
        mem_mib: int = 8192,
        vm_vcpus: int = 1,
        vm_mem_mib: int = 1024,
        migration_mib_s: float = 1024.0,
        downtime_ms: float = 30.0,
        start_s: float = 0.0,
        seed: int | None = None,
        overwrite: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> "SimulatedCluster":
        """Create a cluster folder; VMs are placed round-robin on the powered-on nodes, by memory."""
        p = Path(path).resolve()
        if (p / STATE_FILE).exists() and not overwrite:
            raise SimulationError(f"{p} already holds a simulated cluster (use overwrite / --force to replace it)")
        if speedup <= 0:
            raise SimulationError("speedup must be > 0")
        if migration_mib_s <= 0:
            raise SimulationError("migration_mib_s must be > 0")
        node_names = list(nodes) if isinstance(nodes, list) else [f"node-{i}" for i in range(1, nodes + 1)]
        if not node_names:
            raise SimulationError("a cluster needs at least one node")
        unknown = sorted(set(powered_off) - set(node_names))
        if unknown:
            raise SimulationError(f"--powered-off names unknown nodes: {', '.join(unknown)} (nodes: {', '.join(node_names)})")
        files = list(traces or [])
        if trace_dir is not None:
            root = Path(trace_dir)
            if not root.is_dir():
                raise SimulationError(f"trace folder {str(root)!r} does not exist")
            files += sorted(str(f.resolve()) for f in root.rglob("*") if f.is_file())
        if vms and not files:
            raise SimulationError("no trace files: give trace_dir (a folder of PlanetLab files) or traces")
        if seed is not None and files:
            chosen = random.Random(seed).sample(files, k=min(vms, len(files)))
            files = chosen or files
        now = clock()
        state: dict[str, Any] = {
            "format": 1,
            "boot_id": _boot_id(),
            "epoch": now,
            "speedup": float(speedup),
            "start_s": float(start_s),
            "migration_mib_s": float(migration_mib_s),
            "downtime_ms": float(downtime_ms),
            "nodes": {},
            "vms": {},
        }
        for name in node_names:
            state["nodes"][name] = {
                "cpus": int(cpus),
                "mhz": int(mhz),
                "mem_kib": int(mem_mib) * 1024,
                "powered": name not in powered_off,
                "reachable": True,
                "boot_id": uuid.uuid4().hex,
            }
        hosts = [n for n in node_names if n not in powered_off]
        if vms and not hosts:
            raise SimulationError("every node is powered off: nowhere to place the VMs")
        free = {n: state["nodes"][n]["mem_kib"] for n in hosts}
        for i in range(1, vms + 1):
            name = f"vm-{i}"
            need = int(vm_mem_mib) * 1024
            # Round-robin from node i, skipping nodes without memory left.
            order = hosts[(i - 1) % len(hosts):] + hosts[: (i - 1) % len(hosts)]
            node = next((n for n in order if free[n] >= need), None)
            if node is None:
                raise SimulationError(f"{name} ({vm_mem_mib} MiB) fits on no powered-on node: add nodes or memory")
            free[node] -= need
            trace = files[(i - 1) % len(files)]
            trace_for(trace)  # fail now on an unreadable trace, not in an agent later
            state["vms"][name] = {
                "uuid": str(uuid.uuid4()),
                "node": node,
                "trace": trace,
                "vcpus": int(vm_vcpus),
                "mem_kib": need,
                "state": RUNNING,
                "started_at": now,
                "migration": None,
            }
        p.mkdir(parents=True, exist_ok=True)
        (p / HISTORY_FILE).write_text("")
        _write_state(p, state)
        return cls(p, clock=clock)

    # -- locking and settling

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Exclusive access to the state; it is written back if changed."""
        with open(self.path / LOCK_FILE, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                raw = (self.path / STATE_FILE).read_text()
                state = json.loads(raw)
                state["_events"] = []
                self._rebase_after_reboot(state)
                self._settle(state, self.clock())
                yield state
                events = state.pop("_events")
                if events:
                    with open(self.path / HISTORY_FILE, "a") as fh:
                        fh.writelines(json.dumps(e, sort_keys=True) + "\n" for e in events)
                new = _dumps(state)
                if new != raw:
                    _write_state(self.path, state, text=new)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _rebase_after_reboot(self, state: dict[str, Any]) -> None:
        if not self._check_boot or state.get("boot_id") == _boot_id():
            return
        now = self.clock()
        state["boot_id"] = _boot_id()
        state["epoch"] = now
        for vm in state["vms"].values():
            vm["started_at"] = now
            vm["migration"] = None

    def _settle(self, state: dict[str, Any], now: float) -> None:
        """Finish every migration whose time is up (whoever started it)."""
        for name, vm in sorted(state["vms"].items()):
            mig = vm.get("migration")
            if not mig or mig["ends_at"] > now:
                continue
            target = state["nodes"].get(mig["target"])
            vm["migration"] = None
            if target is None or not target["powered"] or not target["reachable"]:
                why = "unknown" if target is None else ("powered off" if not target["powered"] else "unreachable")
                vm["last_error"] = f"migration to {mig['target']} failed: target node {why}"
                self._log(state, mig["ends_at"], "migration-failed", vm=name, source=vm["node"], target=mig["target"])
                continue
            self._log(state, mig["ends_at"], "migrated", vm=name, source=vm["node"], target=mig["target"])
            vm["node"] = mig["target"]
            vm["started_at"] = mig["ends_at"]  # a new QEMU process on the target: cpu time restarts
            vm["last_error"] = ""

    @staticmethod
    def _log(state: dict[str, Any], at: float, event: str, **details: Any) -> None:
        state["_events"].append({"at": at, "event": event, **details})

    # -- reading

    def state(self, *, history: bool = True) -> dict[str, Any]:
        """A settled copy of the whole state (for tools, tests and the demo), with its event history."""
        with self._locked() as st:
            copy = json.loads(json.dumps({k: v for k, v in st.items() if k != "_events"}))
        if history:
            copy["history"] = self.history()
        return copy

    def history(self) -> list[dict[str, Any]]:
        """Every event so far, oldest first: migrations, power changes, VMs started, stopped or killed."""
        with open(self.path / LOCK_FILE, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            try:
                lines = (self.path / HISTORY_FILE).read_text().splitlines()
            except FileNotFoundError:
                lines = []
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return [json.loads(line) for line in lines if line.strip()]

    def placement(self) -> dict[str, str]:
        """VM -> node, for every VM that is running (a VM being migrated is still on its source)."""
        st = self.state(history=False)
        return {name: vm["node"] for name, vm in sorted(st["vms"].items()) if vm["state"] == RUNNING}

    def sim_time_s(self, state: dict[str, Any], t: float) -> float:
        return (t - state["epoch"]) * state["speedup"] + state["start_s"]

    def vm_cpu_pct(self, vm: str) -> float:
        """The trace's value for `vm` now, in % of its own vCPUs (what the agent should measure)."""
        with self._locked() as st:
            v = self._vm(st, vm)
            return trace_for(v["trace"]).pct_at(self.sim_time_s(st, self.clock()))

    def cpu_time_ns(self, state: dict[str, Any], vm: dict[str, Any], t: float) -> int:
        """Cumulative CPU time of `vm` since it started on its current node."""
        trace = trace_for(vm["trace"])
        s0 = self.sim_time_s(state, vm["started_at"])
        s1 = self.sim_time_s(state, max(t, vm["started_at"]))
        # d(sim)/d(real) = speedup, so ∫ pct dt_real = ∫ pct ds / speedup.
        cpu_s = (trace.integral(s1) - trace.integral(s0)) / state["speedup"] / 100.0 * vm["vcpus"]
        return int(round(cpu_s * 1e9))

    # -- changing (tools, the power stand-in, tests)

    @staticmethod
    def _node(st: dict[str, Any], node: str) -> dict[str, Any]:
        try:
            return st["nodes"][node]
        except KeyError:
            raise SimulationError(f"unknown node {node!r} (nodes: {', '.join(sorted(st['nodes']))})") from None

    @staticmethod
    def _vm(st: dict[str, Any], vm: str) -> dict[str, Any]:
        try:
            return st["vms"][vm]
        except KeyError:
            raise SimulationError(f"unknown VM {vm!r}") from None

    def set_powered(self, node: str, on: bool, *, force: bool = False) -> None:
        """Power a node on (new boot id) or off.  Off refuses while a VM runs there, unless forced.

        Forcing it off kills its VMs (state shutoff, marked lost): the demo and
        tests use that to show what the safety rules prevent.
        """
        with self._locked() as st:
            n = self._node(st, node)
            now = self.clock()
            if on:
                if not n["powered"]:
                    n["powered"] = True
                    n["boot_id"] = uuid.uuid4().hex
                    self._log(st, now, "powered-on", node=node)
                return
            if not n["powered"]:
                return
            running = sorted(name for name, vm in st["vms"].items() if vm["node"] == node and vm["state"] == RUNNING)
            if running and not force:
                raise SimulationError(f"refusing to power off {node}: running VMs {', '.join(running)} (force to kill them)")
            for name in running:
                vm = st["vms"][name]
                vm["state"] = SHUTOFF
                vm["migration"] = None
                vm["lost"] = True
                self._log(st, now, "vm-killed-by-power-off", vm=name, node=node)
            n["powered"] = False
            self._log(st, now, "powered-off", node=node, forced=bool(running))

    def set_reachable(self, node: str, reachable: bool) -> None:
        """Make a node's hypervisor answer or not (a libvirtd that died), without powering it off."""
        with self._locked() as st:
            self._node(st, node)["reachable"] = bool(reachable)

    def start_vm(self, vm: str, node: str | None = None) -> None:
        with self._locked() as st:
            v = self._vm(st, vm)
            target = node or v["node"]
            n = self._node(st, target)
            if v["state"] == RUNNING:
                raise SimulationError(f"{vm} is already running on {v['node']}")
            if not n["powered"]:
                raise SimulationError(f"cannot start {vm} on {target}: the node is powered off")
            if _free_kib(st, target) < v["mem_kib"]:
                raise SimulationError(f"cannot start {vm} on {target}: not enough free memory")
            now = self.clock()
            v.update(node=target, state=RUNNING, started_at=now, migration=None, lost=False)
            self._log(st, now, "started", vm=vm, node=target)

    def stop_vm(self, vm: str) -> None:
        with self._locked() as st:
            v = self._vm(st, vm)
            if v["state"] != RUNNING:
                return
            now = self.clock()
            v.update(state=SHUTOFF, migration=None)
            self._log(st, now, "stopped", vm=vm, node=v["node"])

    def hypervisor(self, node: str, *, sleep: Callable[[float], None] = time.sleep) -> "SimulatedHypervisor":
        return SimulatedHypervisor(self, node, sleep=sleep)


def _free_kib(st: dict[str, Any], node: str) -> int:
    used = sum(vm["mem_kib"] for vm in st["vms"].values() if vm["node"] == node and vm["state"] == RUNNING)
    # Memory reserved by migrations coming in, as libvirt reserves it on the target.
    used += sum(vm["mem_kib"] for vm in st["vms"].values() if (vm.get("migration") or {}).get("target") == node)
    return st["nodes"][node]["mem_kib"] - used


def _dumps(state: dict[str, Any]) -> str:
    return json.dumps(state, separators=(",", ":"), sort_keys=True)


def _write_state(path: Path, state: dict[str, Any], *, text: str | None = None) -> None:
    tmp = path / f".{STATE_FILE}.{os.getpid()}.tmp"
    tmp.write_text(text if text is not None else _dumps(state))
    os.replace(tmp, path / STATE_FILE)


# ---------------------------------------------------------------- one node's view: Hypervisor + Migrator


class SimulatedHypervisor:
    """One simulated node, implementing both `Hypervisor` and `Migrator` (hypervisor.py)."""

    def __init__(self, cluster: SimulatedCluster, node: str, *, sleep: Callable[[float], None] = time.sleep):
        self.cluster = cluster
        self.node = node
        self._sleep = sleep
        st = cluster.state(history=False)
        if node not in st["nodes"]:
            raise SimulationError(f"node {node!r} is not in the simulated cluster {cluster.path} "
                                  f"(nodes: {', '.join(sorted(st['nodes']))})")

    @classmethod
    def from_uri(cls, uri: str, node: str, **kw: Any) -> "SimulatedHypervisor":
        return cls(SimulatedCluster(parse_uri(uri)), node, **kw)

    def _up(self, st: dict[str, Any]) -> dict[str, Any]:
        n = st["nodes"][self.node]
        if not n["powered"]:
            raise HypervisorUnavailable(f"simulated node {self.node} is powered off")
        if not n["reachable"]:
            raise HypervisorUnavailable(f"simulated hypervisor of {self.node} does not answer")
        return n

    # -- Hypervisor

    def facts(self) -> NodeFacts:
        with self.cluster._locked() as st:
            n = self._up(st)
            return NodeFacts("Simulated", n["cpus"], n["mhz"], n["mem_kib"], max(0, _free_kib(st, self.node)))

    def read_domains(self) -> list[DomainReading]:
        with self.cluster._locked() as st:
            self._up(st)
            now = self.cluster.clock()
            return [
                DomainReading(name, vm["uuid"], RUNNING, vm["vcpus"], vm["mem_kib"], vm["mem_kib"],
                              self.cluster.cpu_time_ns(st, vm, now))
                for name, vm in sorted(st["vms"].items())
                if vm["node"] == self.node and vm["state"] == RUNNING
            ]

    def boot_id(self) -> str:
        with self.cluster._locked() as st:
            return st["nodes"][self.node]["boot_id"]

    def close(self) -> None:
        pass

    # -- Migrator

    def has_domain(self, vm: str) -> bool:
        with self.cluster._locked() as st:
            self._up(st)
            v = st["vms"].get(vm)
            return bool(v and v["node"] == self.node and v["state"] == RUNNING)

    def target_has_domain(self, vm: str, target: MigrationTarget) -> bool:
        with self.cluster._locked() as st:
            v = st["vms"].get(vm)
            return bool(v and v["node"] == target.node and v["state"] == RUNNING and not v.get("migration"))

    def job_active(self, vm: str) -> bool:
        with self.cluster._locked() as st:
            v = st["vms"].get(vm)
            return bool(v and v["node"] == self.node and v.get("migration"))

    def abort(self, vm: str) -> None:
        with self.cluster._locked() as st:
            v = st["vms"].get(vm)
            if v and v["node"] == self.node and v.get("migration"):
                self.cluster._log(st, self.cluster.clock(), "migration-aborted", vm=vm, source=self.node,
                                  target=v["migration"]["target"])
                v["migration"] = None
                v["last_error"] = "migration aborted"

    def migrate(
        self,
        vm: str,
        target: MigrationTarget,
        *,
        timeout_s: float,
        bandwidth_mib_s: int = 0,
        auto_converge: bool = False,
    ) -> MigrationOutcome:
        """Start the migration, then wait for the clock to finish it (or abort on timeout)."""
        t0 = self.cluster.clock()
        with self.cluster._locked() as st:
            try:
                self._up(st)
            except HypervisorUnavailable as exc:
                return MigrationOutcome(False, 0.0, error=str(exc), retryable=True)
            v = st["vms"].get(vm)
            if v is None or v["node"] != self.node or v["state"] != RUNNING:
                return MigrationOutcome(False, 0.0, error=f"domain {vm} is not running on {self.node}")
            if v.get("migration"):
                return MigrationOutcome(False, 0.0, error=f"a migration job of {vm} is already running", retryable=True)
            if target.node == self.node:
                return MigrationOutcome(False, 0.0, error=f"{vm}: target {target.node} is the source")
            tn = st["nodes"].get(target.node)
            if tn is None:
                return MigrationOutcome(False, 0.0, error=f"unknown target node {target.node}")
            if not tn["powered"] or not tn["reachable"]:
                why = "powered off" if not tn["powered"] else "unreachable"
                return MigrationOutcome(False, 0.0, error=f"target node {target.node} is {why}", retryable=True)
            if _free_kib(st, target.node) < v["mem_kib"]:
                return MigrationOutcome(False, 0.0, error=f"target node {target.node} has not enough free memory for {vm}")
            rate = st["migration_mib_s"]
            if bandwidth_mib_s > 0:
                rate = min(rate, float(bandwidth_mib_s))
            duration = v["mem_kib"] / 1024.0 / rate
            job = uuid.uuid4().hex
            v["migration"] = {"target": target.node, "started_at": t0, "ends_at": t0 + duration, "id": job}
            downtime = st["downtime_ms"]
            self.cluster._log(st, t0, "migration-started", vm=vm, source=self.node, target=target.node)
        deadline = t0 + timeout_s
        while True:
            now = self.cluster.clock()
            with self.cluster._locked() as st:
                v = st["vms"][vm]
                mig = v.get("migration")
                if not mig or mig["id"] != job:
                    if v["node"] == target.node:
                        return MigrationOutcome(True, now - t0, downtime_ms=downtime)
                    return MigrationOutcome(False, now - t0, error=v.get("last_error") or "migration failed",
                                            retryable=True)
                if now >= deadline:
                    v["migration"] = None
                    v["last_error"] = f"timed out after {timeout_s:g}s; aborted"
                    self.cluster._log(st, now, "migration-timed-out", vm=vm, source=self.node, target=target.node)
                    return MigrationOutcome(False, now - t0, error=v["last_error"], retryable=True)
                wait = min(mig["ends_at"], deadline) - now
            self._sleep(max(0.005, min(0.1, wait)))


# ---------------------------------------------------------------- command line


def _cmd_init(a: argparse.Namespace) -> int:
    off = [n.strip() for n in (a.powered_off or "").split(",") if n.strip()]
    c = SimulatedCluster.create(
        a.dir, nodes=a.nodes, vms=a.vms, trace_dir=a.trace_dir, speedup=a.speedup, powered_off=off,
        cpus=a.cpus, mhz=a.mhz, mem_mib=a.mem_mib, vm_vcpus=a.vm_vcpus, vm_mem_mib=a.vm_mem_mib,
        migration_mib_s=a.migration_mib_s, start_s=a.start_s, seed=a.seed, overwrite=a.force,
    )
    print(f"created {c.path}: {a.nodes} nodes, {a.vms} VMs, speed-up {a.speedup:g}; agents use "
          f"[hypervisor] uri = \"sim://{c.path}\"")
    return 0


def _cmd_show(a: argparse.Namespace) -> int:
    c = SimulatedCluster(a.dir)
    st = c.state()
    if a.json:
        json.dump(st, sys.stdout, indent=1, sort_keys=True)
        print()
        return 0
    now = c.clock()
    print(f"simulated time {c.sim_time_s(st, now):.0f}s (speed-up {st['speedup']:g})")
    for name, n in sorted(st["nodes"].items(), key=lambda kv: _natural(kv[0])):
        vms = sorted((v for v, d in st["vms"].items() if d["node"] == name and d["state"] == RUNNING), key=_natural)
        power = "on " if n["powered"] else "off"
        extra = "" if n["reachable"] else " (hypervisor unreachable)"
        load = sum(trace_for(st["vms"][v]["trace"]).pct_at(c.sim_time_s(st, now)) * st["vms"][v]["vcpus"] for v in vms)
        print(f"{name:12} {power} cpu {load / n['cpus']:5.1f}%  free {_free_kib(st, name) // 1024:6d} MiB  "
              f"{' '.join(vms)}{extra}")
    for name, d in sorted(st["vms"].items(), key=lambda kv: _natural(kv[0])):
        if d.get("migration"):
            print(f"  migrating {name}: {d['node']} -> {d['migration']['target']}")
        if d["state"] != RUNNING:
            print(f"  {name} is shut off{' (killed by a forced power-off)' if d.get('lost') else ''}")
    return 0


def _natural(s: str) -> tuple[Any, ...]:
    head, _, tail = s.rpartition("-")
    return (head, int(tail)) if tail.isdigit() else (s, 0)


def _cmd_power(a: argparse.Namespace) -> int:
    SimulatedCluster(a.dir).set_powered(a.node, a.state == "on", force=a.force)
    return 0


def _cmd_reachable(a: argparse.Namespace) -> int:
    SimulatedCluster(a.dir).set_reachable(a.node, a.answer == "yes")
    return 0


def _cmd_start(a: argparse.Namespace) -> int:
    SimulatedCluster(a.dir).start_vm(a.vm, a.node)
    return 0


def _cmd_stop(a: argparse.Namespace) -> int:
    SimulatedCluster(a.dir).stop_vm(a.vm)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m enersis.agent.simulated",
                                description="Create and steer a simulated cluster (see the module docstring).")
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("init", help="create a cluster folder")
    i.add_argument("dir")
    i.add_argument("--nodes", type=int, required=True)
    i.add_argument("--vms", type=int, required=True)
    i.add_argument("--trace-dir", required=True, help="folder of PlanetLab trace files (searched recursively)")
    i.add_argument("--speedup", type=float, default=1.0, help="simulated seconds per real second")
    i.add_argument("--powered-off", default="", help="comma-separated nodes that start powered off")
    i.add_argument("--cpus", type=int, default=4)
    i.add_argument("--mhz", type=int, default=2000)
    i.add_argument("--mem-mib", type=int, default=8192)
    i.add_argument("--vm-vcpus", type=int, default=1)
    i.add_argument("--vm-mem-mib", type=int, default=1024)
    i.add_argument("--migration-mib-s", type=float, default=1024.0, help="migration speed (real seconds = MiB / this)")
    i.add_argument("--start-s", type=float, default=0.0, help="simulated time at which the traces start")
    i.add_argument("--seed", type=int, default=None, help="pick trace files at random with this seed")
    i.add_argument("--force", action="store_true", help="replace an existing cluster")
    i.set_defaults(fn=_cmd_init)
    s = sub.add_parser("show", help="print nodes, VMs and migrations")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_show)
    pw = sub.add_parser("power", help="power a node on or off")
    pw.add_argument("dir")
    pw.add_argument("node")
    pw.add_argument("state", choices=("on", "off"))
    pw.add_argument("--force", action="store_true", help="power off even with running VMs (kills them)")
    pw.set_defaults(fn=_cmd_power)
    r = sub.add_parser("reachable", help="make a node's hypervisor answer (yes) or not (no)")
    r.add_argument("dir")
    r.add_argument("node")
    r.add_argument("answer", choices=("yes", "no"))
    r.set_defaults(fn=_cmd_reachable)
    st = sub.add_parser("start", help="start a shut-off VM")
    st.add_argument("dir")
    st.add_argument("vm")
    st.add_argument("--node", default=None)
    st.set_defaults(fn=_cmd_start)
    sp = sub.add_parser("stop", help="stop a VM")
    sp.add_argument("dir")
    sp.add_argument("vm")
    sp.set_defaults(fn=_cmd_stop)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except SimulationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
