"""Broker plumbing, in one place: connect, publish with confirms, consume safely.

- connect(): retry with exponential backoff (tenacity), heartbeats; wrong
  credentials or permissions fail at once instead of retrying forever.
- Publisher: its own connection in confirm mode, usable from any thread; a
  publish returns only once the broker confirmed it, reconnecting on the way.
- Consumer: manual acks and prefetch; handlers run on a worker pool, never on
  pika's I/O thread (BlockingConnection services no heartbeats while a
  callback runs: pika #564, #1104); acks travel back through
  add_callback_threadsafe.  Input that cannot be decoded is republished to
  enersis.dlx with the reason in a header, then acked.  Reconnects after a
  broker restart.

Two acknowledgements, never confused: the AMQP ack says "I took
responsibility"; a CommandResult says what happened.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import pika
import pika.exceptions as px
import tenacity

from .codec import COMMAND_MAX_BYTES, DEFAULT_MAX_BYTES, MSGPACK, DecodeError, Envelope, encode, decode, wrap
from .config import BrokerSettings
from .messages import CommandResult, Message
from .topology import (
    EX_DLX,
    H_ORIGINAL_EXCHANGE,
    H_ORIGINAL_QUEUE,
    H_REJECT_REASON,
    H_REJECTED_BY,
    route,
)

log = logging.getLogger("enersis.bus")
# pika logs every refused connection with a traceback (LAB.md §2); this module reports them once instead.
logging.getLogger("pika").setLevel(logging.CRITICAL)

# Errors that mean "the broker is not there right now" (worth a retry).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    px.AMQPConnectionError,
    px.ChannelWrongStateError,
    px.ConnectionWrongStateError,
    px.StreamLostError,
    ConnectionError,
    OSError,
)
# Subclasses of AMQPConnectionError that no retry will fix.
FATAL_CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    px.ProbableAuthenticationError,
    px.ProbableAccessDeniedError,
    px.AuthenticationError,
)


class BrokerUnavailable(RuntimeError):
    """The broker could not be reached (or did not confirm) within the deadline."""


class Unroutable(RuntimeError):
    """A mandatory publish matched no queue (for instance, a migrate to an unknown node)."""


class PermanentError(Exception):
    """A handler's verdict that a message can never be processed: dead-letter it with `reason`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class TemporaryError(Exception):
    """A handler's verdict that a later delivery may succeed: requeue (bounded by the delivery limit)."""


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text and text != "()" else type(exc).__name__


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, CONNECTION_ERRORS) and not isinstance(exc, FATAL_CONNECT_ERRORS)


def connect(
    settings: BrokerSettings,
    *,
    retry_for_s: float | None = 30.0,
    stop: threading.Event | None = None,
) -> pika.BlockingConnection:
    """A BlockingConnection, retried with backoff for up to retry_for_s (None = until `stop`)."""

    def should_stop(state: tenacity.RetryCallState) -> bool:
        if stop is not None and stop.is_set():
            return True
        return retry_for_s is not None and state.seconds_since_start >= retry_for_s

    def before_sleep(state: tenacity.RetryCallState) -> None:
        # One warning when the outage starts, then one a minute: an outage must not flood the logs.
        exc = state.outcome.exception() if state.outcome else None
        first = state.attempt_number == 1
        level = logging.WARNING if first or state.seconds_since_start - last_warning[0] >= 60 else logging.DEBUG
        if level == logging.WARNING:
            last_warning[0] = state.seconds_since_start
        log.log(level, "broker %s unreachable (%s); retrying with backoff (attempt %d, down for %.0fs)",
                settings.url_for_logs, _describe(exc), state.attempt_number, state.seconds_since_start)

    last_warning = [0.0]

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(_retryable),
        wait=tenacity.wait_exponential(multiplier=0.2, max=5.0) + tenacity.wait_random(0, 0.2),
        stop=should_stop,
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(pika.BlockingConnection, settings.pika_parameters())


