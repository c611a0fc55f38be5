"""Publish an operator command and wait for its final result.

Examples:
  enersis send migrate vm7 --to node-2          # the source comes from live telemetry
  enersis send migrate vm7 --from node-1 --to node-2 --no-wait
  enersis send wake node-5
  enersis send shutdown node-5 [--force]        # --force skips the "no running VM" check
  enersis send drain node-3 --power-off         # evacuate, keep it off the target list, power off
  enersis send undrain node-3
  enersis send pin vm7 | unpin vm7
  enersis send pause | resume                   # stop/restart the arbiter's automatic actions
  enersis send mode advisory | auto             # recommend only, or act
  enersis send thresholds --upper 80 --lower 10
  enersis send approve REC_ID                   # execute a recommendation (advisory mode)

The command is published with publisher confirms (mandatory: a migrate for a
node without a migrate queue fails at once) and the tool then waits on a
private queue bound to enersis.results for the CommandResult carrying its
command_id.  --command-id makes a retry safe: every consumer applies a
command id once.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import time
import uuid
from typing import Any, Callable

import pika.exceptions as px

from enersis.common.bus import FATAL_CONNECT_ERRORS, BrokerUnavailable, Publisher, Unroutable
from enersis.common.codec import MSGPACK, now_ms
from enersis.common.messages import (
    ApproveRecommendation,
    ContractError,
    DrainNode,
    Message,
    MigrateVm,
    PauseAutomation,
    PinVm,
    ResumeAutomation,
    SetMode,
    SetThresholds,
    ShutdownNode,
    UndrainNode,
    WakeNode,
)
from enersis.common.topology import EX_RESULTS, EX_TELEMETRY, migrate_queue

from .connect import (
    EXIT_BROKER,
    EXIT_CODES_HELP,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    UsageError,
    add_broker_arguments,
    operator_settings,
    quiet_plumbing,
)
from .watch import BrokerRefused, BusWatcher
from .view import CommandRecord

log = logging.getLogger("enersis.ops.send")

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXIT_CODES_HELP
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("waiting")
    g.add_argument("--no-wait", action="store_true", help="return once the broker confirmed the publish")
    g.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="wait at most S seconds for the final result (default 300); exit 3 after")
    g.add_argument("--json", action="store_true", help="print the final result as one JSON object")
    g.add_argument("--command-id", metavar="ID", help="reuse an id to retry a command safely (default: new)")
    g.add_argument("--reason", default="", help="free text recorded with the command")
    add_broker_arguments(common)

    sub = parser.add_subparsers(dest="what", metavar="COMMAND", required=True)

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common], epilog=EXIT_CODES_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = cmd("migrate", "live-migrate a VM to another node")
    p.add_argument("vm")
    p.add_argument("--to", required=True, metavar="NODE", dest="target")
    p.add_argument("--from", metavar="NODE", dest="source",
                   help="the VM's current node (default: looked up in live telemetry)")
    p.add_argument("--lookup-timeout", type=float, default=15.0, metavar="S",
                   help="listen to telemetry at most S seconds to find the VM's node (default 15)")
    p.add_argument("--bandwidth", type=int, default=0, metavar="MIB_S", help="cap in MiB/s (default 0: none)")
    p.add_argument("--migration-timeout", type=float, default=300.0, metavar="S",
                   help="the executor aborts the migration after S seconds (default 300)")
    p.add_argument("--auto-converge", action="store_true", help="let QEMU throttle a busy guest to converge")

    p = cmd("wake", "power a node on (Wake-on-LAN) and wait until its agent reports")
    p.add_argument("node")
    p = cmd("shutdown", "power a node off; refused while it hosts a running VM unless --force")
    p.add_argument("node")
    p.add_argument("--force", action="store_true", help="skip the 'no running VM' check (VMs on it stop!)")
    p = cmd("drain", "evacuate a node and keep it off the arbiter's target list")
    p.add_argument("node")
    p.add_argument("--power-off", action="store_true", help="power it off once empty")
    p = cmd("undrain", "let the arbiter use a drained node again")
    p.add_argument("node")
    p = cmd("pin", "keep a VM where it is")
    p.add_argument("vm")
    p = cmd("unpin", "let the arbiter move a pinned VM again")
    p.add_argument("vm")
    cmd("pause", "pause the arbiter's automatic actions (telemetry keeps flowing)")
    cmd("resume", "resume the arbiter's automatic actions")
    p = cmd("mode", "auto: the arbiter acts; advisory: it only publishes recommendations")
    p.add_argument("mode", choices=("auto", "advisory"))
    p = cmd("thresholds", "set the arbiter's CPU thresholds (percent of a node)")
    p.add_argument("--upper", type=float, required=True, metavar="PCT")
    p.add_argument("--lower", type=float, required=True, metavar="PCT")
    p = cmd("approve", "execute a recommendation the arbiter published in advisory mode")
    p.add_argument("recommendation_id")


def build_message(args: argparse.Namespace, command_id: str, source: str | None = None) -> Message:
    """The command for parsed arguments (ContractError for impossible values)."""
    w = args.what
    builders: dict[str, Callable[[], Message]] = {
        "migrate": lambda: MigrateVm(command_id, args.vm, source or "", args.target, reason=args.reason,
                                     timeout_s=args.migration_timeout, bandwidth_mib_s=args.bandwidth,
                                     auto_converge=args.auto_converge),
        "wake": lambda: WakeNode(command_id, args.node, reason=args.reason),
        "shutdown": lambda: ShutdownNode(command_id, args.node, force=args.force, reason=args.reason),
        "drain": lambda: DrainNode(command_id, args.node, power_off=args.power_off, reason=args.reason),
        "undrain": lambda: UndrainNode(command_id, args.node),
        "pin": lambda: PinVm(command_id, args.vm, pinned=True),
        "unpin": lambda: PinVm(command_id, args.vm, pinned=False),
        "pause": lambda: PauseAutomation(command_id, reason=args.reason),
        "resume": lambda: ResumeAutomation(command_id, reason=args.reason),
        "mode": lambda: SetMode(command_id, args.mode),
        "thresholds": lambda: SetThresholds(command_id, args.upper, args.lower),
        "approve": lambda: ApproveRecommendation(command_id, args.recommendation_id),
    }
    message = builders[w]()
    message.validate()
    return message


def run(args: argparse.Namespace) -> int:
    quiet_plumbing()
    out = Output(args.json)
    try:
        settings = operator_settings(args, connection_name="enersis-send")
        command_id = args.command_id or uuid.uuid4().hex
        if args.what != "migrate":
            build_message(args, command_id)  # catch bad values before touching the broker
        with BusWatcher(settings, bindings=_bindings(args), connect_timeout_s=args.connect_timeout) as watcher:
            source = args.source if args.what == "migrate" else None
            if args.what == "migrate":
                source = source or locate_vm(watcher, args.vm, args.lookup_timeout)
                if source == args.target:
                    raise UsageError(f"{args.vm} already runs on {args.target}")
                check_node_queue(watcher, args.target, "target")
            message = build_message(args, command_id, source)
            publish(settings, message, args.connect_timeout)
            out.sent(message)
            if args.no_wait:
                return EXIT_OK
            return wait_for_result(watcher, command_id, args.timeout, out)
    except UsageError as exc:
        return out.error(f"error: {exc}", EXIT_USAGE)
    except ContractError as exc:
        return out.error(f"error: {exc}", EXIT_USAGE)
    except BrokerRefused as exc:
        return out.error(f"error: {exc}", EXIT_BROKER)
    except BrokerUnavailable as exc:
        return out.error(f"error: {exc}", EXIT_BROKER)


def _bindings(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    kind = {
        "migrate": "MigrateVm", "wake": "WakeNode", "shutdown": "ShutdownNode", "drain": "DrainNode",
        "undrain": "UndrainNode", "pin": "PinVm", "unpin": "PinVm", "pause": "PauseAutomation",
        "resume": "ResumeAutomation", "mode": "SetMode", "thresholds": "SetThresholds",
        "approve": "ApproveRecommendation",
    }[args.what]
    # A drain or an approval leads to commands of other kinds; their results go by too.
    keys: tuple[tuple[str, str], ...] = ((EX_RESULTS, f"result.{kind}.#"),)
    if args.what in ("drain", "approve"):
        keys = ((EX_RESULTS, "result.#"),)
    if args.what == "migrate" and not args.source:
        keys += ((EX_TELEMETRY, "telemetry.#"),)
    return keys


def locate_vm(watcher: BusWatcher, vm: str, timeout_s: float) -> str:
    """The node whose telemetry lists `vm` running, listening at most about two publish intervals."""
    started = time.monotonic()
    first_seen: list[float] = []

    def found_or_heard_enough() -> bool:
        view = watcher.view
        if view.where_is(vm, now_ms()):
            return True
        if view.nodes and not first_seen:
            first_seen.append(time.monotonic())
        # Every reporting node publishes once per interval: two intervals after
        # the first report, every live node has spoken.
        return bool(first_seen) and time.monotonic() - first_seen[0] > max(2.0, 2 * view.max_publish_interval_s())

    watcher.pump_until(found_or_heard_enough, timeout_s)
    node = watcher.view.where_is(vm, now_ms())
    if node:
        log.debug("%s found on %s after %.1fs", vm, node, time.monotonic() - started)
        return node
    seen = sorted(watcher.view.nodes)
    if not seen:
        raise UsageError(f"no node reported telemetry within {timeout_s:.0f}s, so {vm}'s node is unknown; "
                         "pass --from NODE")
    raise UsageError(f"no reporting node runs a VM called {vm!r} (nodes heard: {', '.join(seen)}); "
                     "check the name with `enersis status --vms`, or pass --from NODE")


def check_node_queue(watcher: BusWatcher, node: str, role: str) -> None:
    """Every node's agent declares enersis.cmd.migrate.<node>; no queue means no such node."""
    if not watcher.queue_exists(migrate_queue(node)):
        raise UsageError(f"unknown {role} node {node!r}: no agent has ever run there "
                         f"(queue {migrate_queue(node)} does not exist)")


