#!/usr/bin/env python3
"""Stand-in SSH server of a lab or demo node: key-only sshd whose one key runs one forced command.

    ssh_standin.py up --dir DIR --address ADDR --port PORT --forced-command CMD
                      [--from PATTERNS] [--netns NS] [--user root] [--client-pubkey FILE] [--json]
    ssh_standin.py down --dir DIR [--keep]
    ssh_standin.py status --dir DIR

`up` creates in DIR (mode 0700; it must not sit under a group- or
world-writable folder such as /tmp, or sshd's StrictModes refuses the keys):
a host key, a client key pair (unless --client-pubkey names yours), an
authorized_keys line `restrict,command="CMD",from="PATTERNS" ssh-ed25519 ...`,
an sshd_config (key-only, no PAM, no TTY, no forwarding,
PermitRootLogin forced-commands-only) and a known_hosts file; then starts
/usr/sbin/sshd (inside network namespace NS when given), waits for its pid
file and prints the known_hosts line (with --json: every path as JSON).

Whatever command a client asks for, sshd runs CMD (the client's request is
in $SSH_ORIGINAL_COMMAND): for the stand-in nodes CMD stops that node's
agent, e.g. `standin_nic.py --poweroff PIDFILE --poweroff-log LOG`.

`down` stops that sshd (pid file) and removes DIR unless --keep.
Stdlib only (needs openssh-server and openssh-client).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def fail(msg: str) -> "None":
    raise SystemExit(f"ssh_standin: {msg}")


def check_parents(folder: Path) -> None:
    """sshd's StrictModes refuses keys below a folder others may write to; say so up front."""
    for parent in [folder, *folder.parents]:
        if not parent.exists():
            continue
        st = parent.stat()
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            fail(f"{folder} sits under {parent}, which is group/world-writable: sshd (StrictModes) "
                 "would refuse the keys. Use a folder such as /var/lib/enersis-lab/ssh/NAME")


def default_from(address: str) -> str:
    ip = ipaddress.ip_address(address)
    if ip.is_loopback:
        return "127.0.0.0/8"
    fail("--from is required for a non-loopback address (e.g. the lab subnet, 10.213.0.0/24)")
    return ""


def known_hosts_host(address: str, port: int) -> str:
    return address if port == 22 else f"[{address}]:{port}"


def keygen(path: Path, comment: str) -> None:
    if path.exists():
        return
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)


