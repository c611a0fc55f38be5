"""Watch the bus as an operator: a private queue bound to telemetry and results.

Not common.bus.Consumer on purpose: that one serves durable work queues
(manual acks, dead-lettering bad input, which the operator role may not
publish).  An observer's queue is private, exclusive and bounded: it is
deleted when the watcher goes, takes auto-acks, and skips what it cannot
decode, since the responsible consumers dead-letter it anyway.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import pika.exceptions as px

from enersis.common.bus import CONNECTION_ERRORS, FATAL_CONNECT_ERRORS, BrokerUnavailable, connect
from enersis.common.codec import DecodeError, Envelope, decode
from enersis.common.config import BrokerSettings
from enersis.common.topology import EX_RESULTS, EX_TELEMETRY

from .view import ClusterView

log = logging.getLogger("enersis.ops.watch")

WATCH_QUEUE_ARGUMENTS = {"x-max-length": 10_000, "x-overflow": "drop-head"}


class BrokerRefused(BrokerUnavailable):
    """The broker answered but refused the credentials or a permission."""


class BusWatcher:
    """Fold everything published on the chosen keys into a ClusterView."""

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        bindings: tuple[tuple[str, str], ...] = ((EX_TELEMETRY, "#"), (EX_RESULTS, "#")),
        connect_timeout_s: float = 10.0,
        view: ClusterView | None = None,
    ):
        self.settings = settings
        self.bindings = bindings
        self.connect_timeout_s = connect_timeout_s
        self.view = view if view is not None else ClusterView()
        self.listeners: list[Callable[[Envelope], None]] = []
        self.undecodable = 0
        self._conn: Any = None
        self._channel: Any = None
        self.queue = ""

    def open(self) -> "BusWatcher":
        try:
            self._conn = connect(self.settings, retry_for_s=self.connect_timeout_s)
        except FATAL_CONNECT_ERRORS as exc:
            raise BrokerRefused(
                f"broker {self.settings.url_for_logs} refused user {self.settings.user!r}: {type(exc).__name__}"
            ) from None
        except CONNECTION_ERRORS as exc:
            raise BrokerUnavailable(
                f"broker {self.settings.url_for_logs} unreachable for {self.connect_timeout_s:.0f}s: {type(exc).__name__} {exc}"
            ) from None
        try:
            ch = self._conn.channel()
            self.queue = ch.queue_declare("", exclusive=True, auto_delete=True,
                                          arguments=WATCH_QUEUE_ARGUMENTS).method.queue
            for exchange, key in self.bindings:
                ch.queue_bind(self.queue, exchange, routing_key=key)
            ch.basic_consume(self.queue, self._on_message, auto_ack=True)
        except px.ChannelClosedByBroker as exc:
            self.close()
            raise BrokerRefused(f"broker refused the watch queue for user {self.settings.user!r}: "
                                f"{exc.reply_code} {exc.reply_text}") from None
        self._channel = ch
        return self

    def pump(self, seconds: float) -> None:
        """Process deliveries for up to `seconds` (at least one pass)."""
        try:
            self._conn.process_data_events(time_limit=max(0.0, seconds))
        except CONNECTION_ERRORS + (px.ChannelClosed,) as exc:
            raise BrokerUnavailable(f"lost the broker connection: {type(exc).__name__} {exc}") from None

    def pump_until(self, condition: Callable[[], bool], timeout_s: float, step_s: float = 0.1) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            if condition():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.pump(min(step_s, left))

    def queue_exists(self, name: str) -> bool:
        """A passive declare: needs no permission, and a 404 closes only its own channel."""
        channel = self._conn.channel()
        try:
            channel.queue_declare(name, passive=True)
        except px.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return False
            raise
        channel.close()
        return True

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except Exception:  # closing a connection that is already gone
                pass

    def __enter__(self) -> "BusWatcher":
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _on_message(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        try:
            env = decode(body, props.content_type, allow_json=True, props_message_id=props.message_id,
                         props_timestamp_s=props.timestamp, props_app_id=props.app_id)
        except DecodeError as exc:
            self.undecodable += 1
            log.debug("skipping an undecodable message on %s: %s", method.routing_key, exc.reason)
            return
        self.view.apply(env)
        for listener in self.listeners:
            listener(env)
