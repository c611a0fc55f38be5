"""Broker topology: every exchange, queue, routing key and permission, defined once.

deploy/rabbitmq/definitions.json is generated from this module
(`python -m enersis.common.topology > deploy/rabbitmq/definitions.json`) and a
test checks that the committed file matches.

Routing keys read from general to specific:

    enersis.telemetry  telemetry.<node>             NodeTelemetry
                       lifecycle.<node>             NodeOnline / NodeOffline
    enersis.commands   migrate.<source-node>        MigrateVm       -> enersis.cmd.migrate.<node>
                       power.wake.<node>            WakeNode        -> enersis.cmd.power
                       power.shutdown.<node>        ShutdownNode    -> enersis.cmd.power
                       arbiter.<kind>               operator kinds  -> enersis.cmd.arbiter
    enersis.results    result.<command-kind>.<node> CommandResult   -> enersis.res.arbiter
                       advice.<command-kind>        Recommendation  -> enersis.res.advice
    enersis.dlx        <original routing key>       rejected input  -> enersis.dead-letters
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

from .messages import (
    CommandResult,
    Message,
    MigrateVm,
    NodeOffline,
    NodeOnline,
    NodeTelemetry,
    Recommendation,
    ShutdownNode,
    WakeNode,
)

VHOST = "enersis"

EX_TELEMETRY = "enersis.telemetry"
EX_COMMANDS = "enersis.commands"
EX_RESULTS = "enersis.results"
EX_DLX = "enersis.dlx"
EXCHANGES = (EX_TELEMETRY, EX_COMMANDS, EX_RESULTS, EX_DLX)

Q_DEAD_LETTERS = "enersis.dead-letters"
Q_POWER = "enersis.cmd.power"
Q_ARBITER_CONTROL = "enersis.cmd.arbiter"
Q_ARBITER_TELEMETRY = "enersis.tel.arbiter"
Q_ARBITER_RESULTS = "enersis.res.arbiter"
Q_ADVICE = "enersis.res.advice"
MIGRATE_QUEUE_PREFIX = "enersis.cmd.migrate."

# Headers set on a message this project dead-letters itself.
H_REJECT_REASON = "x-enersis-reject-reason"
H_REJECTED_BY = "x-enersis-rejected-by"
H_ORIGINAL_EXCHANGE = "x-enersis-original-exchange"
H_ORIGINAL_QUEUE = "x-enersis-original-queue"

COMMAND_DELIVERY_LIMIT = 5
TELEMETRY_MAX_LENGTH = 10_000
TELEMETRY_TTL_MS = 60_000
DEAD_LETTER_MAX_LENGTH = 100_000


def migrate_queue(node: str) -> str:
    return MIGRATE_QUEUE_PREFIX + node


def telemetry_key(node: str) -> str:
    return f"telemetry.{node}"


def lifecycle_key(node: str) -> str:
    return f"lifecycle.{node}"


def result_key(command_kind: str, node: str) -> str:
    return f"result.{command_kind}.{node or '-'}"


def command_key(message: Message) -> str:
    """The routing key a command is published with on enersis.commands."""
    if isinstance(message, MigrateVm):
        return f"migrate.{message.source}"
    if isinstance(message, WakeNode):
        return f"power.wake.{message.node}"
    if isinstance(message, ShutdownNode):
        return f"power.shutdown.{message.node}"
    if message.CATEGORY == "operator":
        return f"arbiter.{message.KIND}"
    raise ValueError(f"{message.KIND} is not a command")


def route(message: Message) -> tuple[str, str]:
    """(exchange, routing key) for any message."""
    if isinstance(message, NodeTelemetry):
        return EX_TELEMETRY, telemetry_key(message.node)
    if isinstance(message, (NodeOnline, NodeOffline)):
        return EX_TELEMETRY, lifecycle_key(message.node)
    if isinstance(message, CommandResult):
        return EX_RESULTS, result_key(message.command_kind, message.node)
    if isinstance(message, Recommendation):
        return EX_RESULTS, f"advice.{message.command_kind}"
    return EX_COMMANDS, command_key(message)


# ---------------------------------------------------------------- queues


def command_queue_arguments() -> dict[str, Any]:
    # Quorum: survives a broker crash; the delivery limit stops a poison
    # message that crashes its consumer from looping forever.
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": COMMAND_DELIVERY_LIMIT,
        "x-dead-letter-exchange": EX_DLX,
    }


def telemetry_queue_arguments() -> dict[str, Any]:
    # Telemetry is perishable: bounded, oldest dropped first, stale after a minute.
    return {
        "x-queue-type": "classic",
        "x-max-length": TELEMETRY_MAX_LENGTH,
        "x-overflow": "drop-head",
        "x-message-ttl": TELEMETRY_TTL_MS,
    }


@dataclass(frozen=True)
class QueueSpec:
    name: str
    arguments: dict[str, Any]
    bindings: tuple[tuple[str, str], ...]  # (exchange, routing key pattern)
    purpose: str = ""


@dataclass(frozen=True)
class Binding:
    exchange: str
    queue: str
    key: str


QUEUES: tuple[QueueSpec, ...] = (
    QueueSpec(
        Q_POWER,
        command_queue_arguments(),
        ((EX_COMMANDS, "power.#"),),
        "WakeNode / ShutdownNode for the power service (several instances may share it)",
    ),
    QueueSpec(
        Q_ARBITER_CONTROL,
        command_queue_arguments(),
        ((EX_COMMANDS, "arbiter.#"),),
        "operator commands to the arbiter: pause, resume, drain, pin, thresholds, mode",
    ),
    QueueSpec(
        Q_ARBITER_RESULTS,
        command_queue_arguments(),
        ((EX_RESULTS, "result.#"),),
        "every command result, for the arbiter's tracking",
    ),
    QueueSpec(
        Q_ADVICE,
        {"x-queue-type": "classic", "x-max-length": 10_000, "x-overflow": "drop-head"},
        ((EX_RESULTS, "advice.#"),),
        "recommendations in advisory mode, for an operator to read and approve",
    ),
    QueueSpec(
        Q_ARBITER_TELEMETRY,
        telemetry_queue_arguments(),
        ((EX_TELEMETRY, "#"),),
        "all telemetry and lifecycle events, for the arbiter",
    ),
    QueueSpec(
        Q_DEAD_LETTERS,
        {"x-queue-type": "classic", "x-max-length": DEAD_LETTER_MAX_LENGTH, "x-overflow": "reject-publish"},
        ((EX_DLX, "#"),),
        "rejected messages, kept with the reason header for inspection",
    ),
)


def migrate_queue_spec(node: str) -> QueueSpec:
    """Each node's agent declares its own migrate queue at start."""
    return QueueSpec(
        migrate_queue(node),
        command_queue_arguments(),
        ((EX_COMMANDS, f"migrate.{node}"),),
        f"MigrateVm commands for {node}'s executor",
    )


