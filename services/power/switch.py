"""PowerSwitch: the small interface behind which the power service touches hardware.

The real adapter sends Wake-on-LAN magic packets (wakeonlan) and runs the
node's configured shutdown command over SSH (paramiko), trusting only host
keys already in the node's known_hosts file (RejectPolicy: an unknown host
key is refused, never added).  Nothing from a message reaches the remote command: it is
the inventory's shutdown_command, verbatim.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from .inventory import NodePower

log = logging.getLogger("enersis.power.switch")
logging.getLogger("paramiko").setLevel(logging.WARNING)  # logs every failed handshake as an ERROR traceback


class SwitchError(Exception):
    """The switch could not do what was asked.

    `ran` says whether the remote command may have started: False means
    nothing was executed on the node (refused host key, refused login,
    unreachable).
    """

    def __init__(self, reason: str, *, retryable: bool = False, ran: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.ran = ran


@dataclass(frozen=True)
class ShutdownSent:
    """The shutdown command was delivered; the node's own evidence says whether it went down."""

    exit_status: int | None  # None: the session ended before a status came back (a real poweroff may cut it)
    output: str = ""
    seconds: float = 0.0


class PowerSwitch(Protocol):
    def wake(self, node: NodePower) -> int:
        """Send magic packets; return how many. Raise SwitchError when none could be sent."""

    def shutdown(self, node: NodePower) -> ShutdownSent:
        """Run the node's shutdown command over SSH. Raise SwitchError when it could not be delivered."""

    def ssh_port_open(self, node: NodePower, timeout: float = 2.0) -> bool:
        """Does anything accept a TCP connection on the node's SSH port?"""


def _send_magic_packet(mac: str, host: str, port: int, source: str | None) -> None:
    import wakeonlan

    # wakeonlan's `interface` is the SOURCE address to bind (LAB.md §5); 4.0 renamed the call to wake().
    if hasattr(wakeonlan, "wake"):
        wakeonlan.wake(mac, host=host, port=port, interface=source)
    else:  # wakeonlan 3.x
        wakeonlan.send_magic_packet(mac, ip_address=host, port=port, interface=source)


class WolSshSwitch:
    """Wake-on-LAN out, SSH shutdown in: the real hardware adapter."""

    def __init__(
        self,
        *,
        repeats: int = 3,
        gap_s: float = 0.2,
        connect_timeout_s: float = 10.0,
        command_timeout_s: float = 30.0,
        send: Callable[[str, str, int, str | None], None] = _send_magic_packet,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.repeats = max(1, repeats)
        self.gap_s = gap_s
        self.connect_timeout_s = connect_timeout_s
        self.command_timeout_s = command_timeout_s
        self._send = send
        self._sleep = sleep

    # -- Wake-on-LAN

    def wake(self, node: NodePower) -> int:
        sent = 0
        last: OSError | None = None
        for i in range(self.repeats):
            if i:
                self._sleep(self.gap_s)  # packets are cheap and may be dropped: a few, spread a little
            try:
                self._send(node.mac, node.wol_broadcast, node.wol_port, node.wol_source)
                sent += 1
            except OSError as exc:
                last = exc
        if not sent:
            src = f" from {node.wol_source}" if node.wol_source else ""
            raise SwitchError(f"could not send a magic packet for {node.mac} to {node.wol_broadcast}:{node.wol_port}"
                              f"{src}: {last}", retryable=True)
        log.info("sent %d magic packet(s) for %s (%s) to %s:%d", sent, node.name, node.mac, node.wol_broadcast, node.wol_port)
        return sent

    # -- SSH

    def shutdown(self, node: NodePower) -> ShutdownSent:
        import paramiko

        t0 = time.monotonic()
        client = paramiko.SSHClient()
        try:
            # Only this node's known_hosts: never the user's, never a key learnt on first use.
            client.load_host_keys(node.known_hosts)
        except (OSError, paramiko.SSHException) as exc:
            raise SwitchError(f"cannot read known_hosts {node.known_hosts}: {exc}; nothing was run") from None
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            try:
                client.connect(
                    node.address,
                    port=node.ssh_port,
                    username=node.ssh_user,
                    key_filename=node.ssh_key,
                    allow_agent=False,
                    look_for_keys=False,
                    timeout=self.connect_timeout_s,
                    banner_timeout=self.connect_timeout_s,
                    auth_timeout=self.connect_timeout_s,
                )
            except paramiko.BadHostKeyException as exc:
                raise SwitchError(
                    f"host key of {node.address}:{node.ssh_port} does not match {node.known_hosts} "
                    f"(got {exc.key.get_name()} {exc.key.get_fingerprint().hex()}): possible impostor; nothing was run"
                ) from None
            except paramiko.AuthenticationException as exc:
                raise SwitchError(f"{node.ssh_target} refused the key {node.ssh_key} ({exc}); nothing was run") from None
            except paramiko.SSHException as exc:
                if "known_hosts" in str(exc):
                    raise SwitchError(f"{node.address}:{node.ssh_port} has no entry in {node.known_hosts} "
                                      "(add its host key; unknown keys are refused); nothing was run") from None
                raise SwitchError(f"SSH to {node.ssh_target} failed: {exc}; nothing was run", retryable=True) from None
            except (OSError, EOFError) as exc:
                raise SwitchError(f"cannot reach {node.ssh_target}: {exc}; nothing was run", retryable=True) from None
            try:
                stdin, stdout, stderr = client.exec_command(node.shutdown_command, timeout=self.command_timeout_s)
                stdin.close()
                channel = stdout.channel
                # A real poweroff may cut the session before the exit status arrives: that is success here;
                # the node's own NodeOffline (or silence) is the proof.
                got_status = channel.status_event.wait(self.command_timeout_s)
                output = _drain(stdout) + _drain(stderr) if got_status else ""
                status = channel.recv_exit_status() if got_status and channel.exit_status_ready() else None
                if status == -1:  # paramiko's "closed without a status"
                    status = None
            except (paramiko.SSHException, OSError, EOFError) as exc:
                log.info("session to %s ended early (%s): treating the command as sent", node.ssh_target, exc)
                status, output = None, ""
            return ShutdownSent(exit_status=status, output=output.strip()[:500], seconds=time.monotonic() - t0)
        finally:
            client.close()

    def ssh_port_open(self, node: NodePower, timeout: float = 2.0) -> bool:
        try:
            with socket.create_connection((node.address, node.ssh_port), timeout=timeout):
                return True
        except OSError:
            return False


def _drain(stream: object) -> str:
    try:
        return stream.read().decode(errors="replace")  # type: ignore[attr-defined]
    except Exception:  # a cut session: the output is a courtesy
        return ""
