"""A shortened `enersis demo`: the real processes, talking only through the real broker.

One demo cluster runs for the module (3 nodes, one off at start, 4 VMs of
2 vCPUs).  Its traces are made here, in PlanetLab's format, so the story is
certain in a short run: half an hour of simulated overload (the arbiter must
wake the spare node), then near-idle load (it must empty nodes and power them
off).  While it runs, the operator tools and the README's management-UI JSON
are used against it.  At the end: the summary (energy below all-on, no VM
lost) and nothing of it left running.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from enersis.cli import main as cli_main
from enersis.common.codec import now_ms
from enersis.common.config import BrokerSettings
from enersis.ops.watch import BusWatcher

from .conftest import wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DEMO_S = 95.0
SPEEDUP = 60.0


def readme_ui_json() -> tuple[str, dict]:
    """The routing key and JSON the README tells an operator to paste into "Publish message"."""
    text = README.read_text()
    m = re.search(r"<!-- ui-migrate -->.*?routing key[^`]*`([^`]+)`.*?```json\n(.*?)\n```", text, re.S | re.I)
    assert m, "README.md lost its management-UI migrate example (marker <!-- ui-migrate -->)"
    return m.group(1), json.loads(m.group(2))


def write_traces(folder: Path, count: int) -> None:
    # One value per 300 simulated seconds: 6 steps at 90 % (30 real seconds at 60x), then 5 %.
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"made-here-{i}").write_text("\n".join(["90"] * 6 + ["5"] * 282) + "\n")


def demo_processes(run_dir: Path) -> list[str]:
    """Every live process whose command line mentions the run folder."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if str(run_dir) in cmd and state != "Z":
            found.append(f"{pid}: {cmd[:200]}")
    return found