def declare(channel: Any, *, extra_queues: tuple[QueueSpec, ...] = ()) -> None:
    """Declare the whole topology on a pika channel (idempotent; tests and dev brokers)."""
    for ex in EXCHANGES:
        channel.exchange_declare(ex, exchange_type="topic", durable=True)
    for spec in QUEUES + extra_queues:
        declare_queue(channel, spec)


def declare_queue(channel: Any, spec: QueueSpec) -> None:
    channel.queue_declare(spec.name, durable=True, arguments=spec.arguments)
    for exchange, key in spec.bindings:
        channel.queue_bind(spec.name, exchange, routing_key=key)


# ---------------------------------------------------------------- users and permissions

ROLES: dict[str, dict[str, Any]] = {
    # configure / write / read are RabbitMQ permission regexes on vhost `enersis`.
    "agent": {
        "tags": [],
        "configure": r"^enersis\.cmd\.migrate\..+$",
        "write": r"^(enersis\.(telemetry|results|dlx)|enersis\.cmd\.migrate\..+)$",
        "read": r"^(enersis\.cmd\.migrate\..+|enersis\.commands)$",
        "doc": "publishes telemetry and results; consumes only the nodes' migrate queues",
    },
    "power": {
        # Each power instance needs every NodeOnline, so it binds a private
        # server-named queue (amq.gen-…) to the telemetry exchange; it also
        # reads its peers' power results that way, so instances sharing the
        # command queue do a duplicated command once.
        "tags": [],
        "configure": r"^amq\.gen-.*$",
        "write": r"^(enersis\.(results|dlx)|amq\.gen-.*)$",
        "read": r"^(enersis\.(cmd\.power|telemetry|results)|amq\.gen-.*)$",
        "doc": "consumes power commands, telemetry and peers' power results (private queues); publishes results",
    },
    "arbiter": {
        "tags": [],
        "configure": r"^$",
        "write": r"^enersis\.(commands|results|dlx)$",
        "read": r"^enersis\.(tel\.arbiter|res\.arbiter|cmd\.arbiter)$",
        "doc": "consumes telemetry, results and operator commands; publishes commands",
    },
    "operator": {
        "tags": ["management"],
        "configure": r"^amq\.gen-.*$",
        "write": r"^(enersis\.commands|amq\.gen-.*)$",
        "read": r"^(enersis\.(telemetry|results|dead-letters|res\.advice)|amq\.gen-.*)$",
        "doc": "publishes commands (UI or CLI); watches telemetry, results and dead letters",
    },
    "admin": {
        "tags": ["administrator"],
        "configure": ".*",
        "write": ".*",
        "read": ".*",
        "doc": "broker administrator",
    },
}


def definitions(password_hashes: dict[str, str] | None = None) -> dict[str, Any]:
    """RabbitMQ definitions for vhost `enersis`.

    Without hashes the users have an empty password_hash, so nobody can log in
    until an operator sets a password (`rabbitmqctl change_password USER …`);
    the private dev/test broker fills in generated ones.
    """
    hashes = password_hashes or {}
    users = [
        {
            "name": name,
            "password_hash": hashes.get(name, ""),
            "hashing_algorithm": "rabbit_password_hashing_sha256",
            "tags": role["tags"],
            "limits": {},
        }
        for name, role in ROLES.items()
    ]
    permissions = [
        {"user": name, "vhost": VHOST, "configure": r["configure"], "write": r["write"], "read": r["read"]}
        for name, r in ROLES.items()
    ]
    exchanges = [
        {
            "name": ex,
            "vhost": VHOST,
            "type": "topic",
            "durable": True,
            "auto_delete": False,
            "internal": False,
            "arguments": {},
        }
        for ex in EXCHANGES
    ]
    queues = [
        {"name": q.name, "vhost": VHOST, "durable": True, "auto_delete": False, "arguments": q.arguments}
        for q in QUEUES
    ]
    bindings = [
        {
            "source": ex,
            "vhost": VHOST,
            "destination": q.name,
            "destination_type": "queue",
            "routing_key": key,
            "arguments": {},
        }
        for q in QUEUES
        for ex, key in q.bindings
    ]
    return {
        "rabbit_version": "3.10.8",
        "users": users,
        "vhosts": [{"name": VHOST}],
        "permissions": permissions,
        "topic_permissions": [],
        "parameters": [],
        "global_parameters": [],
        "policies": [],
        "exchanges": exchanges,
        "queues": queues,
        "bindings": bindings,
    }


def main() -> None:
    json.dump(definitions(), sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
