"""Hand-written fakes and builders shared by the arbiter tests (no mocks; this module holds no tests)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from enersis.arbiter.config import ArbiterConfig, CommandSettings
from enersis.arbiter.policy import Params
from enersis.arbiter.service import PublishFailed
from enersis.common.messages import DomainSample, Message, NodeTelemetry


class FakeClock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


@dataclass
class FakeBus:
    """Records what the arbiter publishes; can refuse routing for chosen nodes' migrate queues."""

    sent: list[Message] = field(default_factory=list)
    unroutable_sources: set[str] = field(default_factory=set)

    def publish(self, message: Message, *, mandatory: bool = False) -> None:
        message.validate()
        if mandatory and getattr(message, "source", None) in self.unroutable_sources:
            raise PublishFailed(f"no queue for migrate.{message.source}", unroutable=True)
        self.sent.append(message)

    def of(self, kind: str) -> list[Message]:
        return [m for m in self.sent if m.KIND == kind]

    def clear(self) -> None:
        self.sent.clear()


class Ids:
    def __init__(self, prefix: str = "cmd"):
        self._n = itertools.count(1)
        self.prefix = prefix

    def __call__(self) -> str:
        return f"{self.prefix}-{next(self._n)}"


def domain(name: str, cpu_node_pct: float, mem_mib: int = 512, state: int = 1) -> DomainSample:
    return DomainSample(name=name, uuid=f"uuid-{name}", state=state, vcpus=1, mem_max_kib=mem_mib * 1024,
                        mem_kib=mem_mib * 1024, cpu_node_pct=cpu_node_pct, cpu_vcpu_pct=min(100.0, cpu_node_pct * 4))


def telemetry(node: str, cpu_pct: float, domains: list[DomainSample], *, seq: int = 1, cpus: int = 4,
              mhz: int = 1000, mem_mib: int = 16384, ok: bool = True, interval: float = 5.0) -> NodeTelemetry:
    return NodeTelemetry(node=node, seq=seq, boot_id=f"boot-{node}", hypervisor_ok=ok, hypervisor_type="QEMU",
                         cpus=cpus, mhz=mhz, mem_total_kib=mem_mib * 1024, mem_free_kib=mem_mib * 512,
                         cpu_pct=cpu_pct, cpu_pct_latest=cpu_pct, window_s=10.0, sample_interval_s=1.0,
                         publish_interval_s=interval, domains=domains)


def config(**kw) -> ArbiterConfig:
    params = kw.pop("params", Params())
    commands = kw.pop("commands", CommandSettings())
    base = dict(params=params, commands=commands, warmup_s=0.0, unknown_grace_s=15.0)
    base.update(kw)
    return ArbiterConfig(**base)
