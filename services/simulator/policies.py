"""Every policy the simulator knows, by name."""

from __future__ import annotations

from enersis.arbiter.policy import POLICIES as ARBITER_POLICIES

from .arbiter_policy import ArbiterPolicy
from .cloudsim import CLOUDSIM_POLICIES

POLICY_NAMES: tuple[str, ...] = tuple(CLOUDSIM_POLICIES) + tuple(sorted(ARBITER_POLICIES))


def make_policy(name: str):
    if name in CLOUDSIM_POLICIES:
        return CLOUDSIM_POLICIES[name]()
    if name in ARBITER_POLICIES:
        return ArbiterPolicy(name)
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}")