class RunningDemo:
    def __init__(self, broker, vhost: str, run_dir: Path, traces: Path, port_base: int, *extra: str,
                 duration: float = DEMO_S):
        self.run_dir = run_dir
        self.summary_path = run_dir.parent / f"{run_dir.name}.summary.json"
        self.out_path = run_dir.parent / f"{run_dir.name}.out"
        argv = [sys.executable, "-m", "enersis.cli", "demo", "--nodes", "3", "--powered-off", "1", "--vms", "4",
                "--vm-vcpus", "2", "--policy", "enersis-2012", "--upper", "80", "--lower", "20", "--cycle", "2",
                "--publish-interval", "1", "--speedup", str(SPEEDUP), "--duration", str(duration),
                "--trace-dir", str(traces), "--run-dir", str(run_dir), "--vhost", vhost,
                "--broker-dir", broker.info["dir"], "--port-base", str(port_base), "--live", "lines",
                "--summary-json", str(self.summary_path), *extra]
        env = dict(os.environ)
        env.pop("ENERSIS_AMQP_URL", None)
        self.out = open(self.out_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self.out, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def output(self) -> str:
        return self.out_path.read_text()

    def wait_live(self, timeout: float = 90) -> None:
        wait_for(lambda: "the cluster is live" in self.output() or self.proc.poll() is not None, timeout, 0.2, "the demo cluster to come up")
        assert self.proc.poll() is None, self.output()

    def finish(self, timeout: float) -> dict:
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                self.proc.wait(60)
            self.out.close()
        return json.loads(self.summary_path.read_text()) if self.summary_path.exists() else {}

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        for p in (self.summary_path, self.out_path):
            p.unlink(missing_ok=True)


def port_base() -> int:
    return 41000 + (os.getpid() % 250) * 10


@pytest.fixture(scope="module")
def demo(broker, tmp_path_factory):
    vhost = f"demo-{uuid.uuid4().hex[:8]}"  # the demo creates it with the topology
    traces = tmp_path_factory.mktemp("traces") / "planetlab-format"
    write_traces(traces, 4)
    # Not under /tmp: sshd's StrictModes refuses keys below a world-writable folder.
    run_dir = Path("/var/lib/enersis-demo") / f"test-{uuid.uuid4().hex[:8]}"
    d = RunningDemo(broker, vhost, run_dir, traces, port_base())
    d.vhost = vhost
    settings = BrokerSettings(host="127.0.0.1", port=broker.amqp_port, vhost=vhost, user="operator",
                              password=broker.passwords["operator"], heartbeat_s=10)
    try:
        d.wait_live()
        d.watcher = BusWatcher(settings, connect_timeout_s=20).open()
        d.events: list[tuple[str, str, str]] = []  # (kind, status, node) of results, in order
        d.results: list = []
        d.watcher.listeners.append(
            lambda env: (d.events.append((env.message.command_kind, env.message.status, env.message.node)),
                         d.results.append(env.message)) if env.kind == "CommandResult" else None)
        d.operator_toml = str(run_dir / "operator.toml")
        yield d
    finally:
        if getattr(d, "watcher", None):
            d.watcher.close()
        d.cleanup()
        broker.delete_vhost(vhost)


def pump_until(d, cond, timeout: float, what: str) -> None:
    assert d.watcher.pump_until(cond, timeout), f"timed out after {timeout}s waiting for {what}\n{d.output()[-3000:]}"


def test_the_arbiter_wakes_a_node_under_load_and_powers_nodes_off_when_idle(demo):
    pump_until(demo, lambda: ("WakeNode", "succeeded", "node-3") in demo.events, 60, "the arbiter to wake node-3")
    pump_until(demo, lambda: any(k == "ShutdownNode" and s == "succeeded" for k, s, _ in demo.events), 60,
               "the arbiter to power a node off once the load dropped")
    assert any(r.command_kind == "MigrateVm" and r.status == "succeeded" and r.details.get("target") == "node-3"
               for r in demo.results), "a VM moved to the woken node"


def settle(demo) -> None:
    """Nothing in flight, and every online node reported after that: the bus view is the cluster's."""
    view = demo.watcher.view
    pump_until(demo, lambda: not view.in_flight(), 60, "the commands in flight to finish")
    mark = now_ms()
    pump_until(demo, lambda: all(r.telemetry_ts_ms > mark for r in view.nodes.values()
                                 if r.state(now_ms()) == "online"), 30, "a fresh report from every online node")


def test_status_shows_the_running_cluster(demo, broker, capsys):
    # Pause the arbiter so nothing moves while we look (and later move VMs by hand).
    assert cli_main(["send", "pause", "--config", demo.operator_toml, "--timeout", "30"]) == 0
    assert "succeeded: PauseAutomation" in capsys.readouterr().out
    settle(demo)
    code = cli_main(["status", "--config", demo.operator_toml, "--vms", "--listen", "8",
                     "--mgmt-url", f"http://127.0.0.1:{broker.mgmt_port}/"])
    out = capsys.readouterr().out
    assert code == 0, out
    vm_lines = [l for l in out.splitlines() if l.startswith("vm-")]
    assert sorted(l.split()[0] for l in vm_lines) == ["vm-1", "vm-2", "vm-3", "vm-4"]
    assert re.search(r"^node-\d+\s+on\s", out, re.M)
    # With the management API, a node that is off (it sends nothing) is listed too.
    assert sorted(re.findall(r"^(node-\d+)\s", out, re.M)) == ["node-1", "node-2", "node-3"]


def test_operator_commands_and_the_readme_json_against_the_running_cluster(demo, broker, capsys):
    # The arbiter is paused (previous test): wake a node by hand.
    now = now_ms()
    view = demo.watcher.view
    pump_until(demo, lambda: sum(1 for n in ("node-1", "node-2", "node-3")
                                 if n in view.nodes and view.nodes[n].state(now_ms()) in ("off", "online")) == 3,
               30, "every node settled (on or off)")
    online = sorted(n for n, r in view.nodes.items() if r.state(now_ms()) == "online")
    off = sorted(n for n, r in view.nodes.items() if r.state(now_ms()) == "off")
    assert off, f"after the idle phase some node is off (online: {online})"
    target = off[0]
    code = cli_main(["send", "wake", target, "--config", demo.operator_toml, "--timeout", "60"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"succeeded: WakeNode node={target}" in out
    pump_until(demo, lambda: view.nodes[target].state(now_ms()) == "online"
               and view.nodes[target].telemetry_ts_ms > now, 30, f"{target} reporting")

    # Exactly what the README says to paste into the management UI, with this cluster's names.
    settle(demo)
    key, envelope = readme_ui_json()
    source = max(online, key=lambda n: (len([d for d in view.nodes[n].vms if d.running]), n))
    vm = sorted(d.name for d in view.nodes[source].telemetry.domains if d.running)[0]
    assert view.where_is(vm, now_ms()) == source
    envelope["body"].update(vm=vm, source=source, target=target, command_id=f"ui-{uuid.uuid4().hex[:8]}")
    key = key.replace(key.split(".", 1)[1], source)
    routed = broker.api("POST", f"exchanges/{demo.vhost}/enersis.commands/publish", {
        "properties": {"content_type": "application/json"}, "routing_key": key,
        "payload": json.dumps(envelope), "payload_encoding": "string"}, user="operator")
    assert routed == {"routed": True}
    cid = envelope["body"]["command_id"]
    pump_until(demo, lambda: cid in view.commands and view.commands[cid].final, 60, "the UI migration's result")
    assert view.commands[cid].status == "succeeded", (view.commands[cid], demo.events[-12:], online, off)
    pump_until(demo, lambda: view.where_is(vm, now_ms()) == target, 20, f"{vm} reported on {target}")

    # The same with the CLI, the source looked up from telemetry: move it back.
    code = cli_main(["send", "migrate", vm, "--to", source, "--config", demo.operator_toml, "--timeout", "60"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"{vm} {target} -> {source}" in out and "succeeded: MigrateVm" in out
    # A VM that does not exist, and a node that does not exist: clear errors, nothing sent.
    assert cli_main(["send", "migrate", "vm-99", "--to", source, "--config", demo.operator_toml,
                     "--lookup-timeout", "5"]) == 2
    assert cli_main(["send", "migrate", vm, "--to", "node-77", "--config", demo.operator_toml]) == 2
    err = capsys.readouterr().err
    assert "vm-99" in err and "node-77" in err
    # A node the power service does not know: its refusal, with the reason, and exit 1.
    assert cli_main(["send", "wake", "node-77", "--config", demo.operator_toml, "--timeout", "30"]) == 1
    assert "rejected: WakeNode node=node-77 - node-77 is not in this power service's inventory" in capsys.readouterr().out
    # Maintenance: drain the source (its VMs go to the woken node), then give it back.  The arbiter
    # leaves a VM an operator moved alone for a while; `unpin` hands it back at once.
    assert cli_main(["send", "unpin", vm, "--config", demo.operator_toml, "--timeout", "30"]) == 0
    code = cli_main(["send", "drain", source, "--config", demo.operator_toml, "--timeout", "60"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"succeeded: DrainNode node={source}" in out
    settle(demo)
    assert all(view.where_is(v, now_ms()) != source for v in ("vm-1", "vm-2", "vm-3", "vm-4"))
    assert cli_main(["send", "undrain", source, "--config", demo.operator_toml, "--timeout", "30"]) == 0
    assert cli_main(["send", "resume", "--config", demo.operator_toml, "--timeout", "30"]) == 0
    demo.manual_done_at = time.monotonic()


def test_summary_saves_energy_loses_no_vm_and_leaves_nothing_running(demo):
    # The manual part must end well before the run does, or the arbiter had no time after it.
    assert demo.proc.poll() is None, "the demo ended before the operator tests were done"
    summary = demo.finish(timeout=DEMO_S + 120)
    out = demo.output()
    assert demo.proc.returncode == 0, out[-3000:]
    assert "Enersis demo summary" in out
    assert summary["vms_lost"] == [] and summary["vms_running"] == 4, summary
    assert summary["wakes"] >= 2 and summary["shutdowns"] >= 1 and summary["migrations"] >= 3, summary
    assert 0 < summary["energy_kwh"] < summary["baseline_kwh"], summary
    assert summary["problems"] == [], summary
    assert demo_processes(demo.run_dir) == []


def test_ctrl_c_stops_everything_cleanly(broker, tmp_path):
    traces = tmp_path / "traces"
    write_traces(traces, 2)
    run_dir = Path("/var/lib/enersis-demo") / f"test-{uuid.uuid4().hex[:8]}"
    vhost = f"demo-{uuid.uuid4().hex[:8]}"
    d = RunningDemo(broker, vhost, run_dir, traces, port_base() + 5, "--no-arbiter", duration=600)
    try:
        wait_for(lambda: "[" in d.output() and "VMs" in d.output() or d.proc.poll() is not None, 90, 0.2,
                 "the demo's first status line")
        assert d.proc.poll() is None, d.output()
        assert demo_processes(run_dir), "the demo runs its processes"
        started = time.monotonic()
        d.proc.send_signal(signal.SIGINT)
        summary = d.finish(timeout=60)
        assert time.monotonic() - started < 60
        assert "Enersis demo summary" in d.output() and summary["interrupted"] is True
        assert summary["vms_lost"] == []
        assert demo_processes(run_dir) == [], "nothing left running"
    finally:
        d.cleanup()
        broker.delete_vhost(vhost)
