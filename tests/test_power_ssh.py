"""The real SSH half of the power switch against real sshds on loopback (deploy/lab/ssh_standin.py).

Each case is one forced command, so what the node "does" is fixed by its
key, whatever the client asks: a clean exit, a failing command, a poweroff
that cuts the session before the exit status, a refused key, a closed port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from enersis.power.inventory import NodePower
from enersis.power.switch import SwitchError, WolSshSwitch
from tests.conftest import REPO

STANDIN = REPO / "deploy" / "lab" / "ssh_standin.py"
STATE = Path("/var/lib/enersis-lab/test-ssh")  # not under /tmp: sshd's StrictModes

if os.geteuid() != 0 or not Path("/usr/sbin/sshd").exists() or not shutil.which("ssh-keygen"):
    pytest.skip("needs root and openssh-server (sshd runs as root with its own config; CI is root)",
                allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sshd():
    """Start stand-in sshds with given forced commands; stop them all afterwards."""
    started: list[Path] = []

    def start(forced_command: str) -> NodePower:
        folder = STATE / uuid.uuid4().hex[:8]
        port = free_port()
        subprocess.run([sys.executable, str(STANDIN), "up", "--dir", str(folder), "--address", "127.0.0.1",
                        "--port", str(port), "--forced-command", forced_command], check=True, capture_output=True)
        started.append(folder)
        return NodePower(name="n1", mac="52:54:00:00:00:01", address="127.0.0.1", wol_broadcast="127.255.255.255",
                         ssh_key=str(folder / "client_ed25519"), known_hosts=str(folder / "known_hosts"),
                         ssh_port=port, shutdown_command="shutdown -h now")

    yield start
    for folder in started:
        subprocess.run([sys.executable, str(STANDIN), "down", "--dir", str(folder)], capture_output=True)
    if STATE.exists() and not any(STATE.iterdir()):
        STATE.rmdir()


SWITCH = WolSshSwitch(connect_timeout_s=5, command_timeout_s=10)


def test_a_clean_exit_and_the_request_seen_by_the_node(sshd, tmp_path):
    seen = STATE.parent / f"seen-{uuid.uuid4().hex[:6]}"
    node = sshd(f"echo $SSH_ORIGINAL_COMMAND > {seen}; echo bye")
    try:
        sent = SWITCH.shutdown(node)
        assert sent.exit_status == 0 and sent.output == "bye"
        assert seen.read_text().strip() == "shutdown -h now"
    finally:
        seen.unlink(missing_ok=True)


def test_a_failing_command_reports_its_status_and_output(sshd):
    node = sshd("echo not allowed >&2; exit 3")
    sent = SWITCH.shutdown(node)
    assert sent.exit_status == 3 and "not allowed" in sent.output


def test_a_poweroff_that_cuts_the_session_counts_as_sent(sshd):
    # The node dies under the session: no exit status ever comes back.
    node = sshd("kill -KILL $PPID")
    sent = SWITCH.shutdown(node)
    assert sent.exit_status is None


def test_a_key_the_node_does_not_know_is_refused_and_nothing_runs(sshd, tmp_path):
    node = sshd("exit 0")
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    from dataclasses import replace

    with pytest.raises(SwitchError, match="refused the key") as err:
        SWITCH.shutdown(replace(node, ssh_key=str(stranger)))
    assert not err.value.ran


def test_a_closed_port_is_unreachable_and_retryable():
    port = free_port()
    node = NodePower(name="n1", mac="52:54:00:00:00:01", address="127.0.0.1", wol_broadcast="127.255.255.255",
                     ssh_key="/dev/null", known_hosts="/dev/null", ssh_port=port)
    assert SWITCH.ssh_port_open(node, timeout=1) is False
    with pytest.raises(SwitchError, match="cannot reach") as err:
        SWITCH.shutdown(node)
    assert err.value.retryable and not err.value.ran


def test_the_port_probe_sees_a_listening_sshd(sshd):
    assert SWITCH.ssh_port_open(sshd("exit 0"), timeout=1) is True
