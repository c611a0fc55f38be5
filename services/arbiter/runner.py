"""Wiring, in one place: the real broker behind the arbiter's Bus, its consumers and its loop."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

from enersis.common import topology
from enersis.common.bus import BrokerUnavailable, Consumer, Delivery, Publisher, Unroutable
from enersis.common.config import BrokerSettings
from enersis.common.messages import COMMAND_KINDS, CommandResult, Message, NodeOffline, NodeOnline, NodeTelemetry

from .config import ArbiterConfig
from .service import SENDER, Arbiter, PublishFailed
from .store import StateFile

log = logging.getLogger("enersis.arbiter.runner")

OPERATOR_KINDS = frozenset(k for k in COMMAND_KINDS if k not in ("MigrateVm", "WakeNode", "ShutdownNode"))


class BrokerBus:
    """The Bus interface over the shared confirmed Publisher."""

    def __init__(self, publisher: Publisher, *, retry_for_s: float = 5.0):
        self.publisher = publisher
        self.retry_for_s = retry_for_s

    def publish(self, message: Message, *, mandatory: bool = False) -> None:
        try:
            self.publisher.publish(message, mandatory=mandatory, retry_for_s=self.retry_for_s)
        except Unroutable as exc:
            raise PublishFailed(f"{exc} (is that node's agent running with its executor?)", unroutable=True) from None
        except BrokerUnavailable as exc:
            raise PublishFailed(str(exc)) from None


class ArbiterService:
    """An Arbiter on the real broker: start(), stop(). Tests run it in-process."""

    def __init__(self, cfg: ArbiterConfig, settings: BrokerSettings, **arbiter_kw: Any):
        self.cfg = cfg
        self.publisher = Publisher(settings, SENDER)
        store = StateFile(cfg.state_file, fsync=cfg.state_fsync) if cfg.state_file else None
        self.arbiter = Arbiter(cfg, BrokerBus(self.publisher), store=store, **arbiter_kw)
        # One worker: telemetry, results and operator commands are folded in arrival order.
        self.consumer = Consumer(settings, self.publisher, workers=1, name="arbiter",
                                 prefetch=max(settings.prefetch, 200))
        self.consumer.subscribe(topology.Q_ARBITER_TELEMETRY, self._on_telemetry,
                                accept=frozenset({NodeTelemetry.KIND, NodeOnline.KIND, NodeOffline.KIND}))
        self.consumer.subscribe(topology.Q_ARBITER_RESULTS, self._on_result,
                                accept=frozenset({CommandResult.KIND}))
        self.consumer.subscribe(topology.Q_ARBITER_CONTROL, self._on_operator, allow_json=True,
                                accept=OPERATOR_KINDS)
        self._stop = threading.Event()
        self._loop = threading.Thread(target=self.arbiter.run, args=(self._stop,), name="arbiter-loop", daemon=True)

    # -- handlers: translate deliveries into calls, nothing more

    def _on_telemetry(self, d: Delivery) -> None:
        m = d.message
        if isinstance(m, NodeTelemetry):
            self.arbiter.on_telemetry(m, d.envelope.ts_ms)
        elif isinstance(m, NodeOnline):
            self.arbiter.on_online(m, d.envelope.ts_ms)
        elif isinstance(m, NodeOffline):
            self.arbiter.on_offline(m)

    def _on_result(self, d: Delivery) -> None:
        self.arbiter.on_result(d.message, d.envelope.ts_ms)  # type: ignore[arg-type]

    def _on_operator(self, d: Delivery) -> None:
        self.arbiter.on_operator(d.message)

    # -- lifecycle

    def start(self) -> "ArbiterService":
        # A reaction crosses four threads (I/O, worker, decision loop, publisher); with Python's default
        # 5 ms GIL switch interval each hand-off can wait that long while telemetry is being decoded.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
        self.consumer.start()
        self._loop.start()
        log.info("arbiter started: policy %s, upper %g%%, lower %g%%, cycle %gs, mode %s%s",
                 self.arbiter.params.policy, self.arbiter.params.upper_pct, self.arbiter.params.lower_pct,
                 self.arbiter.params.cycle_s, self.arbiter.mode, ", paused" if self.arbiter.paused else "")
        return self

    def stop(self) -> None:
        self._stop.set()
        self.arbiter.trigger.set()
        self._loop.join(10)
        self.consumer.stop()
        self.arbiter.flush()
        self.publisher.close()

    def wait(self) -> None:
        self._stop.wait()

    def request_stop(self) -> None:
        self._stop.set()
        self.arbiter.trigger.set()
