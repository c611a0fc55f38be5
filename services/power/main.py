"""Wake nodes (Wake-on-LAN) and shut them down (SSH) on command, each confirmed by the node itself.

Consumes WakeNode / ShutdownNode from enersis.cmd.power (several instances
may share it) and watches every node's telemetry on a private queue.  Every
command ends in a CommandResult on enersis.results: accepted, then
succeeded / failed / skipped / rejected with the reason.

    enersis power --config /etc/enersis/power.toml
    enersis power --config power.toml --check     # validate the inventory and exit

See enersis.power.inventory for the power.toml format.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
import uuid
from typing import Any

import pika.exceptions as px

from enersis.common import topology
from enersis.common.bus import Consumer, Publisher
from enersis.common.config import BrokerSettings, ConfigError

from .inventory import PowerConfig, load_config
from .peers import PeerLedger
from .service import COMMAND_KINDS, PowerService
from .switch import PowerSwitch, WolSshSwitch
from .tracker import NodeTracker

log = logging.getLogger("enersis.power")


class PowerApp:
    """The power service wired to a broker: one place where its parts meet."""

    def __init__(self, config: PowerConfig, *, broker: BrokerSettings | None = None,
                 switch: PowerSwitch | None = None, name: str = "power"):
        settings = broker or config.broker
        if settings is None:
            raise ConfigError("no broker settings: add a [broker] table to the power config")
        s = config.settings
        self.config = config
        self.tracker = NodeTracker()
        self.switch = switch or WolSshSwitch(repeats=s.wol_repeats, gap_s=s.wol_gap_s,
                                             connect_timeout_s=s.ssh_connect_timeout_s,
                                             command_timeout_s=s.ssh_command_timeout_s)
        # The sender name tells this instance's results from its peers' (several may run on one host).
        sender = f"{name}@{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        self.publisher = Publisher(settings, sender)
        self.peers = PeerLedger(sender)
        self.service = PowerService(nodes=config.nodes, settings=s, switch=self.switch, tracker=self.tracker,
                                    publish=self.publisher.publish, peers=self.peers)
        self.peers.max_age_s = max(self.service.budget(k) for k in COMMAND_KINDS)
        # Commands wait for evidence for minutes: one worker (and one unacked message) per command in flight.
        self.consumer = Consumer(settings, self.publisher, prefetch=s.max_parallel, workers=s.max_parallel, name=name)
        self.consumer.subscribe(self._declare_telemetry_queue, self.service.on_telemetry, inline=True)
        # Its own connection: a broker whose definitions predate the power role's read access to
        # enersis.results refuses this queue, and that must not stop the commands (it only logs).
        self.peer_consumer = Consumer(settings, self.publisher, workers=1, name=f"{name}-peers")
        self.peer_consumer.subscribe(self._declare_peer_results_queue, self.service.on_peer_result, inline=True)
        self.consumer.subscribe(topology.Q_POWER, self.service.on_command, allow_json=True, accept=COMMAND_KINDS)

    def _declare_telemetry_queue(self, channel: Any) -> str:
        # Each instance needs every NodeOnline/NodeOffline, so it gets its own server-named queue.
        q = channel.queue_declare("", exclusive=True, auto_delete=True,
                                  arguments=topology.telemetry_queue_arguments()).method.queue
        channel.queue_bind(q, topology.EX_TELEMETRY, routing_key="#")
        self.tracker.listening()
        return q

    def _declare_peer_results_queue(self, channel: Any) -> str:
        try:
            q = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
            for kind in sorted(COMMAND_KINDS):
                channel.queue_bind(q, topology.EX_RESULTS, routing_key=f"result.{kind}.#")
        except px.ChannelClosedByBroker as exc:
            if exc.reply_code == 403:
                # Say it once and carry on without: retrying cannot fix a permission.
                log.warning("the broker refuses user %r read access to %s (%s): duplicate detection across "
                            "power instances is off; load the current deploy/rabbitmq/definitions.json to enable it",
                            self.publisher.settings.user, topology.EX_RESULTS, exc.reply_text)
                self.peer_consumer.stop()
            raise
        return q

    @property
    def ready(self) -> threading.Event:
        return self.consumer.ready

    @property
    def peers_ready(self) -> threading.Event:
        return self.peer_consumer.ready

    def start(self) -> "PowerApp":
        self.peer_consumer.start()
        self.consumer.start()
        return self

    def stop(self) -> None:
        self.service.stop()
        self.consumer.stop()
        self.peer_consumer.stop()
        self.publisher.close()


def inventory_problems(config: PowerConfig) -> list[str]:
    """What would make a command fail later, found now: a node whose host key is not in its known_hosts."""
    import paramiko

    problems = []
    for n in config.nodes.values():
        try:
            keys = paramiko.HostKeys(n.known_hosts)
        except (OSError, paramiko.SSHException) as exc:
            problems.append(f"{n.name}: cannot read known_hosts {n.known_hosts}: {exc}")
            continue
        entry = n.address if n.ssh_port == 22 else f"[{n.address}]:{n.ssh_port}"
        if keys.lookup(entry) is None:
            problems.append(f"{n.name}: {n.known_hosts} has no host key for {entry}: every shutdown will be refused")
    return problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="power.toml: [broker], [power], [nodes.<name>]")
    parser.add_argument("--check", action="store_true", help="validate the inventory, print it and exit")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    problems = inventory_problems(config)
    for p in problems:
        log.warning("%s", p)
    if args.check:
        for n in config.nodes.values():
            print(f"{n.name}: wake {n.mac} via {n.wol_broadcast}:{n.wol_port}"
                  f"{' from ' + n.wol_source if n.wol_source else ''}; shutdown {n.ssh_target} "
                  f"running {n.shutdown_command!r}")
        return 1 if problems else 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    app = PowerApp(config).start()
    log.info("power service for %d node(s) on %s", len(config.nodes), config.broker.url_for_logs if config.broker else "?")
    stop.wait()
    log.info("stopping")
    app.stop()
    return 0
