"""Show the cluster as the bus sees it now: nodes, load, VMs, commands.

Listens on a private queue to telemetry, lifecycle events and command results
for about two publish intervals (every live agent reports once per interval),
then prints one table.  A node that sends nothing (off, or its agent down)
shows only when the listen window saw its last words, or with --mgmt-url,
which lists every node that ever ran an agent (its migrate queue exists).

exit codes: 0 at least one node reported, 1 none did, 2 usage, 4 broker unreachable.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from enersis.common.bus import BrokerUnavailable
from enersis.common.codec import now_ms
from enersis.common.config import BrokerSettings
from enersis.common.topology import MIGRATE_QUEUE_PREFIX

from .connect import EXIT_BROKER, EXIT_USAGE, UsageError, add_broker_arguments, operator_settings, quiet_plumbing
from .render import command_rows, node_rows, vm_rows
from .watch import BrokerRefused, BusWatcher
from .view import ClusterView

EXIT_NOTHING_HEARD = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", type=float, default=12.0, metavar="S",
                        help="listen at most S seconds (default 12; stops earlier, two publish intervals "
                             "after the first report)")
    parser.add_argument("--vms", action="store_true", help="also list every VM")
    parser.add_argument("--json", action="store_true", help="print the view as JSON")
    parser.add_argument("--mgmt-url", metavar="URL",
                        help="management API (e.g. http://127.0.0.1:15672/) to list silent nodes too")
    add_broker_arguments(parser)


def run(args: argparse.Namespace) -> int:
    quiet_plumbing()
    try:
        settings = operator_settings(args, connection_name="enersis-status")
        with BusWatcher(settings, connect_timeout_s=args.connect_timeout) as watcher:
            started = time.monotonic()
            listen(watcher, args.listen)
            waited = time.monotonic() - started
        known = known_nodes(args.mgmt_url, settings) if args.mgmt_url else ()
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (BrokerRefused, BrokerUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BROKER
    view, now = watcher.view, now_ms()
    if args.json:
        print(json.dumps(as_json(view, now, known), indent=2))
    else:
        print_table(view, now, known, waited, args.vms)
    return 0 if view.nodes else EXIT_NOTHING_HEARD


def listen(watcher: BusWatcher, max_s: float) -> None:
    first: list[float] = []

    def heard_enough() -> bool:
        if watcher.view.nodes and not first:
            first.append(time.monotonic())
        # Two intervals after the first report, every live agent has spoken once.
        return bool(first) and time.monotonic() - first[0] > max(1.0, 2 * watcher.view.max_publish_interval_s())

    watcher.pump_until(heard_enough, max_s)


def known_nodes(mgmt_url: str, settings: BrokerSettings) -> tuple[str, ...]:
    """Every node whose agent ever declared its migrate queue, from the management API."""
    vhost = urllib.parse.quote(settings.vhost, safe="")
    url = mgmt_url.rstrip("/") + f"/api/queues/{vhost}?columns=name"
    req = urllib.request.Request(url)
    token = base64.b64encode(f"{settings.user}:{settings.password}".encode()).decode()
    req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            queues = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise UsageError(f"management API {mgmt_url} unusable: {exc}") from None
    return tuple(q["name"][len(MIGRATE_QUEUE_PREFIX):] for q in queues
                 if q.get("name", "").startswith(MIGRATE_QUEUE_PREFIX))


def print_table(view: ClusterView, now: int, known: tuple[str, ...], waited: float, vms: bool) -> None:
    if not view.nodes and not known:
        print(f"no node reported in {waited:.1f}s: no agent is running, or this broker/vhost is not the cluster's")
        return
    for line in node_rows(view, now, extra_nodes=known):
        print(line)
    states = [r.state(now) for r in view.nodes.values()]
    print(f"\n{states.count('online')} online, {len(view.nodes) + len(set(known) - set(view.nodes)) - states.count('online')}"
          f" other; {sum(len([d for d in r.vms if d.running]) for r in view.nodes.values() if r.state(now) == 'online')}"
          f" running VMs; listened {waited:.1f}s")
    if vms:
        print()
        for line in vm_rows(view, now):
            print(line)
    flight = view.in_flight()
    done = [c for c in sorted(view.commands.values(), key=lambda c: c.last_ts_ms) if c.final]
    if flight:
        print("\ncommands in flight:")
        for line in command_rows(flight, now):
            print(line)
    if done:
        print("\ncommands finished while listening:")
        for line in command_rows(done, now):
            print(line)
    if view.recommendations:
        print(f"\n{len(view.recommendations)} recommendation(s) published (advisory mode); newest:")
        for r in view.recommendations[-5:]:
            print(f"  {r.recommendation_id}  {r.command_kind}: {r.summary}")


def as_json(view: ClusterView, now: int, known: tuple[str, ...]) -> dict:
    nodes = []
    for name in sorted(set(view.nodes) | set(known)):
        rec = view.nodes.get(name)
        t = rec.telemetry if rec else None
        nodes.append({
            "node": name,
            "state": rec.state(now) if rec else "silent",
            "cpu_pct": t.cpu_pct if t else None,
            "mem_total_kib": t.mem_total_kib if t else None,
            "mem_free_kib": t.mem_free_kib if t else None,
            "vms": sorted(d.name for d in t.domains if d.running) if t else [],
            "last_telemetry_ms": rec.telemetry_ts_ms if rec else None,
        })
    commands = [
        {"command_id": c.command_id, "kind": c.kind, "status": c.status, "node": c.node, "vm": c.vm,
         "reason": c.reason} for c in sorted(view.commands.values(), key=lambda c: c.first_ts_ms)
    ]
    return {"nodes": nodes, "commands": commands,
            "recommendations": [r.recommendation_id for r in view.recommendations]}
