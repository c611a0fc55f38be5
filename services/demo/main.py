"""Run a whole simulated cluster on this machine, each service its own process, with a live view.

    enersis demo [--nodes 8] [--duration 180] [--speedup 60] ...

Starts (or reuses) the private broker, creates a simulated cluster driven by
PlanetLab traces, and starts as separate processes, each with its own config
file under the run folder, exactly as an operator would:
  - per node: a stand-in NIC on 127.0.0.1 that boots the node's
    `enersis agent` when its Wake-on-LAN packet arrives, and a stand-in sshd
    whose forced command powers the node off;
  - `enersis power` (Wake-on-LAN + SSH to those stand-ins);
  - `enersis arbiter`.
They talk only through the broker.  The terminal shows each node's state,
load, VMs, the commands in flight and the energy used against all nodes on.
After --duration seconds (or Ctrl-C) it prints a summary and stops everything
it started.  No packet leaves the machine.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pika

from enersis.common import topology
from enersis.common.bus import BrokerUnavailable
from enersis.common.codec import now_ms
from enersis.common.config import BrokerSettings
from enersis.ops.watch import BusWatcher

from .cluster import BROKER_SCRIPT, DEFAULT_RUN_BASE, LAB, REPO, BrokerInfo, DemoError, DemoSettings, Layout, Supervisor, check_ports, mac_for
from .energy import PowerModel
from .monitor import Monitor, summary_text

log = logging.getLogger("enersis.demo")

DEFAULT_TRACES = REPO / "deploy" / "demo" / "traces"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoSettings()
    a = parser.add_argument
    a("--nodes", type=int, default=d.nodes, help=f"simulated nodes (default {d.nodes})")
    a("--vms", type=int, default=0, help="VMs (default three per node)")
    a("--powered-off", type=int, default=d.powered_off, help=f"nodes that start powered off (default {d.powered_off})")
    a("--duration", type=float, default=d.duration_s, metavar="S", help=f"real seconds to run (default {d.duration_s:g})")
    a("--speedup", type=float, default=d.speedup,
      help=f"simulated seconds per real second (default {d.speedup:g}: an hour of trace per minute)")
    a("--trace-dir", default=os.environ.get("ENERSIS_TRACE_DIR", ""),
      help=f"PlanetLab traces, one CPU %% per line (default $ENERSIS_TRACE_DIR, else {DEFAULT_TRACES})")
    a("--policy", default=d.policy, help=f"arbiter policy (default {d.policy})")
    a("--upper", type=float, default=d.upper_pct, help=f"upper CPU threshold %% (default {d.upper_pct:g})")
    a("--lower", type=float, default=d.lower_pct, help=f"lower CPU threshold %% (default {d.lower_pct:g})")
    a("--cycle", type=float, default=d.cycle_s, metavar="S", help=f"arbiter cycle (default {d.cycle_s:g}s)")
    a("--publish-interval", type=float, default=d.publish_interval_s, metavar="S",
      help=f"agents' telemetry interval (default {d.publish_interval_s:g}s)")
    a("--vm-vcpus", type=int, default=d.vm_vcpus, help=f"vCPUs per VM (default {d.vm_vcpus})")
    a("--node-cpus", type=int, default=d.node_cpus, help=f"CPUs per node (default {d.node_cpus})")
    a("--node-mem", type=int, default=d.node_mem_mib, metavar="MIB", help=f"memory per node (default {d.node_mem_mib} MiB)")
    a("--port-base", type=int, default=d.port_base,
      help=f"stand-in NICs listen on 127.0.0.1:BASE+i (UDP), sshds on BASE+500+i (default {d.port_base})")
    a("--run-dir", default="", help="folder for configs, logs, keys and the cluster (default /var/lib/enersis-demo/run-<time>)")
    a("--vhost", default=d.vhost, help="broker vhost (default enersis; created with the topology if missing)")
    a("--broker-dir", default="", help="private broker's state folder (default $ENERSIS_BROKER_DIR or <repo>/.broker)")
    a("--live", choices=("auto", "screen", "lines", "off"), default="auto",
      help="screen: redraw the terminal; lines: a status line every 10s (default: screen on a terminal)")
    a("--summary-json", default="", metavar="FILE", help="also write the summary as JSON here")
    a("--no-arbiter", action="store_true", help="run without the arbiter: nothing moves unless you send commands")
    a("--seed", type=int, default=d.seed, help="which traces the VMs get")


def settings_from(args: argparse.Namespace, trace_dir: str, run_dir: str) -> DemoSettings:
    return DemoSettings(
        nodes=args.nodes, vms=args.vms, speedup=args.speedup, duration_s=args.duration, trace_dir=trace_dir,
        powered_off=args.powered_off, vm_vcpus=args.vm_vcpus, node_cpus=args.node_cpus, node_mem_mib=args.node_mem, policy=args.policy, upper_pct=args.upper,
        lower_pct=args.lower, cycle_s=args.cycle, publish_interval_s=args.publish_interval,
        sample_interval_s=min(0.5, args.publish_interval), window_s=2 * args.publish_interval,
        port_base=args.port_base, run_dir=run_dir, vhost=args.vhost, seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    trace_dir = args.trace_dir or str(DEFAULT_TRACES)
    run_dir = args.run_dir or str(DEFAULT_RUN_BASE / f"run-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        s = settings_from(args, trace_dir, run_dir)
        validate(s)
    except DemoError as exc:
        print(f"enersis demo: {exc}", file=sys.stderr)
        return 2
    broker_dir = Path(args.broker_dir or os.environ.get("ENERSIS_BROKER_DIR") or REPO / ".broker").resolve()
    demo = Demo(s, broker_dir, live=args.live, arbiter=not args.no_arbiter)
    return demo.run(args.summary_json)


def validate(s: DemoSettings) -> None:
    if not 1 <= s.nodes <= 64:
        raise DemoError("--nodes must be 1-64")
    if not 0 <= s.powered_off < s.nodes:
        raise DemoError("--powered-off must leave at least one node on")
    if s.duration_s <= 0 or s.speedup <= 0:
        raise DemoError("--duration and --speedup must be positive")
    if not Path(s.trace_dir).is_dir():
        raise DemoError(f"trace folder {s.trace_dir} does not exist (give --trace-dir or $ENERSIS_TRACE_DIR)")
    per_node = s.node_mem_mib // s.vm_mem_mib
    if s.vm_count > per_node * (s.nodes - s.powered_off):
        raise DemoError(f"{s.vm_count} VMs of {s.vm_mem_mib} MiB do not fit on {s.nodes - s.powered_off} powered-on "
                        f"nodes of {s.node_mem_mib} MiB")


class Demo:
    def __init__(self, s: DemoSettings, broker_dir: Path, *, live: str = "auto", out: Any = sys.stdout,
                 arbiter: bool = True):
        self.s = s
        self.with_arbiter = arbiter
        self.broker_dir = broker_dir
        self.live = live
        self.out = out
        self.stop = threading.Event()
        self.started_broker = False
        self.layout: Layout | None = None
        self.sup: Supervisor | None = None

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # -- the whole run

    def run(self, summary_json: str = "") -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        summary: dict[str, Any] = {}
        problems: list[str] = []
        code = 0
        monitor: Monitor | None = None
        watcher: BusWatcher | None = None
        try:
            info = self.broker()
            self.layout = layout = Layout(self.s, info, Path(self.s.run_dir).resolve())
            check_ports(layout)
            layout.write()
            self.sup = Supervisor(layout.logs, env=child_env())
            self.say(f"run folder {layout.run} (configs, logs); broker {info.url(self.s.vhost)}")
            self.prepare_vhost(info)
            watcher = BusWatcher(self.operator_settings(info), connect_timeout_s=30).open()
            self.start_cluster(layout)
            monitor = Monitor(watcher, tuple(self.s.node_names()), self.s.vm_count, self.s.speedup, self.s.duration_s,
                              PowerModel(), out=self.out, live=self.live)
            monitor.header = (f"Enersis demo: {self.s.nodes} nodes, {self.s.vm_count} VMs, policy {self.s.policy} "
                              f"({self.s.lower_pct:g}-{self.s.upper_pct:g}%), cycle {self.s.cycle_s:g}s   Ctrl-C stops")
            monitor.footer = self.footer(info, layout)
            for node in self.s.off_at_start():
                # The demo built these machines powered off: say so, until the bus says otherwise.
                rec = monitor.view.node(node)
                rec.power, rec.power_ts_ms = "off", now_ms()
            self.wait_for_nodes(monitor)
            monitor.restart_clock()  # the run (and its energy account) starts when the cluster is live
            if not self.stop.is_set():
                if self.with_arbiter:
                    self.sup.start("arbiter", layout.enersis() + ["arbiter", "--config", str(layout.run / "arbiter.toml")])
                self.say(f"{'arbiter started' if self.with_arbiter else 'no arbiter'}; the cluster is live "
                         f"(operator tools: --config {layout.run / 'operator.toml'})")
            while not self.stop.is_set() and monitor.elapsed() < self.s.duration_s:
                monitor.poll(0.25)
                died = [c for c in self.sup.exited() if not c.name.startswith("ssh-")]
                if died:
                    problems += [f"{c.name} exited with code {c.proc.returncode} (log: {c.log_path})" for c in died]
                    self.say("\n".join(problems))
                    code = 1
                    break
        except DemoError as exc:
            self.say(f"enersis demo: {exc}")
            code = 1
        except BrokerUnavailable as exc:
            self.say(f"enersis demo: the broker went away: {exc}")
            code = 1
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
            if monitor is not None:
                self.say("\nstopping: arbiter, power service, agents, stand-ins ...")
                summary = monitor.summary(self.ground_truth())
            if self.sup is not None:
                problems += self.sup.stop_all()
            if watcher is not None:
                watcher.close()
            if self.started_broker:
                subprocess.run([sys.executable, str(BROKER_SCRIPT), "stop"], env=self.broker_env(),
                               capture_output=True, timeout=120)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if summary:
            summary["problems"] = problems
            summary["interrupted"] = self.stop.is_set()
            summary["run_dir"] = str(self.layout.run) if self.layout else ""
            self.say(summary_text(summary))
            if summary_json:
                Path(summary_json).write_text(json.dumps(summary, indent=2) + "\n")
            if summary.get("vms_lost"):
                code = code or 1
        self.say(f"everything this demo started is stopped; logs in {self.layout.logs if self.layout else '-'}")
        return code

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop.set()

    # -- steps

    def broker_env(self) -> dict[str, str]:
        return dict(os.environ, ENERSIS_BROKER_DIR=str(self.broker_dir))

    def broker(self) -> BrokerInfo:
        status = subprocess.run([sys.executable, str(BROKER_SCRIPT), "status"], env=self.broker_env(),
                                capture_output=True, text=True, timeout=60)
        if status.returncode != 0:
            self.say("starting the private broker ...")
            r = subprocess.run([sys.executable, str(BROKER_SCRIPT), "start"], env=self.broker_env(),
                               capture_output=True, text=True, timeout=180)
            if r.returncode != 0:
                raise DemoError(f"the private broker did not start: {(r.stderr or r.stdout).strip()[-500:]}")
            self.started_broker = True
        return BrokerInfo.load(self.broker_dir)

    def operator_settings(self, info: BrokerInfo) -> BrokerSettings:
        return BrokerSettings(host="127.0.0.1", port=info.amqp_port, vhost=self.s.vhost, user="operator",
                              password=info.passwords["operator"], heartbeat_s=10, connection_name="enersis-demo")

    def prepare_vhost(self, info: BrokerInfo) -> None:
        """Grant the roles their current permissions and empty what a previous run left behind.

        A broker started from older definitions keeps older permissions until it restarts;
        the demo brings them up to date (as the administrator, through the management API).
        """
        vq = quote(self.s.vhost, safe="")
        try:
            mgmt_api(info, "GET", f"vhosts/{vq}")
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise DemoError(f"management API at port {info.mgmt_port}: {exc}") from None
            mgmt_api(info, "PUT", f"vhosts/{vq}", {})
            self.say(f"created vhost {self.s.vhost!r}")
        except (urllib.error.URLError, OSError) as exc:
            raise DemoError(f"management API at port {info.mgmt_port} unreachable: {exc}") from None
        for user, role in topology.ROLES.items():
            body = {"configure": role["configure"], "write": role["write"], "read": role["read"]}
            try:
                mgmt_api(info, "PUT", f"permissions/{quote(self.s.vhost, safe='')}/{user}", body)
            except (urllib.error.URLError, OSError) as exc:
                raise DemoError(f"management API at port {info.mgmt_port} refused the permissions of {user}: {exc}") from None
        admin = BrokerSettings(host="127.0.0.1", port=info.amqp_port, vhost=self.s.vhost, user="admin",
                               password=info.passwords["admin"], heartbeat_s=10, connection_name="enersis-demo-setup")
        try:
            conn = pika.BlockingConnection(admin.pika_parameters())
        except pika.exceptions.AMQPError as exc:
            raise DemoError(f"cannot reach the broker as admin on vhost {self.s.vhost!r}: {type(exc).__name__}") from None
        try:
            topology.declare(conn.channel())  # idempotent; a new vhost gets the whole topology
            names = [q.name for q in topology.QUEUES] + [topology.migrate_queue(n) for n in self.s.node_names()]
            for name in names:
                ch = conn.channel()
                try:
                    ch.queue_purge(name)
                    ch.close()
                except pika.exceptions.ChannelClosedByBroker:
                    pass  # absent: nothing to purge (a node queue appears when its agent starts)
        finally:
            conn.close()

    def start_cluster(self, layout: Layout) -> None:
        s, sup = self.s, self.sup
        assert sup is not None
        py = sys.executable
        off = s.off_at_start()
        sup.run("cluster-init", [py, "-m", "enersis.agent.simulated", "init", str(layout.cluster), "--nodes", str(s.nodes),
                                 "--vms", str(s.vm_count), "--trace-dir", s.trace_dir, "--speedup", str(s.speedup),
                                 "--powered-off", ",".join(off), "--cpus", str(s.node_cpus), "--mem-mib",
                                 str(s.node_mem_mib), "--vm-vcpus", str(s.vm_vcpus), "--vm-mem-mib", str(s.vm_mem_mib),
                                 "--migration-mib-s", str(s.migration_mib_s), "--seed", str(s.seed), "--force"])
        self.say(f"simulated cluster: {s.nodes} nodes ({len(off)} off), {s.vm_count} VMs on PlanetLab traces from "
                 f"{s.trace_dir}, speed-up {s.speedup:g}x")
        for i, node in enumerate(s.node_names(), start=1):
            sup.cleanups.append((f"ssh-{node}", [py, str(LAB / "ssh_standin.py"), "down", "--dir",
                                                 str(layout.ssh_dir(node))]))
            sup.run(f"ssh-{node}", [py, str(LAB / "ssh_standin.py"), "up", "--dir", str(layout.ssh_dir(node)),
                                    "--address", "127.0.0.1", "--port", str(layout.ssh_port(i)),
                                    "--forced-command", layout.poweroff_command(node),
                                    "--client-pubkey", str(layout.secrets / "power_ed25519.pub")])
        for i, node in enumerate(s.node_names(), start=1):
            argv = [py, str(LAB / "standin_nic.py"), "--listen", f"127.0.0.1:{layout.wol_port(i)}",
                    "--mac", mac_for(i), "--pid-file", str(layout.node_dir(node) / "agent.pid")]
            if node not in off:
                argv.append("--boot-at-start")
            sup.start(f"nic-{node}", argv + ["--"] + layout.boot_command(node))
        sup.start("power", layout.enersis() + ["power", "--config", str(layout.run / "power.toml")])
        self.say(f"started {s.nodes} stand-in NICs and sshds, {s.nodes - len(off)} agents, the power service")

    def wait_for_nodes(self, monitor: Monitor) -> None:
        want = [n for n in self.s.node_names() if n not in self.s.off_at_start()]
        deadline = time.monotonic() + 60
        while not self.stop.is_set():
            now = now_ms()
            missing = [n for n in want if n not in monitor.view.nodes or monitor.view.nodes[n].state(now) != "online"]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise DemoError(f"nodes {', '.join(missing)} did not report within 60s; see their logs in "
                                f"{self.layout.logs if self.layout else '?'} (nic-<node>.log)")
            died = [c for c in self.sup.exited()] if self.sup else []
            if died:
                raise DemoError("; ".join(f"{c.name} exited with code {c.proc.returncode} (log: {c.log_path})"
                                          for c in died))
            monitor.watcher.pump(0.2)

    def footer(self, info: BrokerInfo, layout: Layout) -> list[str]:
        return [
            f"management UI: {info.mgmt_url or 'http://127.0.0.1:%d/' % info.mgmt_port}  user operator, password in "
            f"{layout.secrets / 'operator.password'}",
            f"operator CLI:  enersis status --config {layout.run / 'operator.toml'}",
        ]

    def ground_truth(self) -> dict[str, Any]:
        """What the simulated hardware says at the end: every VM still running somewhere?"""
        if self.layout is None or not (self.layout.cluster / "cluster.json").exists():
            return {}
        from enersis.agent.simulated import RUNNING, SimulatedCluster

        st = SimulatedCluster(self.layout.cluster).state()
        lost = sorted(n for n, v in st["vms"].items() if v.get("lost") or v["state"] != RUNNING)
        return {
            "vms_running": sum(1 for v in st["vms"].values() if v["state"] == RUNNING),
            "vms_lost": lost,
            "placement": {n: v["node"] for n, v in sorted(st["vms"].items())},
            "powered": {n: nd["powered"] for n, nd in sorted(st["nodes"].items())},
            "power_events": [h["event"] for h in st.get("history", []) if h["event"] in ("powered-on", "powered-off")],
        }


def mgmt_api(info: BrokerInfo, method: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{info.mgmt_port}/api/{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None)
    token = base64.b64encode(f"admin:{info.passwords['admin']}".encode()).decode()
    req.add_header("Authorization", f"Basic {token}")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Each process reads its broker from its own config file; an inherited override would bypass it.
    env.pop("ENERSIS_AMQP_URL", None)
    env.setdefault("ENERSIS_LOG_LEVEL", "INFO")
    env["PYTHONUNBUFFERED"] = "1"
    return env