def read_pid(folder: Path) -> int | None:
    try:
        return int((folder / "sshd.pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def up(args: argparse.Namespace) -> int:
    folder = Path(args.dir).resolve()
    check_parents(folder)
    try:
        ipaddress.ip_address(args.address)
    except ValueError:
        fail(f"--address {args.address!r} is not an IP address")
    if '"' in args.forced_command or "\n" in args.forced_command:
        fail("--forced-command must not contain double quotes or newlines (it sits inside command=\"...\")")
    patterns = args.from_ or default_from(args.address)
    if '"' in patterns:
        fail("--from must not contain double quotes")
    pid = read_pid(folder)
    if pid and alive(pid):
        fail(f"an sshd from {folder} is already running (pid {pid}); run `down` first")
    # Create missing parents 0755 whatever the umask: StrictModes checks every one of them.
    for parent in reversed(folder.parents):
        if not parent.exists():
            parent.mkdir()
            os.chmod(parent, 0o755)
    folder.mkdir(exist_ok=True)
    os.chmod(folder, 0o700)
    keygen(folder / "host_ed25519", f"standin-host-{args.address}-{args.port}")
    if args.client_pubkey:
        pub = Path(args.client_pubkey).read_text().strip()
        client_key = ""
    else:
        keygen(folder / "client_ed25519", "enersis-power")
        pub = (folder / "client_ed25519.pub").read_text().strip()
        client_key = str(folder / "client_ed25519")
    (folder / "authorized_keys").write_text(
        f'restrict,command="{args.forced_command}",from="{patterns}" {pub}\n')
    os.chmod(folder / "authorized_keys", 0o600)
    host_pub = (folder / "host_ed25519.pub").read_text().split()
    kh_line = f"{known_hosts_host(args.address, args.port)} {host_pub[0]} {host_pub[1]}"
    (folder / "known_hosts").write_text(kh_line + "\n")
    config = folder / "sshd_config"
    config.write_text("\n".join([
        f"Port {args.port}",
        f"ListenAddress {args.address}",
        f"HostKey {folder / 'host_ed25519'}",
        f"PidFile {folder / 'sshd.pid'}",
        f"AuthorizedKeysFile {folder / 'authorized_keys'}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin forced-commands-only",
        "StrictModes yes",
        "UsePAM no",
        f"AllowUsers {args.user}",
        "PermitTTY no",
        "X11Forwarding no",
        "AllowTcpForwarding no",
        "AllowAgentForwarding no",
        "PermitTunnel no",
        "UseDNS no",
        "PrintMotd no",
        "LogLevel INFO",
        "",
    ]))
    os.chmod(config, 0o600)
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege-separation folder
    prefix = ["ip", "netns", "exec", args.netns] if args.netns else []
    test = subprocess.run(prefix + [SSHD, "-t", "-f", str(config)], capture_output=True, text=True)
    if test.returncode != 0:
        fail(f"sshd rejects the configuration {config}: {test.stderr.strip()}")
    (folder / "sshd.pid").unlink(missing_ok=True)
    started = subprocess.run(prefix + [SSHD, "-f", str(config), "-E", str(folder / "sshd.log")],
                             capture_output=True, text=True)
    if started.returncode != 0:
        fail(f"sshd did not start: {started.stderr.strip()} (see {folder / 'sshd.log'})")
    # sshd writes its pid file once it listens and has detached.
    deadline = time.monotonic() + 10
    while read_pid(folder) is None:
        if time.monotonic() > deadline:
            fail(f"sshd wrote no pid file within 10 s; see {folder / 'sshd.log'}")
        time.sleep(0.02)
    info = {
        "dir": str(folder),
        "address": args.address,
        "port": args.port,
        "netns": args.netns or "",
        "user": args.user,
        "pid": read_pid(folder),
        "known_hosts": str(folder / "known_hosts"),
        "known_hosts_line": kh_line,
        "client_key": client_key,
        "forced_command": args.forced_command,
        "from": patterns,
    }
    (folder / "standin.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info) if args.json else kh_line, flush=True)
    return 0


def down(args: argparse.Namespace) -> int:
    folder = Path(args.dir).resolve()
    pid = read_pid(folder)
    if pid and alive(pid) and _is_sshd(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    if not args.keep and folder.exists():
        shutil.rmtree(folder)
    return 0


def _is_sshd(pid: int) -> bool:
    # sshd rewrites its command line ("sshd: ... [listener]"); its executable says what it is.
    try:
        return os.readlink(f"/proc/{pid}/exe").endswith("/sshd")
    except OSError:
        return False


def status(args: argparse.Namespace) -> int:
    folder = Path(args.dir).resolve()
    pid = read_pid(folder)
    running = bool(pid and alive(pid))
    print(f"sshd {'running (pid %d)' % pid if running else 'not running'} from {folder}")
    return 0 if running else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="action", required=True)
    u = sub.add_parser("up", help="set up and start the sshd")
    u.add_argument("--dir", required=True, help="0700 folder for keys, config, pid file (not under /tmp)")
    u.add_argument("--address", required=True, help="IP address to listen on")
    u.add_argument("--port", type=int, default=22)
    u.add_argument("--netns", help="run sshd inside this network namespace")
    u.add_argument("--user", default="root", help="the only user allowed to log in (default root)")
    u.add_argument("--forced-command", required=True, help="the command every login runs")
    u.add_argument("--from", dest="from_", help="authorized_keys from= patterns (default 127.0.0.0/8 on loopback)")
    u.add_argument("--client-pubkey", help="authorize this public key instead of generating a client key")
    u.add_argument("--json", action="store_true", help="print every path as JSON instead of the known_hosts line")
    d = sub.add_parser("down", help="stop the sshd and remove its folder")
    d.add_argument("--dir", required=True)
    d.add_argument("--keep", action="store_true", help="keep the folder (keys, logs)")
    s = sub.add_parser("status", help="exit 0 if the sshd runs")
    s.add_argument("--dir", required=True)
    args = p.parse_args(argv)
    return {"up": up, "down": down, "status": status}[args.action](args)


if __name__ == "__main__":
    sys.exit(main())
