"""Lay out and run a whole demo cluster on this machine, one process per service.

Per node: a stand-in NIC (deploy/lab/standin_nic.py) on a loopback port whose
boot command powers the simulated node on and execs that node's
`enersis agent --config node.toml`; and a stand-in sshd
(deploy/lab/ssh_standin.py) on another loopback port whose one forced command
is the node's "poweroff": stop the agent (it says NodeOffline), then cut the
simulated power -- forced, as real hardware would: a VM still running there
is killed and counted as lost, so the summary shows any safety violation.
Then the power service and the arbiter.  Every process gets its own config
file, credentials from files, and talks to the others only through the broker.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("enersis.demo.cluster")

REPO = Path(__file__).resolve().parent.parent.parent
LAB = REPO / "deploy" / "lab"
BROKER_SCRIPT = REPO / "deploy" / "rabbitmq" / "broker.py"
DEFAULT_RUN_BASE = Path("/var/lib/enersis-demo")
ROLES = ("agent", "power", "arbiter", "operator")


class DemoError(RuntimeError):
    """Something the person running the demo has to fix (said in their words)."""


@dataclass(frozen=True)
class DemoSettings:
    nodes: int = 8
    vms: int = 0  # 0: three per node
    speedup: float = 60.0  # simulated seconds per real second: an hour of trace per minute
    duration_s: float = 180.0
    trace_dir: str = ""
    powered_off: int = 0  # how many nodes start powered off (the last ones)
    vm_vcpus: int = 2
    vm_mem_mib: int = 1024
    node_cpus: int = 4
    node_mem_mib: int = 16384
    migration_mib_s: float = 2048.0
    sample_interval_s: float = 0.5
    publish_interval_s: float = 2.0
    window_s: float = 4.0
    cycle_s: float = 4.0
    policy: str = "enersis-hysteresis"
    upper_pct: float = 80.0
    lower_pct: float = 30.0
    port_base: int = 47100  # WoL on port_base+i, sshd on port_base+500+i (127.0.0.1)
    run_dir: str = ""
    vhost: str = "enersis"
    seed: int = 2012
    wake_timeout_s: float = 60.0
    shutdown_timeout_s: float = 30.0

    @property
    def vm_count(self) -> int:
        return self.vms or 3 * self.nodes

    def node_names(self) -> list[str]:
        return [f"node-{i}" for i in range(1, self.nodes + 1)]

    def off_at_start(self) -> list[str]:
        names = self.node_names()
        return names[len(names) - self.powered_off:] if self.powered_off else []


@dataclass(frozen=True)
class BrokerInfo:
    amqp_port: int
    mgmt_port: int
    passwords: dict[str, str]
    mgmt_url: str
    dir: str

    @classmethod
    def load(cls, broker_dir: Path) -> "BrokerInfo":
        path = broker_dir / "broker.json"
        try:
            info = json.loads(path.read_text())
        except FileNotFoundError:
            raise DemoError(f"no broker info at {path}: start the broker with "
                            f"`python3 deploy/rabbitmq/broker.py start`") from None
        missing = [r for r in ROLES + ("admin",) if r not in info.get("passwords", {})]
        if missing:
            raise DemoError(f"{path} has no password for {', '.join(missing)}")
        return cls(info["amqp_port"], info["mgmt_port"], info["passwords"], info.get("mgmt_url", ""), str(broker_dir))

    def url(self, vhost: str) -> str:
        from urllib.parse import quote

        return f"amqp://127.0.0.1:{self.amqp_port}/{quote(vhost, safe='')}"


def toml_str(value: str) -> str:
    # A TOML basic string accepts JSON's escapes for everything we write.
    return json.dumps(str(value))


def mac_for(i: int) -> str:
    return f"52:54:00:e5:00:{i:02x}"


@dataclass
class Layout:
    """Every path, port and config file of one demo run (pure: writes only when told)."""

    settings: DemoSettings
    broker: BrokerInfo
    run: Path
    python: str = sys.executable

    @property
    def cluster(self) -> Path:
        return self.run / "cluster"

    @property
    def secrets(self) -> Path:
        return self.run / "secrets"

    @property
    def logs(self) -> Path:
        return self.run / "logs"

    def node_dir(self, node: str) -> Path:
        return self.run / "nodes" / node

    def ssh_dir(self, node: str) -> Path:
        return self.run / "ssh" / node

    def wol_port(self, i: int) -> int:
        return self.settings.port_base + i

    def ssh_port(self, i: int) -> int:
        return self.settings.port_base + 500 + i

    def enersis(self) -> list[str]:
        return [self.python, "-m", "enersis.cli"]

    def broker_table(self, role: str) -> str:
        return (f"[broker]\nurl = {toml_str(self.broker.url(self.settings.vhost))}\nuser = {toml_str(role)}\n"
                f"password_file = {toml_str(self.secrets / (role + '.password'))}\nheartbeat_s = 10\n")

    # -- config files

    def node_toml(self, node: str) -> str:
        s = self.settings
        peers = "".join(
            f"\n[peers.{other}]\nuri = {toml_str('sim://' + str(self.cluster))}\n"
            for other in s.node_names() if other != node
        )
        return (
            f"# {node}: written by `enersis demo`\nnode = {toml_str(node)}\n\n{self.broker_table('agent')}\n"
            f"[hypervisor]\nuri = {toml_str('sim://' + str(self.cluster))}\n\n"
            f"[telemetry]\nsample_interval_s = {s.sample_interval_s}\npublish_interval_s = {s.publish_interval_s}\n"
            f"window_s = {s.window_s}\n\n"
            f"[executor]\nenabled = true\nmax_outgoing = 1\nstate_dir = {toml_str(self.node_dir(node) / 'executor')}\n"
            f"{peers}"
        )

    def power_toml(self) -> str:
        s = self.settings
        nodes = ""
        for i, node in enumerate(s.node_names(), start=1):
            nodes += (
                f"\n[nodes.{node}]\nmac = {toml_str(mac_for(i))}\naddress = \"127.0.0.1\"\n"
                f"wol_broadcast = \"127.0.0.1\"\nwol_port = {self.wol_port(i)}\nwol_source = \"127.0.0.1\"\n"
                f"ssh_user = \"root\"\nssh_port = {self.ssh_port(i)}\n"
                f"ssh_key = {toml_str(self.secrets / 'power_ed25519')}\n"
                f"known_hosts = {toml_str(self.ssh_dir(node) / 'known_hosts')}\n"
                f"shutdown_command = \"poweroff\"\n"
            )
        return (
            f"# power service: written by `enersis demo`\n{self.broker_table('power')}\n"
            f"[power]\nwake_timeout_s = {s.wake_timeout_s}\nshutdown_timeout_s = {s.shutdown_timeout_s}\n"
            f"stale_after_s = {max(5.0, 4 * s.publish_interval_s)}\n"
            f"ssh_connect_timeout_s = 5\nssh_command_timeout_s = 20\n{nodes}"
        )

    def arbiter_toml(self) -> str:
        s = self.settings
        nodes = "".join(f"\n[nodes.{toml_str(n)}]\naddress = \"127.0.0.1\"\nmac = {toml_str(mac_for(i).upper())}\n"
                        for i, n in enumerate(s.node_names(), start=1))
        return (
            f"# arbiter: written by `enersis demo`\n{self.broker_table('arbiter')}\n"
            f"[arbiter]\nmode = \"auto\"\npolicy = {toml_str(s.policy)}\nupper_pct = {s.upper_pct}\n"
            f"lower_pct = {s.lower_pct}\ncycle_s = {s.cycle_s}\nwarmup_s = {2 * s.publish_interval_s + 1}\n"
            f"unknown_grace_s = {3 * s.publish_interval_s + 2}\n"
            f"state_file = {toml_str(self.run / 'arbiter' / 'state.json')}\n\n"
            f"[commands]\nmigrate_timeout_s = 60\nwake_timeout_s = {s.wake_timeout_s}\n"
            f"shutdown_timeout_s = {s.shutdown_timeout_s + 10}\nmanual_hold_s = 30\nquarantine_s = 120\n"
            f"{nodes}"
        )

    def operator_toml(self) -> str:
        return f"# operator tools (enersis send / status) for this demo\n{self.broker_table('operator')}"

    def boot_command(self, node: str) -> list[str]:
        # The node "boots": its simulated power comes on, then its agent runs in its place.
        script = (f"{shlex.quote(self.python)} -m enersis.agent.simulated power {shlex.quote(str(self.cluster))} "
                  f"{node} on && exec {' '.join(shlex.quote(a) for a in self.enersis())} agent --config "
                  f"{shlex.quote(str(self.node_dir(node) / 'node.toml'))}")
        return ["/bin/sh", "-c", script]

    def poweroff_command(self, node: str) -> str:
        # The OS shutting down: the agent stops (NodeOffline), then the power goes, forced as on real
        # hardware.  No double quotes: it sits inside authorized_keys' command="...".
        nd = self.node_dir(node)
        return (f"{shlex.quote(self.python)} {shlex.quote(str(LAB / 'standin_nic.py'))} --poweroff "
                f"{shlex.quote(str(nd / 'agent.pid'))} --poweroff-log {shlex.quote(str(nd / 'poweroff.log'))} "
                f"--grace 10; {shlex.quote(self.python)} -m enersis.agent.simulated power "
                f"{shlex.quote(str(self.cluster))} {node} off --force")

    def write(self) -> None:
        if self.run.parent == DEFAULT_RUN_BASE:
            # sshd (StrictModes) refuses keys below a group- or world-writable folder, whatever the umask.
            DEFAULT_RUN_BASE.mkdir(parents=True, exist_ok=True)
            os.chmod(DEFAULT_RUN_BASE, 0o755)
        self.run.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run, 0o700)
        for sub in (self.secrets, self.logs, self.run / "arbiter"):
            sub.mkdir(parents=True, exist_ok=True)
        os.chmod(self.secrets, 0o700)
        for role in ROLES:
            path = self.secrets / f"{role}.password"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(self.broker.passwords[role] + "\n")
        key = self.secrets / "power_ed25519"
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "enersis-demo-power", "-f", str(key)],
                           check=True, stdin=subprocess.DEVNULL)
        for node in self.settings.node_names():
            nd = self.node_dir(node)
            (nd / "executor").mkdir(parents=True, exist_ok=True)
            (nd / "node.toml").write_text(self.node_toml(node))
        (self.run / "power.toml").write_text(self.power_toml())
        (self.run / "arbiter.toml").write_text(self.arbiter_toml())
        (self.run / "operator.toml").write_text(self.operator_toml())


# ---------------------------------------------------------------- processes


def _die_with_parent() -> None:
    # Runs in the child before exec: if the demo is killed outright, its children get SIGTERM
    # instead of living on; a new session keeps a terminal's Ctrl-C for the demo to handle in order.
    os.setsid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path
    stop_grace_s: float = 15.0


@dataclass
class Supervisor:
    """Starts the demo's processes and stops them, newest first."""

    logs: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    children: list[Child] = field(default_factory=list)
    cleanups: list[tuple[str, list[str]]] = field(default_factory=list)  # commands that undo a daemon

    def start(self, name: str, argv: list[str], *, grace_s: float = 15.0) -> Child:
        log_path = self.logs / f"{name}.log"
        fh = open(log_path, "ab")
        try:
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, preexec_fn=_die_with_parent)
        finally:
            fh.close()
        child = Child(name, proc, log_path, grace_s)
        self.children.append(child)
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return child

    def run(self, name: str, argv: list[str], *, timeout_s: float = 60.0) -> str:
        """A short command that must succeed (setup steps); its output goes to the log too."""
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=self.env,
                           stdin=subprocess.DEVNULL)
        with open(self.logs / f"{name}.log", "a") as fh:
            fh.write(r.stdout + r.stderr)
        if r.returncode != 0:
            raise DemoError(f"{name} failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-500:]}")
        return r.stdout

    def exited(self) -> list[Child]:
        return [c for c in self.children if c.proc.poll() is not None]

    def stop_all(self) -> list[str]:
        """Stop every child newest first (SIGTERM to its group, SIGKILL after its grace); report stragglers."""
        problems: list[str] = []
        for child in reversed(self.children):
            if child.proc.poll() is None:
                _signal_group(child.proc.pid, signal.SIGTERM)
        for child in reversed(self.children):
            try:
                child.proc.wait(child.stop_grace_s)
            except subprocess.TimeoutExpired:
                problems.append(f"{child.name} ignored SIGTERM for {child.stop_grace_s:.0f}s; killed")
                _signal_group(child.proc.pid, signal.SIGKILL)
                child.proc.wait(5)
        for name, argv in reversed(self.cleanups):
            r = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
            if r.returncode != 0:
                problems.append(f"{name}: {(r.stderr or r.stdout).strip()[-300:]}")
        self.cleanups.clear()
        return problems


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def port_free(port: int, kind: int = socket.SOCK_STREAM) -> bool:
    s = socket.socket(socket.AF_INET, kind)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def check_ports(layout: Layout) -> None:
    busy = []
    for i in range(1, layout.settings.nodes + 1):
        if not port_free(layout.wol_port(i), socket.SOCK_DGRAM):
            busy.append(f"udp/{layout.wol_port(i)}")
        if not port_free(layout.ssh_port(i)):
            busy.append(f"tcp/{layout.ssh_port(i)}")
    if busy:
        raise DemoError(f"ports in use on 127.0.0.1: {', '.join(busy)} (another demo running? "
                        "pick other ones with --port-base)")


def wait_until(condition: Any, timeout_s: float, step_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(step_s)
    return True