def properties_for(env: Envelope, content_type: str, *, correlation_id: str | None = None) -> pika.BasicProperties:
    message = env.message
    persistent = message.CATEGORY in ("command", "operator", "result", "advice")
    if correlation_id is None and isinstance(message, CommandResult):
        correlation_id = message.command_id
    return pika.BasicProperties(
        content_type=content_type,
        type=message.KIND,
        message_id=env.id,
        correlation_id=correlation_id,
        app_id=env.sender,
        timestamp=env.ts_ms // 1000,
        delivery_mode=2 if persistent else 1,
        headers={"schema-version": message.VERSION},
    )


class Publisher:
    """A confirmed publisher on its own connection, safe to share between threads."""

    def __init__(self, settings: BrokerSettings, sender: str, *, retry_for_s: float = 30.0):
        self.settings = settings.with_(connection_name=f"{settings.connection_name}-publisher")
        self.sender = sender
        self.retry_for_s = retry_for_s
        self._lock = threading.RLock()
        self._conn: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._closed = threading.Event()
        self._keepalive = threading.Thread(target=self._pump, name=f"{sender}-publisher-keepalive", daemon=True)
        self._keepalive.start()

    # -- public

    def publish(
        self,
        message: Message,
        *,
        content_type: str = MSGPACK,
        correlation_id: str | None = None,
        mandatory: bool = False,
        retry_for_s: float | None = None,
        envelope: Envelope | None = None,
    ) -> Envelope:
        """Validate, encode and publish; returns once the broker confirmed it.

        Raises BrokerUnavailable after retry_for_s, Unroutable for a mandatory
        publish no queue takes.  A publish retried after a lost connection may
        arrive twice: every consumer is idempotent by message or command id.
        """
        message.validate()
        env = envelope or wrap(message, self.sender)
        exchange, key = route(message)
        body = encode(env, content_type)
        props = properties_for(env, content_type, correlation_id=correlation_id)
        self.publish_raw(exchange, key, body, props, mandatory=mandatory, retry_for_s=retry_for_s)
        return env

    def publish_raw(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: pika.BasicProperties,
        *,
        mandatory: bool = False,
        retry_for_s: float | None = None,
    ) -> None:
        budget = self.retry_for_s if retry_for_s is None else retry_for_s
        deadline = time.monotonic() + budget
        delay = 0.2
        while True:
            with self._lock:
                try:
                    channel = self._ensure_channel(max(0.0, deadline - time.monotonic()))
                    channel.basic_publish(exchange, routing_key, body, properties, mandatory=mandatory)
                    return
                except px.UnroutableError:
                    raise Unroutable(f"no queue is bound to {exchange} with routing key {routing_key!r}") from None
                except px.NackError:
                    err: BaseException = BrokerUnavailable(f"broker refused (nack) publish to {exchange}/{routing_key}")
                except px.ChannelClosedByBroker as exc:
                    self._drop()
                    if exc.reply_code in (403, 404):  # access refused, no such exchange: not transient
                        raise
                    err = exc
                except FATAL_CONNECT_ERRORS:
                    self._drop()
                    raise
                except CONNECTION_ERRORS + (BrokerUnavailable, px.ChannelClosed) as exc:
                    self._drop()
                    err = exc
            if time.monotonic() + delay > deadline or self._closed.is_set():
                raise BrokerUnavailable(f"could not publish to {exchange}/{routing_key} within {budget:.0f}s: {_describe(err)}")
            log.info("publish to %s/%s failed (%s); retrying", exchange, routing_key, _describe(err))
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def dead_letter(self, body: bytes, props: Any, exchange: str, routing_key: str, queue: str, reason: str) -> None:
        headers = dict(getattr(props, "headers", None) or {})
        headers.update({
            H_REJECT_REASON: reason[:1000],
            H_REJECTED_BY: self.sender,
            H_ORIGINAL_EXCHANGE: exchange,
            H_ORIGINAL_QUEUE: queue,
        })
        new_props = pika.BasicProperties(
            content_type=getattr(props, "content_type", None),
            type=getattr(props, "type", None),
            message_id=getattr(props, "message_id", None),
            correlation_id=getattr(props, "correlation_id", None),
            app_id=getattr(props, "app_id", None),
            timestamp=getattr(props, "timestamp", None),
            delivery_mode=2,
            headers=headers,
        )
        self.publish_raw(EX_DLX, routing_key, body, new_props)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._conn is not None and self._conn.is_open:
                try:
                    self._conn.close()
                except Exception:  # closing a dead connection
                    pass
            self._conn = None

    # -- internals

    def _ensure_channel(self, retry_for_s: float) -> Any:
        if self._conn is None or not self._conn.is_open or self._channel is None or not self._channel.is_open:
            self._drop()
            self._conn = connect(self.settings, retry_for_s=retry_for_s)
            self._channel = self._conn.channel()
            self._channel.confirm_delivery()
        return self._channel

    def _drop(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except Exception:
                pass

    def _pump(self) -> None:
        # An idle BlockingConnection answers heartbeats only when someone calls into it.
        interval = max(1.0, self.settings.heartbeat_s / 3) if self.settings.heartbeat_s else 10.0
        while not self._closed.wait(interval):
            if not self._lock.acquire(timeout=0.1):
                continue  # a publish is running: it services the connection anyway
            try:
                if self._conn is not None and self._conn.is_open:
                    self._conn.process_data_events(0)
            except CONNECTION_ERRORS + (px.ChannelClosed,):
                self._drop()
            finally:
                self._lock.release()

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass(frozen=True)
class Delivery:
    envelope: Envelope
    queue: str
    exchange: str
    routing_key: str
    redelivered: bool

    @property
    def message(self) -> Message:
        return self.envelope.message


Handler = Callable[[Delivery], None]
QueueRef = str | Callable[[Any], str]  # a name, or a function that declares on a channel and returns the name


@dataclass
class Subscription:
    queue: QueueRef
    handler: Handler
    allow_json: bool
    accept: frozenset[str] | None
    max_bytes: int
    inline: bool
    on_error: str  # "requeue" | "deadletter"


class Consumer:
    """Consume one or more queues on one connection; reconnect forever until stopped."""

    def __init__(
        self,
        settings: BrokerSettings,
        publisher: Publisher,
        *,
        prefetch: int | None = None,
        workers: int = 4,
        name: str = "consumer",
    ):
        self.settings = settings.with_(connection_name=f"{settings.connection_name}-{name}")
        self.publisher = publisher
        self.prefetch = prefetch if prefetch is not None else settings.prefetch
        self.name = name
        self._subs: list[Subscription] = []
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{name}-worker")
        self._stop = threading.Event()
        self.ready = threading.Event()  # set while consuming
        self.queue_names: dict[int, str] = {}
        self._conn: pika.BlockingConnection | None = None
        self._thread: threading.Thread | None = None

    def subscribe(
        self,
        queue: QueueRef,
        handler: Handler,
        *,
        allow_json: bool = False,
        accept: frozenset[str] | None = None,
        max_bytes: int | None = None,
        inline: bool = False,
        on_error: str = "requeue",
    ) -> None:
        """Register a handler.  Command queues: allow_json=True (operators paste JSON).

        inline=True runs the handler on the I/O thread: only for quick, non-blocking work.
        """
        if max_bytes is None:
            max_bytes = COMMAND_MAX_BYTES if allow_json else DEFAULT_MAX_BYTES
        self._subs.append(Subscription(queue, handler, allow_json, accept, max_bytes, inline, on_error))

    def start(self) -> "Consumer":
        self._thread = threading.Thread(target=self.run, name=f"{self.name}-io", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            try:
                conn = connect(self.settings, retry_for_s=None, stop=self._stop)
            except FATAL_CONNECT_ERRORS as exc:
                log.error("%s: broker refused the credentials of user %r: %s", self.name, self.settings.user, exc)
                self._stop.wait(5.0)
                continue
            except CONNECTION_ERRORS:
                if self._stop.is_set():
                    break
                continue
            self._conn = conn
            try:
                channel = conn.channel()
                channel.basic_qos(prefetch_count=self.prefetch)
                for i, sub in enumerate(self._subs):
                    qname = sub.queue(channel) if callable(sub.queue) else sub.queue
                    self.queue_names[i] = qname
                    channel.basic_consume(
                        qname, functools.partial(self._on_message, conn, sub, qname), auto_ack=False
                    )
                self.ready.set()
                delay = 0.2
                log.info("%s: consuming %s", self.name, ", ".join(self.queue_names.values()))
                while not self._stop.is_set():
                    conn.process_data_events(time_limit=0.2)
            except px.ChannelClosedByBroker as exc:
                log.error("%s: broker closed the channel: %s %s", self.name, exc.reply_code, exc.reply_text)
            except CONNECTION_ERRORS as exc:
                log.warning("%s: broker connection lost (%s); reconnecting", self.name, type(exc).__name__)
            finally:
                self.ready.clear()
                self._conn = None
                try:
                    if conn.is_open:
                        conn.close()
                except Exception:
                    pass
            if not self._stop.is_set():
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)

    # -- message handling (I/O thread)

    def _on_message(self, conn: Any, sub: Subscription, queue: str, channel: Any, method: Any, props: Any, body: bytes) -> None:
        tag = method.delivery_tag
        try:
            env = decode(
                body,
                props.content_type,
                allow_json=sub.allow_json,
                max_bytes=sub.max_bytes,
                props_message_id=props.message_id,
                props_timestamp_s=props.timestamp,
                props_app_id=props.app_id,
                accept=sub.accept,
            )
        except DecodeError as exc:
            log.warning("%s: dead-lettering a message from %s (%s): %s", self.name, queue, method.routing_key, exc.reason)
            self._dead_letter_then_ack(channel, tag, body, props, method, queue, exc.reason)
            return
        delivery = Delivery(env, queue, method.exchange, method.routing_key, method.redelivered)
        if sub.inline:
            self._handle(conn, channel, tag, sub, delivery, body, props, method, inline=True)
        else:
            self._pool.submit(self._handle, conn, channel, tag, sub, delivery, body, props, method, False)

    def _dead_letter_then_ack(self, channel: Any, tag: int, body: bytes, props: Any, method: Any, queue: str, reason: str) -> None:
        try:
            self.publisher.dead_letter(body, props, method.exchange, method.routing_key, queue, reason)
        except Exception as exc:  # keep the message: it will be redelivered
            log.error("%s: could not dead-letter (%s); leaving the message unacked", self.name, exc)
            channel.basic_nack(tag, requeue=True)
            return
        channel.basic_ack(tag)

    def _handle(self, conn: Any, channel: Any, tag: int, sub: Subscription, delivery: Delivery,
                body: bytes, props: Any, method: Any, inline: bool) -> None:
        action: Callable[[], None]
        try:
            sub.handler(delivery)
            action = functools.partial(channel.basic_ack, tag)
        except PermanentError as exc:
            reason = f"{delivery.envelope.kind}: {exc.reason}"
            log.warning("%s: dead-lettering %s %s: %s", self.name, delivery.envelope.kind, delivery.envelope.id, exc.reason)
            if inline:
                self._dead_letter_then_ack(channel, tag, body, props, method, delivery.queue, reason)
                return
            action = functools.partial(self._dead_letter_then_ack, channel, tag, body, props, method, delivery.queue, reason)
        except Exception as exc:
            if sub.on_error == "deadletter" or isinstance(exc, PermanentError):
                reason = f"handler error: {type(exc).__name__}: {exc}"
                log.exception("%s: handler failed on %s; dead-lettering", self.name, delivery.envelope.kind)
                action = functools.partial(self._dead_letter_then_ack, channel, tag, body, props, method, delivery.queue, reason)
            else:
                log.warning("%s: handler failed on %s %s (%s: %s); requeueing", self.name,
                            delivery.envelope.kind, delivery.envelope.id, type(exc).__name__, exc,
                            exc_info=not isinstance(exc, TemporaryError))
                action = functools.partial(channel.basic_nack, tag, requeue=True)
        if inline:
            action()
            return
        try:
            conn.add_callback_threadsafe(functools.partial(self._settle, channel, action))
        except CONNECTION_ERRORS + (px.ChannelClosed,):
            log.info("%s: connection gone before settling; the broker will redeliver", self.name)

    def _settle(self, channel: Any, action: Callable[[], None]) -> None:
        if not channel.is_open:
            return  # the broker redelivers it on the next connection
        try:
            action()
        except CONNECTION_ERRORS + (px.ChannelClosed,) as exc:
            log.info("%s: could not settle (%s); the broker will redeliver", self.name, type(exc).__name__)