def publish(settings: Any, message: Message, retry_for_s: float) -> None:
    with Publisher(settings, sender=f"enersis-send@{socket.gethostname()}", retry_for_s=retry_for_s) as pub:
        try:
            pub.publish(message, content_type=MSGPACK, mandatory=True)
        except Unroutable:
            if isinstance(message, MigrateVm):
                raise UsageError(f"unknown source node {message.source!r}: no agent has ever run there "
                                 f"(queue {migrate_queue(message.source)} does not exist)") from None
            raise BrokerUnavailable(f"the broker has no queue for {message.KIND}: is the topology "
                                    "declared (deploy/rabbitmq/definitions.json)?") from None
        except px.ChannelClosedByBroker as exc:
            raise BrokerRefused(f"the broker refused the publish: {exc.reply_code} {exc.reply_text}") from None
        except FATAL_CONNECT_ERRORS as exc:
            raise BrokerRefused(f"broker refused user {settings.user!r}: {type(exc).__name__}") from None


def wait_for_result(watcher: BusWatcher, command_id: str, timeout_s: float, out: "Output") -> int:
    reported: set[str] = set()

    def final() -> bool:
        rec = watcher.view.commands.get(command_id)
        if rec is not None and rec.status not in reported:
            reported.add(rec.status)
            if not rec.final:
                out.progress(rec)
        return rec is not None and rec.final

    if not watcher.pump_until(final, timeout_s):
        rec = watcher.view.commands.get(command_id)
        last = f" (last status: {rec.status})" if rec else " (no result at all: is the consumer running?)"
        return out.error(f"timeout: no final result for {command_id} within {timeout_s:.0f}s{last}; "
                         "it may still complete", EXIT_TIMEOUT)
    rec = watcher.view.commands[command_id]
    out.final(rec)
    return EXIT_OK if rec.status in ("succeeded", "skipped") else EXIT_FAILED


