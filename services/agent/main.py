"""Run a node's agent: hypervisor telemetry to RabbitMQ (and the node's migration executor).

    enersis agent --config /etc/enersis/node.toml

Publishes NodeOnline at start, NodeTelemetry (load, inventory) every publish
interval, NodeOffline on SIGTERM/SIGINT.  The hypervisor is any libvirt URI,
or sim:///abs/path for a simulated cluster (python -m enersis.agent.simulated).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

from enersis.common.bus import Publisher
from enersis.common.config import ConfigError

from .config import AgentConfig, load_agent_config
from .executor import ExecutorConfig, start_executor
from .hypervisor import Hypervisor
from .sampler import Sampler
from .telemetry import Agent, Identity, telemetry_message

log = logging.getLogger("enersis.agent")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the node's TOML file (node, [broker], [hypervisor], [telemetry])")
    parser.add_argument("--check", action="store_true",
                        help="check the config and the hypervisor: take two samples one interval apart, print what "
                             "would be published (JSON), and exit (0 = hypervisor answered, 1 = it did not); no broker")


def agent_version() -> str:
    try:
        return metadata.version("enersis")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def host_boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def open_hypervisor(cfg: AgentConfig) -> tuple[Hypervisor, str]:
    """The node's hypervisor adapter and its boot id: the one place that picks real or simulated."""
    if cfg.hypervisor_uri.startswith("sim://"):
        from .simulated import SimulatedHypervisor, SimulationError

        try:
            hv = SimulatedHypervisor.from_uri(cfg.hypervisor_uri, cfg.node)
        except (SimulationError, ValueError) as exc:
            raise ConfigError(f"{cfg.source}: [hypervisor] uri: {exc}") from None
        return hv, hv.boot_id()
    from .libvirt_hv import LibvirtHypervisor

    return LibvirtHypervisor(cfg.hypervisor_uri), host_boot_id()


def run(args: Any) -> int:
    # pika logs a traceback at ERROR for every refused connection while the broker
    # is down; enersis.bus already says it once per retry, in one line.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    try:
        cfg = load_agent_config(args.config)
        hv, boot_id = open_hypervisor(cfg)
        ExecutorConfig.parse(cfg.raw, source=cfg.source, node=cfg.node)  # config errors before anything starts
    except ConfigError as exc:
        print(f"enersis agent: {exc}", file=sys.stderr)
        return 2

    t = cfg.telemetry
    ident = Identity(cfg.node, boot_id, agent_version(), t.sample_interval_s, t.publish_interval_s, t.window_s)
    sampler = Sampler(hv, sample_interval_s=t.sample_interval_s, window_s=t.window_s,
                      facts_interval_s=t.publish_interval_s)
    if getattr(args, "check", False):
        return check(ident, sampler, hv)
    publisher = Publisher(cfg.broker, sender=f"agent.{cfg.node}")
    agent = Agent(ident, sampler, publisher)
    log.info("agent for %s: hypervisor %s, broker %s, sample %.2gs, publish %.2gs, window %.2gs",
             cfg.node, cfg.hypervisor_uri, cfg.broker.url_for_logs, t.sample_interval_s, t.publish_interval_s, t.window_s)

    try:
        # The migration executor ([executor], [peers.*]) runs in this process by default.
        executor = start_executor(cfg.node, cfg.hypervisor_uri, cfg.broker, publisher, cfg.raw,
                                  source=cfg.source, hypervisor=hv)
    except ConfigError as exc:
        print(f"enersis agent: {exc}", file=sys.stderr)
        publisher.close()
        return 2

    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        agent.offline_reason = f"received {signal.Signals(signum).name}"
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # The publishing loop runs on its own thread so the main thread stays free for signals.
    worker = threading.Thread(target=agent.run, args=(stop,), name="agent")
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.5)
    finally:
        stop.set()
        if executor is not None:
            executor.stop()
        worker.join(15)
        publisher.close()
        hv.close()
    return 0


def check(ident: Identity, sampler: Sampler, hv: Hypervisor) -> int:
    """`enersis agent --check`: one measurement, printed as the NodeTelemetry body it would publish."""
    import dataclasses
    import json
    import time

    from enersis.common.codec import body_of

    try:
        sampler.sample_once()
        time.sleep(ident.sample_interval_s)
        state = sampler.sample_once()
    finally:
        hv.close()
    msg = telemetry_message(ident, state, 0)
    body = body_of(msg)
    body["domains"] = [dataclasses.asdict(d) for d in msg.domains]  # named fields: this is for a person
    print(json.dumps(body, indent=1))
    if not state.hypervisor_ok:
        print(f"enersis agent --check: hypervisor unreachable: {state.error}", file=sys.stderr)
        return 1
    return 0
