"""What the migration executor decides, kept free of I/O.

The executor (executor.py) asks the hypervisor a few facts and hands them
here; these functions say what to answer.  Three decisions:

- `admit`: may this MigrateVm run on this node?  (rejected / skipped / go)
- `outcome_result`: a libvirt outcome → the final CommandResult;
- `recovered_result`: after a crash, the facts about an unfinished
  migration → its true final result (or "still running, wait").

No pika, libvirt or clock here: callers pass times in.
"""

from __future__ import annotations

from dataclasses import dataclass

from enersis.common.messages import CommandResult, MigrateVm

KIND = MigrateVm.KIND


@dataclass(frozen=True, slots=True)
class Go:
    """The command may run: migrate now."""


def result(cmd: MigrateVm, node: str, status: str, reason: str = "", *, retryable: bool = False,
           **details: object) -> CommandResult:
    base = {"source": cmd.source, "target": cmd.target}
    base.update({k: v for k, v in details.items() if v is not None})
    return CommandResult(
        command_id=cmd.command_id,
        command_kind=KIND,
        status=status,
        reason=reason,
        node=node,
        vm=cmd.vm,
        retryable=retryable,
        details=base,
    )


def misaddressed(cmd: MigrateVm, node: str) -> CommandResult | None:
    """A command in this node's queue whose source is another node (published by hand to the wrong queue)."""
    if cmd.source != node:
        return result(cmd, node, "rejected",
                      f"command names source {cmd.source} but reached the executor of {node}; "
                      f"publish it with routing key migrate.{cmd.source}")
    return None


def unknown_target(cmd: MigrateVm, node: str, peers: frozenset[str]) -> CommandResult | None:
    if cmd.target == node:
        return result(cmd, node, "rejected", f"target {cmd.target} is this node")
    if cmd.target not in peers:
        known = ", ".join(sorted(peers)) or "none"
        return result(cmd, node, "rejected",
                      f"target {cmd.target} is not a known peer of {node} (add [peers.{cmd.target}] to its "
                      f"node.toml; known: {known})")
    return None


def admit(cmd: MigrateVm, node: str, *, here: bool, on_target: bool | None) -> CommandResult | Go:
    """Given where the VM is, run the migration, skip it, or reject it.

    on_target is None when the target could not be asked (only needed when the VM is not here).
    """
    if here:
        return Go()
    if on_target:
        return result(cmd, node, "skipped", f"{cmd.vm} already runs on {cmd.target}; nothing to do")
    if on_target is None:
        return result(cmd, node, "rejected",
                      f"{cmd.vm} is not running on {node} (and {cmd.target} could not be asked)")
    return result(cmd, node, "rejected", f"{cmd.vm} is not running on {node}")


def outcome_result(cmd: MigrateVm, node: str, *, ok: bool, duration_s: float, downtime_ms: float | None,
                   error: str, retryable: bool) -> CommandResult:
    if ok:
        return result(cmd, node, "succeeded", f"{cmd.vm} now runs on {cmd.target}",
                      duration_s=round(duration_s, 3), downtime_ms=downtime_ms)
    return result(cmd, node, "failed", error or "migration failed for an unknown reason",
                  retryable=retryable, duration_s=round(duration_s, 3))


@dataclass(frozen=True, slots=True)
class Wait:
    """A migration job still runs on the source: look again later (or abort once past the deadline)."""

    abort: bool


def recovered_result(cmd: MigrateVm, node: str, *, job_active: bool, here: bool, on_target: bool | None,
                     elapsed_s: float) -> CommandResult | Wait:
    """The true final result of a migration this executor started before it died.

    `here`/`on_target`: is the VM active on this node / on the target now.
    """
    if job_active:
        return Wait(abort=elapsed_s > cmd.timeout_s)
    details = {"recovered": True, "duration_s": round(elapsed_s, 3)}
    if on_target and not here:
        return result(cmd, node, "succeeded",
                      f"{cmd.vm} now runs on {cmd.target} (confirmed after the executor restarted)", **details)
    if here and not on_target:
        return result(cmd, node, "failed",
                      f"the migration did not complete (the executor restarted mid-migration); "
                      f"{cmd.vm} still runs on {node}", retryable=True, **details)
    if here and on_target:
        return result(cmd, node, "failed",
                      f"{cmd.vm} is active on both {node} and {cmd.target} after an interrupted migration; "
                      "an operator must check which copy to keep", **details)
    if on_target is None:
        return result(cmd, node, "failed",
                      f"the migration was interrupted; {cmd.vm} is not on {node} and {cmd.target} "
                      "could not be asked", retryable=False, **details)
    return result(cmd, node, "failed",
                  f"the migration was interrupted and {cmd.vm} is active on neither {node} nor {cmd.target}; "
                  "an operator must check it", **details)
