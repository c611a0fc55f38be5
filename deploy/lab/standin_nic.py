#!/usr/bin/env python3
"""Stand-in network card with Wake-on-LAN: the "power supply" of a lab or demo node.

A real node that is off still listens on its NIC for a magic packet
(6 x 0xFF then 16 x its MAC) and boots when one arrives.  This script does
the same in user space:

    standin_nic.py --listen ADDR:PORT --mac MAC [--netns NS] [--pid-file F] -- BOOT_COMMAND...

- Listens for UDP datagrams on ADDR:PORT.  A socket bound to a unicast
  address hears no broadcast: in a namespace listen on 0.0.0.0:9; on
  loopback give each node its own port and send to 127.0.0.1:PORT (several
  NICs may share 0.0.0.0:PORT and hear a send to 127.255.255.255, but that
  also listens on every interface).
- A datagram that holds its own magic packet boots the node: BOOT_COMMAND
  (e.g. that node's `enersis agent --config node.toml`) is started once.
  While it runs the node is "on" and further packets are only logged; when
  it exits (the stand-in for poweroff stopped it) the node is "off" again and
  the next packet boots it again.
- --ignore-packets: the NIC hears packets but never boots (WoL disabled in
  the BIOS, a broken card) -- for testing wake timeouts.
- --netns NS: the listening socket is created inside network namespace NS
  (/run/netns/NS) while this process and the boot command stay in the
  current one, so a node's agent still reaches a broker on 127.0.0.1.
- --pid-file F: the running boot command's pid is kept in F (removed when
  it exits) so the stand-in poweroff can find it.
- --boot-at-start: the node starts "on" (boots once without a packet).
- --boot-delay S: seconds between the packet and the boot command (POST).

The stand-in poweroff (an sshd forced command, see ssh_standin.py):

    standin_nic.py --poweroff F [--poweroff-log LOG]

sends SIGTERM to the process group in pid file F, waits for it to exit
(SIGKILL after --grace seconds; at once with --hard, a pulled plug) and
appends one line to LOG.

Ready signal: once listening, "listening on ADDR:PORT for MAC" is printed
on stdout (flushed).  Stdlib only: it runs on any python3.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

CLONE_NEWNET = 0x40000000
MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}([:-]?)[0-9A-Fa-f]{2}(\1[0-9A-Fa-f]{2}){4}$")


def log(msg: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S.%f")[:-3]
    print(f"{stamp} standin-nic: {msg}", file=sys.stderr, flush=True)


def parse_mac(text: str) -> bytes:
    if not MAC_RE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a MAC address like 52:54:00:12:34:56")
    return bytes.fromhex(re.sub(r"[:-]", "", text))


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ADDR:PORT, e.g. 0.0.0.0:9")
    return host or "0.0.0.0", int(port)


def magic_packet(mac: bytes) -> bytes:
    return b"\xff" * 6 + mac * 16


def holds_magic_packet(datagram: bytes, mac: bytes) -> bool:
    # A magic packet may sit anywhere in the payload (some senders prefix it).
    return magic_packet(mac) in datagram


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def open_socket(host: str, port: int, netns: str | None) -> socket.socket:
    """A bound UDP socket; with netns, bound inside that namespace (the socket keeps it)."""
    if netns is None:
        return _bind(host, port)
    # setns changes only the calling thread; this runs before any other thread exists.
    here = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    except FileNotFoundError:
        os.close(here)
        raise SystemExit(f"standin-nic: network namespace {netns!r} does not exist (/run/netns/{netns})")
    try:
        _setns(target)
        try:
            return _bind(host, port)
        finally:
            _setns(here)
    finally:
        os.close(target)
        os.close(here)


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # SO_REUSEADDR lets several NICs share a port on loopback and all hear a
    # broadcast; no SO_REUSEPORT, which would spread unicast between them.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.bind((host, port))
    return sock


class Node:
    """The node behind the NIC: off, or on while its boot command runs."""

    def __init__(self, command: list[str], pid_file: str | None, boot_delay: float):
        self.command = command
        self.pid_file = pid_file
        self.boot_delay = boot_delay
        self.proc: subprocess.Popen | None = None
        self.booting = False
        self.lock = threading.Lock()
        self.boots = 0

    def is_on(self) -> bool:
        with self.lock:
            return self.booting or (self.proc is not None and self.proc.poll() is None)

    def power_on(self, why: str) -> None:
        with self.lock:
            if self.booting or (self.proc is not None and self.proc.poll() is None):
                log(f"{why}: node is already on, nothing to do")
                return
            self.booting = True
        threading.Thread(target=self._boot, args=(why,), daemon=True).start()

    def _boot(self, why: str) -> None:
        if self.boot_delay > 0:
            log(f"{why}: booting in {self.boot_delay:.1f}s")
            time.sleep(self.boot_delay)  # the stand-in for POST; not a wait on evidence
        try:
            # Own session: the poweroff stops the whole process group.
            proc = subprocess.Popen(self.command, start_new_session=True)
        except OSError as exc:
            log(f"{why}: boot command failed to start: {exc}")
            with self.lock:
                self.booting = False
            return
        with self.lock:
            self.proc = proc
            self.booting = False
            self.boots += 1
        if self.pid_file:
            tmp = f"{self.pid_file}.tmp"
            with open(tmp, "w") as fh:
                fh.write(f"{proc.pid}\n")
            os.replace(tmp, self.pid_file)
        log(f"{why}: booted (pid {proc.pid}): {' '.join(self.command)}")
        code = proc.wait()
        if self.pid_file:
            try:
                with open(self.pid_file) as fh:
                    if fh.read().strip() == str(proc.pid):
                        os.unlink(self.pid_file)
            except FileNotFoundError:
                pass
        log(f"node is off (boot command exited with {code})")

    def power_off(self, grace: float = 10.0) -> None:
        with self.lock:
            proc = self.proc
        if proc is not None and proc.poll() is None:
            stop_group(proc.pid, grace)


def stop_group(pid: int, grace: float, hard: bool = False) -> bool:
    """SIGTERM the process group led by pid, SIGKILL after grace (at once if hard); True if it was running."""
    try:
        os.killpg(pid, signal.SIGKILL if hard else signal.SIGTERM)
    except ProcessLookupError:
        return False
    except PermissionError:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of someone else still answers kill(0): look at its state.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def poweroff(pid_file: str, log_file: str | None, grace: float, hard: bool = False) -> int:
    try:
        with open(pid_file) as fh:
            pid = int(fh.read().strip())
    except (FileNotFoundError, ValueError):
        pid = 0
    was_on = stop_group(pid, grace, hard) if pid > 0 else False
    line = f"{time.time():.3f} poweroff{' (hard)' if hard else ''} pid={pid or '-'} was_on={was_on} by={os.environ.get('SSH_CONNECTION', 'local')!r} asked={os.environ.get('SSH_ORIGINAL_COMMAND', '')!r}\n"
    if log_file:
        with open(log_file, "a") as fh:
            fh.write(line)
    print("powered off" if was_on else "already off", flush=True)
    return 0


def serve(args: argparse.Namespace) -> int:
    mac = args.mac
    mac_text = ":".join(f"{b:02x}" for b in mac)
    sock = open_socket(args.listen[0], args.listen[1], args.netns)
    node = Node(args.command, args.pid_file, args.boot_delay)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    where = f" in netns {args.netns}" if args.netns else ""
    print(f"listening on {args.listen[0]}:{args.listen[1]}{where} for {mac_text}"
          f"{' (ignoring packets)' if args.ignore_packets else ''}", flush=True)
    if args.boot_at_start:
        node.power_on("boot at start")
    sock.settimeout(0.5)  # so a stop signal is noticed
    while not stop.is_set():
        try:
            data, sender = sock.recvfrom(2048)
        except socket.timeout:
            continue
        except InterruptedError:
            continue
        if not holds_magic_packet(data, mac):
            continue  # someone else's packet, or noise
        why = f"magic packet from {sender[0]}:{sender[1]}"
        if args.ignore_packets:
            log(f"{why}: ignored (--ignore-packets)")
            continue
        node.power_on(why)
    sock.close()
    node.power_off(args.grace)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                usage="%(prog)s --listen ADDR:PORT --mac MAC [options] -- BOOT_COMMAND...\n"
                                      "       %(prog)s --poweroff PID_FILE [--poweroff-log LOG]")
    p.add_argument("--listen", type=parse_listen, help="ADDR:PORT to listen on (0.0.0.0:9 in a namespace)")
    p.add_argument("--mac", type=parse_mac, help="this node's MAC address")
    p.add_argument("--netns", help="create the listening socket in this network namespace")
    p.add_argument("--pid-file", help="keep the running boot command's pid here")
    p.add_argument("--ignore-packets", action="store_true", help="never boot (WoL disabled / broken NIC)")
    p.add_argument("--boot-at-start", action="store_true", help="the node starts powered on")
    p.add_argument("--boot-delay", type=float, default=0.0, help="seconds between packet and boot")
    p.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL on poweroff")
    p.add_argument("--poweroff", metavar="PID_FILE", help="stop the node whose boot command's pid is in PID_FILE")
    p.add_argument("--poweroff-log", metavar="LOG", help="with --poweroff: append a line to LOG")
    p.add_argument("--hard", action="store_true",
                   help="with --poweroff: SIGKILL at once, as pulling the plug (the agent cannot say goodbye)")
    args = p.parse_args(argv)
    if args.poweroff:
        return poweroff(args.poweroff, args.poweroff_log, args.grace, args.hard)
    if not args.listen or args.mac is None or not command:
        p.error("--listen, --mac and a boot command after -- are required")
    args.command = command
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
