"""Property test of the whole arbiter (state + policy + planner + tracking) against a simulated world.

Hypothesis drives random event sequences: reports, load changes, results
(succeeded, failed, skipped, lost), clock jumps, operator pins and drains,
and arbiter restarts from its state file.  After every step the safety
invariants are checked against the world's truth, not the arbiter's belief:

- never a ShutdownNode for a node that hosts a VM;
- never a MigrateVm to a node that is off, or from a node that does not host the VM;
- never two commands in flight for one VM, never two power commands for one node;
- every command names a node and VM that exist.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from enersis.arbiter.config import CommandSettings, NodeConfig
from enersis.arbiter.policy import Params
from enersis.arbiter.service import Arbiter
from enersis.arbiter.store import StateFile
from enersis.common.messages import CommandResult, DrainNode, MigrateVm, PinVm, ShutdownNode, UndrainNode, WakeNode

from .test_arbiter_fakes import FakeBus, FakeClock, Ids, config, domain, telemetry

NODES = ["n0", "n1", "n2", "n3", "n4"]
VMS = [f"v{i}" for i in range(8)]


class ArbiterWorld(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="arbiter-prop-"))
        self.clock = FakeClock()
        self.bus = FakeBus()
        self.ids = Ids()
        self.powered = {n: n != "n4" for n in NODES}
        self.where = {vm: NODES[i % 3] for i, vm in enumerate(VMS)}  # n3 starts empty, n4 off
        self.load = {vm: 8.0 for vm in VMS}
        self.pending: dict[str, object] = {}  # command_id -> command: sent, not answered (or lost) yet
        self.deadline: dict[str, float] = {}  # past it, the command is abandoned (the executor's own timeout)
        self.seen = 0  # how many bus messages were checked
        self.last_report: dict[str, float] = {}
        self.seq = 0
        self.policy = "enersis-2012"
        self.arb = self._arbiter()

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _arbiter(self) -> Arbiter:
        cfg = config(params=Params(policy=self.policy, cycle_s=10, sustain_cycles=1, reserve_nodes=0),
                     commands=CommandSettings(migrate_timeout_s=30, migrate_deadline_slack_s=10, wake_timeout_s=30,
                                              shutdown_timeout_s=30, max_retries=2, retry_hold_s=60,
                                              manual_hold_s=30, quarantine_s=60),
                     nodes=tuple(NodeConfig(n) for n in NODES), unknown_grace_s=5.0)
        return Arbiter(cfg, self.bus, clock=self.clock, new_id=self.ids, store=StateFile(self.dir / "s.json"))

    def ms(self) -> int:
        return int(self.clock() * 1000)

    # ------------------------------------------------------------ world events

    @rule(node=st.sampled_from(NODES))
    def report(self, node):
        if not self.powered[node]:
            return
        self.seq += 1
        self.last_report[node] = self.clock()
        doms = [domain(vm, self.load[vm]) for vm in sorted(self.where) if self.where[vm] == node]
        self.arb.on_telemetry(telemetry(node, min(100.0, sum(d.cpu_node_pct for d in doms)), doms, seq=self.seq),
                              self.ms())

    @rule()
    def report_all(self):
        for n in NODES:
            self.report(n)

    @rule(vm=st.sampled_from(VMS), pct=st.sampled_from([0.5, 3.0, 8.0, 20.0, 45.0]))
    def change_load(self, vm, pct):
        self.load[vm] = pct

    @rule(seconds=st.sampled_from([0.5, 3.0, 11.0, 45.0]))
    def time_passes(self, seconds):
        self.clock.advance(seconds)

    @rule()
    def arbiter_step(self):
        self.arb.step()

    @rule()
    def arbiter_cycle(self):
        self.arb.step(full=True)

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), outcome=st.sampled_from(["succeeded", "failed", "skipped", "lost", "accepted"]))
    def answer(self, data, outcome):
        cid = data.draw(st.sampled_from(sorted(self.pending)))
        cmd = self.pending[cid]
        if outcome == "accepted":
            self._result(cmd, "accepted")
            return
        del self.pending[cid]
        self.deadline.pop(cid, None)
        if outcome == "lost":
            return  # never answered: the arbiter's deadline must handle it
        if isinstance(cmd, MigrateVm):
            ok = outcome == "succeeded" and self.where[cmd.vm] == cmd.source and self.powered[cmd.target]
            if ok:
                self.where[cmd.vm] = cmd.target
            status = "succeeded" if ok else ("skipped" if self.where[cmd.vm] == cmd.target else "failed")
            self._result(cmd, status)
        elif isinstance(cmd, WakeNode):
            if outcome == "succeeded":
                self.powered[cmd.node] = True
                self._result(cmd, "succeeded")
                self.report(cmd.node)
            else:
                self._result(cmd, "skipped" if self.powered[cmd.node] else "failed")
        elif isinstance(cmd, ShutdownNode):
            hosting = any(n == cmd.node for n in self.where.values())
            if outcome == "succeeded" and not hosting:
                self.powered[cmd.node] = False
                self._result(cmd, "succeeded")
            else:
                self._result(cmd, "skipped" if not self.powered[cmd.node] else "rejected")

    def _result(self, cmd, status):
        node = getattr(cmd, "source", None) or cmd.node
        details = {"source": cmd.source, "target": cmd.target} if isinstance(cmd, MigrateVm) else {}
        self.arb.on_result(CommandResult(command_id=cmd.command_id, command_kind=cmd.KIND, status=status,
                                         node=node, vm=getattr(cmd, "vm", ""), details=details), self.ms())

    @rule(vm=st.sampled_from(VMS), pinned=st.booleans())
    def operator_pin(self, vm, pinned):
        self.arb.on_operator(PinVm(command_id=self.ids(), vm=vm, pinned=pinned))

    @rule(node=st.sampled_from(NODES), power_off=st.booleans(), undrain=st.booleans())
    def operator_drain(self, node, power_off, undrain):
        if undrain:
            self.arb.on_operator(UndrainNode(command_id=self.ids(), node=node))
        else:
            self.arb.on_operator(DrainNode(command_id=self.ids(), node=node, power_off=power_off))

    @rule()
    def restart(self):
        # The process dies between two passes of its loop (a pass saves what changed, e.g. nodes seen up).
        self.check_commands()
        self.arb.flush()
        self.arb = self._arbiter()

    @rule()
    def switch_policy(self):
        self.policy = "enersis-hysteresis" if self.policy == "enersis-2012" else "enersis-2012"
        self.arb = self._arbiter()

    # ------------------------------------------------------------ invariants

    def _track(self, m, timeout: float) -> None:
        self.pending[m.command_id] = m
        self.deadline[m.command_id] = self.clock() + timeout

    @invariant()
    def check_commands(self):
        # A command past its deadline is abandoned on both sides: the world never executes it any more.
        for cid in [c for c, t in self.deadline.items() if self.clock() > t]:
            self.pending.pop(cid, None)
            del self.deadline[cid]
        new = self.bus.sent[self.seen:]
        self.seen = len(self.bus.sent)
        for m in new:
            if isinstance(m, MigrateVm):
                assert m.vm in self.where and m.source in self.powered and m.target in self.powered
                assert self.where[m.vm] == m.source, f"{m.vm} is on {self.where[m.vm]}, not {m.source}"
                assert self.powered[m.target], f"migrate to {m.target}, which is off"
                assert self.powered[m.source]
                busy = [c for c in self.pending.values() if getattr(c, "vm", None) == m.vm]
                assert not busy, f"second command for {m.vm} while {busy[0].command_id} is in flight"
                self._track(m, 40)
            elif isinstance(m, ShutdownNode):
                assert m.node in self.powered and not m.force
                hosted = [vm for vm, n in self.where.items() if n == m.node]
                assert not hosted, f"shutdown of {m.node}, which hosts {hosted}"
                incoming = [c for c in self.pending.values()
                            if isinstance(c, MigrateVm) and m.node in (c.source, c.target)]
                assert not incoming, f"shutdown of {m.node} with a migration in flight"
                self._no_power_in_flight(m.node)
                self._track(m, 30)
            elif isinstance(m, WakeNode):
                assert m.node in self.powered
                # A node that is on but silent (agent down) looks off; one that reports never does.
                recent = self.clock() - self.last_report.get(m.node, -1e9) <= 15
                assert not (self.powered[m.node] and recent), f"wake of {m.node}, which is on and reporting"
                self._no_power_in_flight(m.node)
                self._track(m, 30)

    def _no_power_in_flight(self, node):
        other = [c for c in self.pending.values() if isinstance(c, (WakeNode, ShutdownNode)) and c.node == node]
        assert not other, f"second power command for {node}"

    @invariant()
    def no_vm_lost(self):
        assert set(self.where) == set(VMS)
        for vm, n in self.where.items():
            assert self.powered[n], f"{vm} on {n}, which is off"


ArbiterWorld.TestCase.settings = settings(max_examples=int(os.environ.get("ENERSIS_PROPERTY_EXAMPLES", "150")), stateful_step_count=40, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestArbiterWorld = ArbiterWorld.TestCase
