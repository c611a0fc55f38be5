#!/usr/bin/env python3
"""Power lab: nodes as network namespaces that wake on a magic packet and power off over SSH.

    netns_lab.py up   --name NAME --nodes node-1,node-2 --subnet 10.213.7.0/24 --boot 'CMD ... {node} ...'
                      [--on node-1] [--ignore-packets node-3] [--boot-delay S] [--broker-url URL ...]
    netns_lab.py down   --name NAME
    netns_lab.py status --name NAME

Layout (LAB.md section 5), all names derived from NAME:

    root namespace                 NAME-br (bridge namespace)            NAME-1 ... NAME-N
    NAME-h 10.213.7.1/24  <--veth-->  host ─┐                             eth0 10.213.7.11/24 (MAC of the node)
                                            br0 ── n1 <--veth-->          eth0 ...
                                                ── n2 <--veth-->

The bridge lives in its own namespace so no host firewall applies to it; the
subnet exists only in these namespaces plus the root side of one veth (.1),
so the power service, which runs in the root namespace next to the broker on
127.0.0.1, can broadcast magic packets and open SSH sessions into the lab.

Per node:
- a stand-in NIC (standin_nic.py) whose socket lives in the node namespace
  (0.0.0.0:9, receives the subnet broadcast) while the process and its boot
  command stay in the root namespace, so the booted agent reaches the broker
  on 127.0.0.1.  The boot command is --boot with {node}, {index}, {address},
  {state} replaced.  Nodes in --on boot at once; nodes in --ignore-packets
  never boot from a packet (a NIC with WoL disabled).
- an sshd in the node namespace (ssh_standin.py) with one key, shared by the
  lab's nodes, whose forced command stops that node's boot command (the
  stand-in for poweroff) and logs a line to {state}/NODE/poweroff.log.
- with --hard-poweroff, that node's poweroff is a pulled plug: the agent is
  killed (no NodeOffline) and its sshd stops, so only silence and a closed
  SSH port tell that it is down (sshd is not restarted on the next boot).
- with --sim-cluster DIR, booting also powers the node on in that simulated
  cluster and the poweroff powers it off there (its VMs die, as on a real node).

`up` writes {state}/power.toml (inventory for `enersis power`), {state}/state.json
and prints the state as JSON.  `up` first removes a previous lab of the same
name; `down` removes processes, namespaces, veths and the state folder.
State folder: /var/lib/enersis-lab/NAME (0700: sshd's StrictModes needs it).
Needs root, iproute2 and openssh-server.  Stdlib only.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NIC = HERE / "standin_nic.py"
SSH = HERE / "ssh_standin.py"
STATE_ROOT = Path(os.environ.get("ENERSIS_LAB_STATE_ROOT", "/var/lib/enersis-lab"))
NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")  # interface names stay <= 15 characters
FIRST_HOST = 11


def log(msg: str) -> None:
    print(f"netns-lab: {msg}", file=sys.stderr, flush=True)


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise SystemExit(f"netns-lab: `{' '.join(cmd)}` failed: {r.stderr.strip() or r.stdout.strip()}")
    return r


def state_dir(name: str) -> Path:
    return STATE_ROOT / name


def node_mac(name: str, index: int) -> str:
    # Locally administered unicast (02:...), stable per lab name and node index.
    h = sum(name.encode()) % 256
    return f"02:e5:{h:02x}:00:{index // 256:02x}:{index % 256:02x}"


def our_namespaces(name: str) -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n == f"{name}-br" or re.fullmatch(rf"{re.escape(name)}-\d+", n)]


# ---------------------------------------------------------------- up


def up(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise SystemExit("netns-lab: needs root (network namespaces, sshd)")
    name = args.name
    if not NAME_RE.match(name):
        raise SystemExit("netns-lab: --name must be 1-10 lower-case letters/digits, starting with a letter")
    nodes = [n for n in args.nodes.split(",") if n]
    if not nodes or len(set(nodes)) != len(nodes):
        raise SystemExit("netns-lab: --nodes must list distinct node names")
    for extra in (args.on, args.ignore_packets, args.hard_poweroff):
        unknown = set(extra) - set(nodes)
        if unknown:
            raise SystemExit(f"netns-lab: {', '.join(sorted(unknown))} not in --nodes")
    net = ipaddress.ip_network(args.subnet, strict=True)
    if net.version != 4 or net.num_addresses < FIRST_HOST + len(nodes) + 2:
        raise SystemExit("netns-lab: --subnet must be an IPv4 network big enough for the nodes")
    if not net.is_private or net.overlaps(ipaddress.ip_network("127.0.0.0/8")):
        raise SystemExit("netns-lab: --subnet must be a private, non-loopback network")
    if our_namespaces(name) or state_dir(name).exists():
        log(f"removing the previous lab {name!r} first")
        teardown(name)

    state = state_dir(name)
    for parent in reversed(state.parents):  # 0755 whatever the umask: sshd's StrictModes checks them all
        if not parent.exists():
            parent.mkdir()
            os.chmod(parent, 0o755)
    state.mkdir(exist_ok=True)
    os.chmod(state, 0o700)
    prefix = net.prefixlen
    host_ip = str(net.network_address + 1)
    broadcast = str(net.broadcast_address)
    br = f"{name}-br"
    host_if = f"{name}-h"
    t0 = time.monotonic()
    try:
        sh("ip", "netns", "add", br)
        sh("ip", "-n", br, "link", "set", "lo", "up")
        sh("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", br, "link", "set", "br0", "up")
        # The root side of the lab: one veth whose peer is a bridge port.
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "host", "netns", br)
        sh("ip", "-n", br, "link", "set", "host", "master", "br0", "up")
        sh("ip", "addr", "add", f"{host_ip}/{prefix}", "brd", broadcast, "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        node_info = []
        for i, node in enumerate(nodes, start=1):
            ns = f"{name}-{i}"
            address = str(net.network_address + FIRST_HOST + i - 1)
            mac = node_mac(name, i)
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", br, "link", "add", f"n{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", br, "link", "set", f"n{i}", "master", "br0", "up")
            sh("ip", "-n", ns, "link", "set", "eth0", "address", mac)
            sh("ip", "-n", ns, "addr", "add", f"{address}/{prefix}", "brd", broadcast, "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            node_info.append({"node": node, "index": i, "netns": ns, "address": address, "mac": mac})
        log(f"network up in {time.monotonic() - t0:.2f}s: {len(nodes)} nodes on {net} (host side {host_ip})")

        # One client key for the whole lab: the power service's identity.
        client_key = state / "client_ed25519"
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"enersis-power@{name}", "-f", str(client_key))
        known_hosts_lines = []
        for info in node_info:
            node_dir = state / info["node"]
            node_dir.mkdir(mode=0o700)
            pid_file = node_dir / "agent.pid"
            poweroff_log = node_dir / "poweroff.log"
            hard = info["node"] in args.hard_poweroff
            forced = f"{sys.executable} {NIC} --poweroff {pid_file} --poweroff-log {poweroff_log}"
            if hard:
                forced += " --hard"
            if args.sim_cluster:
                # A real power-off takes the node's VMs down with it: the simulated cluster must say so too.
                forced += (f"; {args.sim_python} -m enersis.agent.simulated power {args.sim_cluster} {info['node']} off"
                           " --force")
            if hard:
                # A pulled plug: the agent died without NodeOffline and, once this session has ended,
                # the node's sshd goes too (the port closes, as on a machine that halted).
                forced += (f"; (sleep 0.5; kill $(cat {node_dir / 'ssh' / 'sshd.pid'})) "
                           "</dev/null >/dev/null 2>&1 &")
            ssh = sh(sys.executable, str(SSH), "up", "--dir", str(node_dir / "ssh"), "--address", info["address"],
                     "--port", "22", "--netns", info["netns"], "--from", str(net),
                     "--client-pubkey", f"{client_key}.pub", "--forced-command", forced, "--json")
            ssh_info = json.loads(ssh.stdout)
            known_hosts_lines.append(ssh_info["known_hosts_line"])
            boot = [part.format(node=info["node"], index=info["index"], address=info["address"], state=str(state))
                    for part in shlex.split(args.boot)]
            if args.sim_cluster:
                # Power the simulated node on, then become the boot command (so the poweroff's SIGTERM reaches it).
                boot = ["sh", "-c", f"{shlex.quote(args.sim_python)} -m enersis.agent.simulated power "
                                    f"{shlex.quote(args.sim_cluster)} {shlex.quote(info['node'])} on && exec \"$@\"",
                        "boot", *boot]
            nic_cmd = [sys.executable, str(NIC), "--listen", f"0.0.0.0:{args.wol_port}", "--mac", info["mac"],
                       "--netns", info["netns"], "--pid-file", str(pid_file), "--boot-delay", str(args.boot_delay)]
            if info["node"] in args.ignore_packets:
                nic_cmd.append("--ignore-packets")
            if info["node"] in args.on:
                nic_cmd.append("--boot-at-start")
            nic_cmd += ["--", *boot]
            out = open(node_dir / "nic.out", "w")
            err = open(node_dir / "nic.log", "a")
            nic = subprocess.Popen(nic_cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
            out.close()
            err.close()
            (node_dir / "nic.pid").write_text(f"{nic.pid}\n")
            deadline = time.monotonic() + 10
            while "listening" not in (node_dir / "nic.out").read_text():
                if nic.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"netns-lab: the stand-in NIC of {info['node']} did not start; "
                                     f"see {node_dir / 'nic.log'}")
                time.sleep(0.02)
            info.update({
                "state": str(node_dir),
                "nic_pid": nic.pid,
                "sshd_pid": ssh_info["pid"],
                "agent_pid_file": str(pid_file),
                "poweroff_log": str(poweroff_log),
                "nic_log": str(node_dir / "nic.log"),
                "ignore_packets": info["node"] in args.ignore_packets,
                "boot_command": boot,
            })
        (state / "known_hosts").write_text("\n".join(known_hosts_lines) + "\n")
        lab = {
            "name": name,
            "subnet": str(net),
            "host_interface": host_if,
            "host_address": host_ip,
            "broadcast": broadcast,
            "wol_port": args.wol_port,
            "client_key": str(client_key),
            "known_hosts": str(state / "known_hosts"),
            "power_toml": str(state / "power.toml"),
            "state": str(state),
            "nodes": node_info,
        }
        (state / "power.toml").write_text(power_toml(lab, args))
        (state / "state.json").write_text(json.dumps(lab, indent=2) + "\n")
    except BaseException:
        log("set-up failed; removing what was built")
        teardown(name)
        raise
    log(f"lab {name!r} up in {time.monotonic() - t0:.2f}s; state in {state}")
    print(json.dumps(lab, indent=2))
    return 0


def power_toml(lab: dict, args: argparse.Namespace) -> str:
    lines = ["# Written by deploy/lab/netns_lab.py for the lab " + repr(lab["name"]) + ".", ""]
    if args.broker_url:
        lines += ["[broker]", f"url = {json.dumps(args.broker_url)}"]
        if args.broker_user:
            lines.append(f"user = {json.dumps(args.broker_user)}")
        if args.broker_password_file:
            lines.append(f"password_file = {json.dumps(args.broker_password_file)}")
        lines.append("")
    lines += ["[power]", "wake_timeout_s = 300", "shutdown_timeout_s = 60", "stale_after_s = 30", ""]
    for n in lab["nodes"]:
        lines += [
            f"[nodes.{json.dumps(n['node'])}]",
            f"mac = {json.dumps(n['mac'])}",
            f"address = {json.dumps(n['address'])}",
            f"wol_broadcast = {json.dumps(lab['broadcast'])}",
            f"wol_port = {lab['wol_port']}",
            f"wol_source = {json.dumps(lab['host_address'])}",
            'ssh_user = "root"',
            "ssh_port = 22",
            f"ssh_key = {json.dumps(lab['client_key'])}",
            f"known_hosts = {json.dumps(lab['known_hosts'])}",
            'shutdown_command = "shutdown -h now"',
            "",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------- down


def _pid_from(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _stop(pid: int, what: str, group: bool = False, grace: float = 10.0) -> None:
    if not _alive(pid):
        return
    try:
        (os.killpg if group else os.kill)(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        log(f"{what} (pid {pid}) ignored SIGTERM for {grace:.0f}s; killing it")
        try:
            (os.killpg if group else os.kill)(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


def teardown(name: str) -> None:
    state = state_dir(name)
    if state.exists():
        for node_dir in sorted(p for p in state.iterdir() if p.is_dir()):
            # The NIC stops its node's boot command itself on SIGTERM.
            nic = _pid_from(node_dir / "nic.pid")
            if nic and "standin_nic.py" in _cmdline(nic):
                _stop(nic, f"NIC of {node_dir.name}")
            agent = _pid_from(node_dir / "agent.pid")
            if agent and _alive(agent):
                _stop(agent, f"boot command of {node_dir.name}", group=True)
            if (node_dir / "ssh").exists():
                sh(sys.executable, str(SSH), "down", "--dir", str(node_dir / "ssh"), check=False)
    for ns in our_namespaces(name):
        # Anything still running inside (an sshd whose pid file was lost).
        for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
            _stop(int(pid), f"process in {ns}", grace=3.0)
        sh("ip", "netns", "del", ns, check=False)
    if sh("ip", "link", "show", f"{name}-h", check=False).returncode == 0:
        sh("ip", "link", "del", f"{name}-h", check=False)
    if state.exists():
        subprocess.run(["rm", "-rf", str(state)], check=False)


def down(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise SystemExit("netns-lab: needs root")
    teardown(args.name)
    left = our_namespaces(args.name)
    if left:
        raise SystemExit(f"netns-lab: could not remove {', '.join(left)}")
    log(f"lab {args.name!r} down")
    return 0


def status(args: argparse.Namespace) -> int:
    path = state_dir(args.name) / "state.json"
    if not path.exists():
        print(f"lab {args.name!r} is not up")
        return 1
    lab = json.loads(path.read_text())
    for n in lab["nodes"]:
        agent = _pid_from(Path(n["agent_pid_file"]))
        nic = "NIC up" if _alive(n["nic_pid"]) else "NIC DOWN"
        power = f"on (pid {agent})" if agent and _alive(agent) else "off"
        sshd = "sshd up" if _alive(n["sshd_pid"]) else "sshd DOWN"
        print(f"{n['node']:<12} {n['address']:<15} {n['mac']}  {power:<16} {nic}, {sshd}"
              f"{', ignores packets' if n['ignore_packets'] else ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="action", required=True)
    u = sub.add_parser("up", help="build the lab (removes a previous one of the same name)")
    u.add_argument("--name", default="pwlab", help="lab name: prefix of namespaces and interfaces (<= 10 chars)")
    u.add_argument("--nodes", default="node-1,node-2,node-3", help="comma-separated node names")
    u.add_argument("--subnet", default="10.213.7.0/24", help="private subnet that exists only in the lab")
    u.add_argument("--boot", required=True,
                   help="boot command template; {node} {index} {address} {state} are replaced")
    u.add_argument("--on", type=lambda s: [x for x in s.split(",") if x], default=[],
                   help="nodes that start powered on")
    u.add_argument("--ignore-packets", type=lambda s: [x for x in s.split(",") if x], default=[],
                   help="nodes whose NIC never wakes them")
    u.add_argument("--hard-poweroff", type=lambda s: [x for x in s.split(",") if x], default=[],
                   help="nodes whose poweroff kills the agent at once (no NodeOffline) and then their sshd")
    u.add_argument("--boot-delay", type=float, default=0.0, help="seconds from magic packet to boot command")
    u.add_argument("--wol-port", type=int, default=9)
    u.add_argument("--sim-cluster", help="simulated cluster folder (enersis.agent.simulated): boot powers the "
                                         "node on there, the SSH poweroff powers it off (killing its VMs, as a real one)")
    u.add_argument("--sim-python", default=sys.executable,
                   help="python that can import enersis, for --sim-cluster (default: this one)")
    u.add_argument("--broker-url", help="[broker] url for the generated power.toml")
    u.add_argument("--broker-user", help="[broker] user for the generated power.toml")
    u.add_argument("--broker-password-file", help="[broker] password_file for the generated power.toml")
    d = sub.add_parser("down", help="remove the lab and everything it started")
    d.add_argument("--name", default="pwlab")
    s = sub.add_parser("status", help="show each node: powered, NIC, sshd")
    s.add_argument("--name", default="pwlab")
    args = p.parse_args(argv)
    return {"up": up, "down": down, "status": status}[args.action](args)


if __name__ == "__main__":
    sys.exit(main())