class Output:
    """Human lines on stdout/stderr, or one JSON object for scripts."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self.message: Message | None = None

    def sent(self, message: Message) -> None:
        self.message = message
        if not self.as_json:
            print(f"sent {message.KIND} {message.command_id}: {_describe(message)}", flush=True)

    def progress(self, rec: CommandRecord) -> None:
        if not self.as_json:
            print(f"{rec.status}: {_describe_result(rec)}", flush=True)

    def final(self, rec: CommandRecord) -> None:
        if self.as_json:
            print(json.dumps({"command_id": rec.command_id, "command_kind": rec.kind, "status": rec.status,
                              "reason": rec.reason, "node": rec.node, "vm": rec.vm, "details": _tidy(rec.details)}))
        else:
            print(f"{rec.status}: {_describe_result(rec)}", flush=True)

    def error(self, text: str, code: int) -> int:
        if self.as_json:
            print(json.dumps({"error": text, "exit_code": code}))
        print(text, file=sys.stderr, flush=True)
        return code


def _describe(m: Message) -> str:
    if isinstance(m, MigrateVm):
        return f"{m.vm} {m.source} -> {m.target}"
    parts = [f"{k}={getattr(m, k)}" for k in ("node", "vm", "mode", "upper_pct", "lower_pct", "recommendation_id")
             if hasattr(m, k)]
    for flag in ("force", "power_off"):
        if getattr(m, flag, False):
            parts.append(flag)
    if isinstance(m, PinVm):
        parts.append("pinned" if m.pinned else "unpinned")
    return " ".join(parts) or m.KIND


def _describe_result(rec: CommandRecord) -> str:
    parts = [rec.kind]
    if rec.vm:
        parts.append(f"vm={rec.vm}")
    if rec.node:
        parts.append(f"node={rec.node}")
    if rec.reason:
        parts.append(f"- {rec.reason}")
    if rec.details:
        parts.append("(" + ", ".join(f"{k}={v}" for k, v in sorted(_tidy(rec.details).items())) + ")")
    return " ".join(parts)


def _tidy(details: dict) -> dict:
    # msgpack carries floats as single precision: 0.1 arrives as 0.10000000149.
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in details.items()}
