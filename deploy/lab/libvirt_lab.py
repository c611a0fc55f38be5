#!/usr/bin/env python3
"""A lab of real libvirt daemons on one machine, each a "node", with tiny QEMU guests.

    python3 deploy/lab/libvirt_lab.py up [--nodes 2]
    python3 deploy/lab/libvirt_lab.py guest --node a --name g1 --mode busy [--serial FILE]
    python3 deploy/lab/libvirt_lab.py status
    python3 deploy/lab/libvirt_lab.py node-toml --node a   # node, [hypervisor], [peers.*] for enersis agent
    python3 deploy/lab/libvirt_lab.py down

Stdlib only; needs root and the Debian packages libvirt-daemon,
libvirt-daemon-driver-qemu, libvirt-clients, qemu-system-x86 and util-linux
(`deploy/scripts/install-deps.sh`).  How it works (../../shared LAB.md §4):

- each node is a `libvirtd` in its own mount + UTS namespace (`unshare`),
  with per-node folders bind-mounted over /etc/libvirt, /run/libvirt,
  /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt, its own
  host_uuid (else libvirt refuses "migrate guest to the same host") and its
  own migration port range; clients reach it at
  `qemu+unix:///system?socket=<lab>/<node>/run/libvirt-sock`;
- guests are TCG (`<domain type='qemu'>`: this CPU has no vmx/svm, KVM would
  be ~500x slower), 64 MiB, no disk, booting a multiboot kernel that
  guest_kernel.py writes (busy loop or hlt loop, both writing to COM1);
- the bind mounts live only in the daemons' private namespaces, so they
  vanish with the processes: `down` destroys the guests first (libvirtd
  leaves QEMU running when it exits), then stops the daemons, then kills any
  QEMU of this lab that is left.

State lives in ENERSIS_LAB_DIR (default <repo>/.lab/libvirt, or /tmp/enersis-lab-<hash>
when the clone's path is too long for unix sockets); `<lab>/lab.json`
lists each node's libvirt URI and migration address.  `up`, `guest` and
`down` are idempotent.  Tests import this file (see tests/conftest.py's
`libvirt_lab` fixture) and use the `Lab` class.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import guest_kernel  # noqa: E402  (sibling module, stdlib only)

REPO = Path(__file__).resolve().parents[2]
QEMU_BINARY = "/usr/bin/qemu-system-x86_64"
MOUNTED = {  # folder under the node's dir -> where the daemon sees it
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
}
SOCKET_MAX = 107  # sun_path limit minus the NUL
MIGRATION_ADDRESS = "127.0.0.1"
GUEST_MEMORY_MIB = 64
START_TIMEOUT_S = 30.0


class LabError(RuntimeError):
    """The lab cannot do what was asked; the message says what to fix."""


def default_dir() -> Path:
    env = os.environ.get("ENERSIS_LAB_DIR")
    if env:
        return Path(env).resolve()
    inside = REPO / ".lab" / "libvirt"
    if len(str(inside / "node-z" / "run" / "libvirt-sock")) <= SOCKET_MAX:
        return inside
    # A clone deep in the file system: unix socket paths would be too long there.
    return Path("/tmp") / f"enersis-lab-{hashlib.sha256(str(REPO).encode()).hexdigest()[:10]}"


def node_names(count: int) -> list[str]:
    if not 1 <= count <= 26:
        raise LabError("--nodes must be between 1 and 26")
    return [f"node-{chr(ord('a') + i)}" for i in range(count)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _reap(pid: int) -> None:
    # When the lab was started from this very process (a pytest session), the
    # daemon is our child: reap it so it does not linger as a zombie.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


class Lab:
    """The lab in one folder: nodes (libvirt daemons) and guests."""

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self.root = Path(root).resolve() if root else default_dir()
        self.state_file = self.root / "lab.json"
        self._launched: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------ info

    def info(self) -> dict[str, Any]:
        """The lab.json content ({} when the lab was never brought up)."""
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def node_dir(self, node: str) -> Path:
        return self.root / node

    def socket_path(self, node: str) -> Path:
        return self.node_dir(node) / "run" / "libvirt-sock"

    def uri(self, node: str) -> str:
        return f"qemu+unix:///system?socket={self.socket_path(node)}"

    def nodes(self) -> list[str]:
        return list(self.info().get("nodes", {}))

    def resolve_node(self, name: str) -> str:
        """Accept "node-a", "a" or "A"."""
        known = self.nodes()
        for candidate in (name, f"node-{name.lower()}"):
            if candidate in known:
                return candidate
        raise LabError(f"no lab node {name!r}; nodes: {', '.join(known) or 'none (run `up` first)'}")

    def _seed(self) -> int:
        # Distinct labs (ENERSIS_LAB_DIR) on one machine get distinct port ranges and host UUIDs.
        return int(hashlib.sha256(str(self.root).encode()).hexdigest()[:8], 16)

    def host_uuid(self, node: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"enersis-lab:{self.root}:{node}"))

    def migration_ports(self, index: int) -> tuple[int, int]:
        base = 49152 + (self._seed() % 40) * 300 + index * 20
        return base, base + 19

    def daemon_pid(self, node: str) -> int | None:
        try:
            pid = int((self.node_dir(node) / "libvirtd.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        if _alive(pid) and any(a.endswith("libvirtd") for a in _cmdline(pid)[:1]):
            return pid
        return None

    def node_up(self, node: str) -> bool:
        if self.daemon_pid(node) is None:
            return False
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.connect(str(self.socket_path(node)))
            return True
        except OSError:
            return False
        finally:
            s.close()

    # ------------------------------------------------------------ prerequisites

    @staticmethod
    def prerequisites() -> list[str]:
        """What is missing for the lab to run here (empty when all is there)."""
        missing = []
        if os.geteuid() != 0:
            missing.append("root (the daemons need mount namespaces)")
        for tool in ("libvirtd", "virsh", "unshare", "mount"):
            if shutil.which(tool) is None:
                missing.append(f"the {tool} command")
        if not os.path.exists(QEMU_BINARY):
            missing.append(QEMU_BINARY + " (Debian package qemu-system-x86)")
        return missing

    @staticmethod
    def _ensure_qemu_user() -> None:
        # The qemu driver refuses to load without this user, even when qemu.conf says root.
        if subprocess.run(["getent", "passwd", "libvirt-qemu"], capture_output=True).returncode == 0:
            return
        if subprocess.run(["getent", "group", "libvirt-qemu"], capture_output=True).returncode != 0:
            subprocess.run(["groupadd", "-r", "libvirt-qemu"], capture_output=True)
        r = subprocess.run(["useradd", "-r", "-g", "libvirt-qemu", "-s", "/usr/sbin/nologin", "libvirt-qemu"],
                           capture_output=True, text=True)
        if r.returncode != 0 and "already exists" not in r.stderr:
            raise LabError(f"could not create the libvirt-qemu user: {r.stderr.strip()}")

    # ------------------------------------------------------------ up

    def up(self, count: int = 2) -> dict[str, Any]:
        missing = self.prerequisites()
        if missing:
            raise LabError("the libvirt lab needs " + "; ".join(missing))
        names = node_names(count)
        longest = self.socket_path(names[-1])
        if len(str(longest)) > SOCKET_MAX:
            raise LabError(f"socket path {longest} is longer than {SOCKET_MAX} bytes; "
                           "set ENERSIS_LAB_DIR to a shorter folder")
        self._ensure_qemu_user()
        self.root.mkdir(parents=True, exist_ok=True)
        kernels = {mode: str(guest_kernel.write(mode, self.root / "kernels" / f"{mode}.bin"))
                   for mode in guest_kernel.CODE}
        for target in MOUNTED.values():
            Path(target).mkdir(parents=True, exist_ok=True)  # bind-mount points must exist on the host

        info = self.info()
        nodes_info: dict[str, Any] = dict(info.get("nodes", {}))
        for index, node in enumerate(names):
            nodes_info[node] = self._node_record(node, index)
        self._save({"root": str(self.root), "kernels": kernels, "nodes": nodes_info})

        # Start the first node alone and let it probe QEMU (~4 s), then hand
        # its capability cache to the others so they start in ~0.2 s.
        first, rest = names[0], names[1:]
        self._start(first, 0)
        if rest:
            self._probe(first)
            for node in rest:
                self._copy_caps(first, node)
            for index, node in enumerate(rest, start=1):
                self._start(node, index, wait=False)
            for node in rest:
                self._wait_ready(node)
        return self.info()

    def _node_record(self, node: str, index: int) -> dict[str, Any]:
        lo, hi = self.migration_ports(index)
        return {
            "uri": self.uri(node),
            "socket": str(self.socket_path(node)),
            "dir": str(self.node_dir(node)),
            "host_uuid": self.host_uuid(node),
            "migration_uri": f"tcp://{MIGRATION_ADDRESS}",
            "listen_address": MIGRATION_ADDRESS,
            "migration_ports": [lo, hi],
        }

    def _save(self, data: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.state_file)

    def _write_config(self, node: str, index: int) -> None:
        d = self.node_dir(node)
        for sub in MOUNTED:
            (d / sub).mkdir(parents=True, exist_ok=True)
        lo, hi = self.migration_ports(index)
        (d / "etc" / "libvirtd.conf").write_text(
            "# written by deploy/lab/libvirt_lab.py\n"
            'unix_sock_dir = "/run/libvirt"\n'
            'auth_unix_rw = "none"\n'
            'auth_unix_ro = "none"\n'
            f'host_uuid = "{self.host_uuid(node)}"\n'
            'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
        )
        (d / "etc" / "qemu.conf").write_text(
            "# written by deploy/lab/libvirt_lab.py: root, no cgroups, no namespaces, no virtlogd.\n"
            "# No migration_host: libvirt refuses a local address there; the migration URI and\n"
            "# listen address are passed with each migration instead.\n"
            'user = "root"\n'
            'group = "root"\n'
            "dynamic_ownership = 0\n"
            "remember_owner = 0\n"
            'security_driver = "none"\n'
            "cgroup_controllers = [ ]\n"
            "namespaces = [ ]\n"
            'stdio_handler = "file"\n'
            f"migration_port_min = {lo}\n"
            f"migration_port_max = {hi}\n"
        )

    def _start(self, node: str, index: int, *, wait: bool = True) -> None:
        if self.node_up(node):
            return
        self._write_config(node, index)
        d = self.node_dir(node)
        # A daemon that died leaves its socket and pid file: clear them first.
        for stale in ("libvirt-sock", "libvirt-sock-ro", "libvirt-admin-sock"):
            (d / "run" / stale).unlink(missing_ok=True)
        (d / "libvirtd.pid").unlink(missing_ok=True)
        mounts = "; ".join(f"mount --bind {d / sub} {target}" for sub, target in MOUNTED.items())
        script = f"set -e; {mounts}; hostname {node}; exec libvirtd --pid-file {d / 'libvirtd.pid'}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LIBVIRT_", "VIR"))}
        with open(d / "daemon.log", "ab") as log:
            self._launched[node] = subprocess.Popen(
                ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, env=env, cwd="/",
            )
        if wait:
            self._wait_ready(node)

    def _wait_ready(self, node: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.node_up(node):
                return
            proc = self._launched.get(node)
            if proc is not None and proc.poll() is not None:
                break  # the daemon exited: no point waiting
            time.sleep(0.1)
        tail = ""
        for name in ("daemon.log", "log/libvirtd.log"):
            p = self.node_dir(node) / name
            if p.exists():
                tail += f"\n--- {p} (tail)\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
        raise LabError(f"libvirtd of {node} did not come up (log tails follow){tail}")

    def virsh(self, node: str, *args: str, check: bool = True, timeout: float = 120) -> str:
        r = subprocess.run(["virsh", "-q", "-c", self.uri(node), *args], capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise LabError(f"virsh {' '.join(args)} on {node}: {(r.stderr or r.stdout).strip()}")
        return r.stdout

    def _probe(self, node: str) -> None:
        self.virsh(node, "domcapabilities", "--virttype", "qemu", "--emulatorbin", QEMU_BINARY, "--arch", "x86_64")

    def _copy_caps(self, src: str, dst: str) -> None:
        source = self.node_dir(src) / "cache" / "qemu" / "capabilities"
        target = self.node_dir(dst) / "cache" / "qemu" / "capabilities"
        if source.is_dir() and not (target.is_dir() and any(target.iterdir())):
            shutil.copytree(source, target, dirs_exist_ok=True)

    # ------------------------------------------------------------ guests

    def domain_xml(self, name: str, mode: str, serial: str | None = None) -> str:
        kernel = self.info().get("kernels", {}).get(mode) or str(
            guest_kernel.write(mode, self.root / "kernels" / f"{mode}.bin"))
        serial_xml = ""
        if serial:
            # append='on': the destination QEMU reopens the same file after a migration.
            serial_xml = (f"<serial type='file'><source path='{serial}' append='on'/>"
                          "<target port='0'/></serial>")
        return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{GUEST_MEMORY_MIB}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{kernel}</kernel></os>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>{QEMU_BINARY}</emulator>
    <controller type='usb' model='none'/>
    {serial_xml}
    <memballoon model='none'/>
  </devices>
</domain>
"""

    def guest(self, node: str, name: str, mode: str = "busy", serial: str | None = None) -> dict[str, Any]:
        """Define and start guest `name` on `node` (nothing to do when it already runs in the lab)."""
        node = self.resolve_node(node)
        if mode not in guest_kernel.CODE:
            raise LabError(f"unknown guest mode {mode!r}; choose one of {', '.join(guest_kernel.CODE)}")
        for other in self.nodes():
            if other != node and self.node_up(other) and name in self.domains(other):
                raise LabError(f"guest {name} already exists on {other}; `down` the lab or pick another name")
        if not self.node_up(node):
            raise LabError(f"{node} is not running; run `up` first")
        state = self.domains(node).get(name)
        if state is None:
            if serial:
                Path(serial).parent.mkdir(parents=True, exist_ok=True)
            xml_path = self.node_dir(node) / f"{name}.xml"
            xml_path.write_text(self.domain_xml(name, mode, serial))
            self.virsh(node, "define", str(xml_path))
            state = "shut off"
        if state != "running":
            self.virsh(node, "start", name)
        return {"node": node, "name": name, "mode": mode, "serial": serial, "uri": self.uri(node)}

    def domains(self, node: str) -> dict[str, str]:
        """{name: state} of every domain defined or running on `node`."""
        out = self.virsh(node, "list", "--all")
        result = {}
        for line in out.splitlines():
            parts = line.split(None, 2)
            if len(parts) == 3:
                result[parts[1]] = parts[2].strip()
        return result

    # ------------------------------------------------------------ down / status

    def down(self) -> None:
        """Destroy and undefine every guest, stop every daemon, kill leftover QEMU. Idempotent."""
        nodes = sorted(set(self.nodes()) | {p.name for p in self.root.glob("node-*") if p.is_dir()})
        for node in nodes:
            if self.node_up(node):
                try:
                    for name, state in self.domains(node).items():
                        if state != "shut off":
                            self.virsh(node, "destroy", name, check=False)
                        self.virsh(node, "undefine", name, check=False)
                except (LabError, subprocess.TimeoutExpired):
                    pass  # the QEMU sweep below still catches its guests
        for node in nodes:
            pid = self.daemon_pid(node)
            if pid is not None:
                self._stop_pid(pid)
        for pid in self.lab_processes():
            self._stop_pid(pid)
        for node in nodes:
            d = self.node_dir(node)
            for sub in ("run", "lib"):
                shutil.rmtree(d / sub, ignore_errors=True)
            shutil.rmtree(d / "etc" / "qemu", ignore_errors=True)
            (d / "libvirtd.pid").unlink(missing_ok=True)

    def lab_processes(self) -> list[int]:
        """Processes that belong to this lab (daemons, QEMU), found through their command lines."""
        marker = str(self.root) + "/"
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            args = _cmdline(int(entry))
            if not args or not _alive(int(entry)):
                continue
            exe = os.path.basename(args[0])
            if (exe.startswith("qemu-system") or exe == "libvirtd") and any(marker in a for a in args):
                found.append(int(entry))
        return found

    @staticmethod
    def _stop_pid(pid: int, grace_s: float = 10.0) -> None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            _reap(pid)
            if not _alive(pid):
                return
            time.sleep(0.05)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        for _ in range(100):
            _reap(pid)
            if not _alive(pid):
                return
            time.sleep(0.05)

    def status(self) -> dict[str, Any]:
        info = self.info()
        nodes = {}
        for node, rec in info.get("nodes", {}).items():
            up = self.node_up(node)
            entry = {"up": up, "pid": self.daemon_pid(node), "uri": rec["uri"]}
            if up:
                try:
                    entry["domains"] = self.domains(node)
                except LabError as exc:
                    entry["error"] = str(exc)
            nodes[node] = entry
        return {"root": str(self.root), "nodes": nodes, "processes": self.lab_processes()}

    def node_toml(self, node: str) -> str:
        """The [hypervisor] and [peers.*] tables of an agent's node.toml for a lab node."""
        node = self.resolve_node(node)
        nodes = self.info()["nodes"]
        lines = [f'node = "{node}"', "", "[hypervisor]", f'uri = "{nodes[node]["uri"]}"']
        for peer, rec in nodes.items():
            if peer != node:
                lines += ["", f"[peers.{peer}]", f'uri = "{rec["uri"]}"',
                          f'migration_uri = "{rec["migration_uri"]}"', f'listen_address = "{rec["listen_address"]}"']
        return "\n".join(lines) + "\n"

    def stop_node(self, node: str) -> None:
        """Stop one daemon (its guests keep running): a 'dead daemon' for failure tests."""
        node = self.resolve_node(node)
        pid = self.daemon_pid(node)
        if pid is not None:
            self._stop_pid(pid)

    def start_node(self, node: str) -> None:
        node = self.resolve_node(node)
        self._start(node, self.nodes().index(node))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="lab folder (default: $ENERSIS_LAB_DIR or <repo>/.lab/libvirt)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="start the node daemons (idempotent)")
    p_up.add_argument("--nodes", type=int, default=2)
    sub.add_parser("down", help="destroy guests, stop daemons; leaves nothing running or mounted")
    sub.add_parser("status", help="print the nodes and their domains as JSON")
    p_g = sub.add_parser("guest", help="define and start a tiny disk-less guest")
    p_g.add_argument("--node", required=True, help="node-a, a or A")
    p_g.add_argument("--name", required=True)
    p_g.add_argument("--mode", choices=sorted(guest_kernel.CODE), default="busy")
    p_g.add_argument("--serial", help="file that receives the guest's COM1 output")
    p_t = sub.add_parser("node-toml", help="print node.toml tables (node, [hypervisor], [peers.*]) for a lab node")
    p_t.add_argument("--node", required=True)
    args = parser.parse_args(argv)
    lab = Lab(args.dir)
    try:
        if args.cmd == "up":
            t0 = time.monotonic()
            info = lab.up(args.nodes)
            for node, rec in info["nodes"].items():
                print(f"{node}: {rec['uri']}  migration {rec['migration_uri']}")
            print(f"lab up in {time.monotonic() - t0:.1f}s; state in {lab.state_file}")
        elif args.cmd == "down":
            lab.down()
            print("lab down")
        elif args.cmd == "status":
            st = lab.status()
            print(json.dumps(st, indent=2))
            return 0 if st["nodes"] and all(n["up"] for n in st["nodes"].values()) else 3
        elif args.cmd == "node-toml":
            print(lab.node_toml(args.node), end="")
        elif args.cmd == "guest":
            serial = str(Path(args.serial).resolve()) if args.serial else None
            g = lab.guest(args.node, args.name, args.mode, serial)
            print(f"guest {g['name']} ({g['mode']}) running on {g['node']}")
    except LabError as exc:
        print(f"libvirt_lab: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
