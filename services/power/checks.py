"""What the power service may do to a node, decided from what it has seen: pure, no I/O, no clock.

The service folds telemetry into a NodeStatus (tracker.py) and asks here
before it sends a magic packet or opens an SSH session.  Safety first: a
shutdown needs positive evidence that the node hosts nothing that would be
lost -- fresh telemetry from a hypervisor that answers, with no active
domain.  Missing or stale evidence means "no", unless an operator forces it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from enersis.common.messages import DOMAIN_STATES, DomainSample

# A power-off loses every domain that is not shut off: running and blocked
# ones, but also paused, suspended or shutting-down guests whose memory is
# still on this node.  Shut-off (5) and crashed (6) domains have nothing to lose.
INACTIVE_STATES = frozenset({5, 6})


@dataclass(frozen=True)
class NodeStatus:
    """What one power instance knows about a node; ages in seconds, None = never seen."""

    node: str
    telemetry_age_s: float | None = None
    hypervisor_ok: bool = True
    hypervisor_error: str = ""
    domains: tuple[DomainSample, ...] = ()
    online_age_s: float | None = None  # last NodeOnline
    offline_age_s: float | None = None  # last NodeOffline
    publish_interval_s: float = 5.0
    listening_s: float = 0.0  # how long this instance has been receiving telemetry

    @property
    def last_event(self) -> str | None:
        """'online', 'offline' or 'telemetry': whichever was received last."""
        seen = [(age, kind) for age, kind in ((self.telemetry_age_s, "telemetry"), (self.online_age_s, "online"),
                                              (self.offline_age_s, "offline")) if age is not None]
        if not seen:
            return None
        return min(seen)[1]


def power_state(s: NodeStatus, stale_after_s: float) -> str:
    """'online', 'off' or 'unknown' (nothing fresh either way)."""
    if s.last_event == "offline":
        return "off"
    for age in (s.telemetry_age_s, s.online_age_s):
        if age is not None and age <= stale_after_s:
            return "online"
    return "unknown"


def active_domains(domains: tuple[DomainSample, ...]) -> list[DomainSample]:
    return [d for d in domains if d.state not in INACTIVE_STATES]


def describe_domains(domains: list[DomainSample], limit: int = 5) -> str:
    names = [f"{d.name} ({DOMAIN_STATES.get(d.state, d.state)})" for d in domains[:limit]]
    more = f" and {len(domains) - limit} more" if len(domains) > limit else ""
    return ", ".join(names) + more


@dataclass(frozen=True)
class Verdict:
    """go | skip | reject | wait (for telemetry until wait_s more seconds) | probe (ask whether SSH answers)."""

    action: str
    reason: str = ""
    wait_s: float = 0.0
    details: dict = field(default_factory=dict)


def _age(age: float | None) -> str:
    return "never" if age is None else f"{age:.1f}s ago"


def wake_verdict(s: NodeStatus, stale_after_s: float) -> Verdict:
    if power_state(s, stale_after_s) == "online":
        return Verdict("skip", f"{s.node} is already online (last telemetry {_age(s.telemetry_age_s)}, "
                               f"NodeOnline {_age(s.online_age_s)})")
    return Verdict("go")


def shutdown_verdict(s: NodeStatus, *, stale_after_s: float, force: bool, issued_by: str) -> Verdict:
    state = power_state(s, stale_after_s)
    if state == "off":
        return Verdict("skip", f"{s.node} is already off (NodeOffline {_age(s.offline_age_s)})")
    if force:
        if issued_by != "operator":
            return Verdict("reject", f"force=true is honoured only from an operator, not from {issued_by!r}")
        active = active_domains(s.domains) if state == "online" else []
        note = f"; it still hosts {describe_domains(active)}" if active else ""
        return Verdict("go", f"forced by an operator{note}", details={"forced": True})
    fresh = s.telemetry_age_s is not None and s.telemetry_age_s <= stale_after_s
    if not fresh:
        # A young instance or a node that just said hello has not had the chance to report: wait for it.
        waits = [stale_after_s - s.listening_s]
        if s.online_age_s is not None:
            waits.append(2 * s.publish_interval_s + 1.0 - s.online_age_s)
        wait_s = max(waits)
        if wait_s > 0:
            return Verdict("wait", "waiting for telemetry", wait_s=wait_s)
        if state == "unknown":
            return Verdict("probe", f"no fresh telemetry from {s.node} (last {_age(s.telemetry_age_s)}, "
                                    f"stale after {stale_after_s:.0f}s)")
        return Verdict("reject", f"no telemetry from {s.node} yet (NodeOnline {_age(s.online_age_s)}): "
                                 "cannot prove it hosts no domain; an operator may force it")
    if not s.hypervisor_ok:
        return Verdict("reject", f"{s.node}'s agent cannot reach its hypervisor ({s.hypervisor_error or 'no reason given'}): "
                                 "cannot prove it hosts no domain; an operator may force it")
    active = active_domains(s.domains)
    if active:
        return Verdict("reject", f"{s.node} hosts {len(active)} active domain(s): {describe_domains(active)}; "
                                 "migrate them first (or an operator may force it)",
                       details={"active_domains": len(active)})
    return Verdict("go")


def probe_verdict(s: NodeStatus, ssh_port_open: bool, probe_reason: str) -> Verdict:
    """After a 'probe': a closed SSH port and no telemetry mean the node is already off."""
    if not ssh_port_open:
        return Verdict("skip", f"{s.node} looks off already: {probe_reason} and its SSH port is closed")
    return Verdict("reject", f"{probe_reason}, yet its SSH port answers: cannot prove it hosts no domain; "
                             "an operator may force it")
