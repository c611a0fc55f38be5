"""Pure placement policy: `decide(snapshot, params, now) -> intents`.

No I/O, no clock, no randomness: the live arbiter and the offline simulator
call the same function with the same snapshot and get the same intents.
Every tie is broken by name, so a run can be replayed exactly.

Two policies share the data model and the bookkeeping below:

- ``enersis-2012``: the 2012 thesis' loop, without its defects. Overloaded
  node with more than one VM: move the *second* most loaded VM to the least
  loaded online node that stays under the upper threshold after taking it,
  else wake an off node (first by name, never random). Underloaded node: move
  each VM to the least loaded node that stays under the upper threshold;
  shut the node down only once it is confirmed empty with nothing in flight.
  A VM on the frontend is placed on the best node.
- ``enersis-hysteresis``: acts only on *sustained* over/underload (history),
  keeps a reserve of spare online nodes, places by best fit on CPU *and*
  memory (consolidates instead of spreading), evacuates an underloaded node
  all-or-nothing (and, below ``consolidate_pct``, a lightly loaded one whose
  VMs all fit on busier nodes), and limits concurrent migrations and power
  cycles per node per hour.  In the simulator (`enersis simulate`, 800 hosts,
  PlanetLab days 20110303/06/09) it uses within 1 % of enersis-2012's energy
  with about 1/60 of the migrations and no SLA violation (SLAV 0 against
  0.005 %).

Loads are in MHz-equivalents: a node's load % is ``cpu_used / cpu_capacity``.
A VM already in flight (``busy`` with a ``target``) is counted on its target
and not on its source, so a decision made while migrations run does not
order them twice.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable, Union

NODE_STATES = ("online", "off", "waking", "draining", "shutting_down", "quarantined", "stale")
#: the only state a migration may target
TARGET_STATES = frozenset({"online"})
#: states whose VM list is trustworthy enough to move VMs away from
SOURCE_STATES = frozenset({"online", "draining"})


# ---------------------------------------------------------------- views (input)


@dataclass(frozen=True)
class VmView:
    name: str
    node: str
    cpu: float  # demand in MHz-equivalents
    mem_mib: int
    pinned: bool = False
    busy: bool = False  # a command is in flight for this VM
    target: str = ""  # with busy: where an in-flight migration takes it ("" = unknown / not a migration)


@dataclass(frozen=True)
class NodeView:
    name: str
    state: str  # one of NODE_STATES
    cpu_capacity: float  # cpus * mhz
    cpu_used: float  # measured, MHz
    mem_mib: int
    busy: bool = False  # a power command (wake / shutdown) is in flight
    frontend: bool = False  # hosts the control plane: never a target, never shut down
    history: tuple[float, ...] = ()  # recent load % per cycle, oldest first (the current load is cpu_used)
    power_cycles_last_hour: int = 0
    power_off_when_empty: bool = False  # draining for maintenance with power-off requested

    @property
    def load_pct(self) -> float:
        return self.cpu_used * 100.0 / self.cpu_capacity if self.cpu_capacity > 0 else 100.0


@dataclass(frozen=True)
class Snapshot:
    nodes: tuple[NodeView, ...]
    vms: tuple[VmView, ...]


@dataclass(frozen=True)
class Params:
    policy: str = "enersis-2012"
    upper_pct: float = 80.0
    lower_pct: float = 10.0
    cycle_s: float = 10.0
    # ---- enersis-hysteresis only (enersis-2012 ignores them)
    sustain_cycles: int = 3  # over/underload must hold now and in the last sustain_cycles-1 history entries
    panic_pct: float = 95.0  # above this, act at once even without history
    margin_pct: float = 5.0  # place so the target stays under upper_pct - margin_pct
    reserve_nodes: int = 1  # spare empty online nodes kept powered on
    mem_headroom_pct: float = 0.0  # memory of a node never filled above 100 - this (arbiter.toml defaults to 10)
    max_concurrent_migrations: int = 8  # cluster-wide, counting those in flight
    max_migrations_per_node: int = 1  # outgoing, per node, counting those in flight
    max_power_cycles_per_hour: int = 2  # a node that cycled this often is neither shut down nor evacuated
    consolidate_pct: float = 50.0  # also empty a node sustained below this when busier nodes can take all its VMs

    def validate(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; known: {', '.join(sorted(POLICIES))}")
        if not 0 <= self.lower_pct < self.upper_pct <= 100:
            raise ValueError(f"need 0 <= lower_pct < upper_pct <= 100, got lower {self.lower_pct}, upper {self.upper_pct}")
        if self.cycle_s <= 0:
            raise ValueError("cycle_s must be > 0")
        if self.sustain_cycles < 1:
            raise ValueError("sustain_cycles must be >= 1")
        if not 0 <= self.margin_pct < self.upper_pct:
            raise ValueError("margin_pct must be in [0, upper_pct)")
        if not 0 <= self.mem_headroom_pct < 100:
            raise ValueError("mem_headroom_pct must be in [0, 100)")
        if not 0 <= self.consolidate_pct <= self.upper_pct:
            raise ValueError("consolidate_pct must be in [0, upper_pct]")
        for name in ("reserve_nodes", "max_concurrent_migrations", "max_migrations_per_node", "max_power_cycles_per_hour"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


# ---------------------------------------------------------------- intents (output)


@dataclass(frozen=True)
class Migrate:
    vm: str
    source: str
    target: str
    reason: str


@dataclass(frozen=True)
class Wake:
    node: str
    reason: str


@dataclass(frozen=True)
class Shutdown:
    node: str
    reason: str


Intent = Union[Migrate, Wake, Shutdown]


# ---------------------------------------------------------------- working model


class _Node:
    """Mutable projection of a node while one decision is being made."""

    __slots__ = ("view", "name", "cap", "used", "mem_cap", "mem_used", "vms", "incoming", "outgoing",
                 "received", "evacuating")

    def __init__(self, view: NodeView):
        self.view = view
        self.name = view.name
        self.cap = view.cpu_capacity
        self.used = view.cpu_used
        self.mem_cap = view.mem_mib
        self.mem_used = 0
        self.vms: list[VmView] = []  # VMs that stay here once in-flight migrations finish
        self.incoming = 0  # migrations in flight to this node
        self.outgoing = 0  # migrations in flight from this node
        self.received = False  # took a VM in this decision: not evacuated in it
        self.evacuating = False  # gave a VM away in this decision for underload: not a target in it

    @property
    def pct(self) -> float:
        return self.used * 100.0 / self.cap if self.cap > 0 else 100.0

    def pct_with(self, cpu: float) -> float:
        return (self.used + cpu) * 100.0 / self.cap if self.cap > 0 else 100.0

    @property
    def state(self) -> str:
        return self.view.state

    @property
    def in_flight(self) -> bool:
        return self.view.busy or self.incoming > 0 or self.outgoing > 0


class _Model:
    def __init__(self, snapshot: Snapshot):
        self.nodes: dict[str, _Node] = {}
        for nv in sorted(snapshot.nodes, key=lambda n: n.name):
            if nv.name not in self.nodes:  # a duplicate name is a caller bug; the first wins
                self.nodes[nv.name] = _Node(nv)
        self.in_flight_migrations = 0
        # No global sort: every walk over a node's VMs sorts them (by load, then name) itself.
        for vm in snapshot.vms:
            src = self.nodes.get(vm.node)
            if src is None:
                # Not ours to move, but if it is on its way to a node we know, that node is not empty.
                dst = self.nodes.get(vm.target) if vm.busy and vm.target else None
                if dst is not None:
                    dst.incoming += 1
                    dst.used += vm.cpu
                    dst.mem_used += vm.mem_mib
                    dst.vms.append(vm)
                continue
            dst = self.nodes.get(vm.target) if vm.busy and vm.target else None
            if dst is not None and dst is not src:
                # In flight: count it where it is going so nothing is sent twice.
                self.in_flight_migrations += 1
                src.outgoing += 1
                src.used = max(0.0, src.used - vm.cpu)
                dst.incoming += 1
                dst.used += vm.cpu
                dst.mem_used += vm.mem_mib
                dst.vms.append(vm)
            else:
                src.mem_used += vm.mem_mib
                src.vms.append(vm)

    def node_list(self) -> list[_Node]:
        return list(self.nodes.values())

    def move(self, vm: VmView, src: _Node, dst: _Node) -> None:
        src.vms.remove(vm)
        src.used = max(0.0, src.used - vm.cpu)
        src.mem_used -= vm.mem_mib
        dst.vms.append(vm)
        dst.used += vm.cpu
        dst.mem_used += vm.mem_mib
        dst.received = True

    def migrate(self, vm: VmView, src: _Node, dst: _Node) -> None:
        """A move that becomes a command: both ends now have something in flight."""
        self.move(vm, src, dst)
        src.outgoing += 1
        dst.incoming += 1


def _movable(vm: VmView) -> bool:
    return not vm.pinned and not vm.busy


def _is_target(n: _Node) -> bool:
    return n.state in TARGET_STATES and not n.view.frontend and not n.view.busy and n.cap > 0


# ---------------------------------------------------------------- enersis-2012


def _least_loaded_fit(model: _Model, vm: VmView, exclude: _Node, upper: float,
                      *, skip: Callable[[_Node], bool] = lambda n: False) -> _Node | None:
    """The seed's "optimal free node": least loaded online node staying below `upper` with the VM.

    Memory must physically fit (a migration to a node without room fails);
    the seed did not look at memory at all, so nothing beyond that.
    """
    best: _Node | None = None
    for n in model.nodes.values():
        if n is exclude or not _is_target(n) or n.evacuating or skip(n):
            continue
        if n.pct_with(vm.cpu) >= upper or n.mem_used + vm.mem_mib > n.mem_cap:
            continue
        if best is None or n.pct < best.pct:  # nodes iterate in name order: ties go to the first name
            best = n
    return best


class _LoadIndex:
    """Online target nodes sorted by load %, for the least-loaded search at scale."""

    def __init__(self, nodes: Iterable[_Node]):
        self.keys: list[tuple[float, str]] = []
        self.by_name: dict[str, _Node] = {}
        for n in nodes:
            if _is_target(n):
                self.by_name[n.name] = n
                self.keys.append((n.pct, n.name))
        self.keys.sort()

    def update(self, n: _Node, old_pct: float) -> None:
        if n.name not in self.by_name:
            return
        i = bisect.bisect_left(self.keys, (old_pct, n.name))
        if i < len(self.keys) and self.keys[i] == (old_pct, n.name):
            del self.keys[i]
        bisect.insort(self.keys, (n.pct, n.name))

    def least_loaded_fit(self, vm: VmView, exclude: _Node, upper: float,
                         skip: Callable[[_Node], bool]) -> _Node | None:
        for pct, name in self.keys:
            if pct >= upper:
                break  # every later node is at least as loaded
            n = self.by_name[name]
            if n is exclude or n.evacuating or skip(n):
                continue
            if n.pct_with(vm.cpu) < upper and n.mem_used + vm.mem_mib <= n.mem_cap:
                return n
        return None


def _decide_2012(snapshot: Snapshot, params: Params, now: float) -> list[Intent]:
    model = _Model(snapshot)
    index = _LoadIndex(model.nodes.values())
    upper, lower = params.upper_pct, params.lower_pct
    intents: list[Intent] = []
    # The seed woke one node at a time (it blocked until the node answered):
    # while one is waking, its capacity is what we wait for.
    waking = any(n.state == "waking" for n in model.nodes.values())
    woke: list[bool] = [False]

    def wake_for(reason: str) -> None:
        if waking or woke[0]:
            return
        for n in model.nodes.values():
            if n.state == "off" and not n.view.busy and not n.view.frontend:
                intents.append(Wake(n.name, reason))
                woke[0] = True
                return

    def place(vm: VmView, src: _Node, reason: str, skip: Callable[[_Node], bool] = lambda n: False) -> bool:
        dst = index.least_loaded_fit(vm, src, upper, skip)
        if dst is None:
            return False
        old_src, old_dst = src.pct, dst.pct
        model.migrate(vm, src, dst)
        index.update(src, old_src)
        index.update(dst, old_dst)
        intents.append(Migrate(vm.name, src.name, dst.name, reason))
        return True

    # 1. VMs started on the frontend go to the best node (waking one if needed).
    for n in model.nodes.values():
        if not n.view.frontend or n.state not in SOURCE_STATES:
            continue
        for vm in sorted(n.vms, key=lambda v: v.name):
            if _movable(vm) and not place(vm, n, "started on the frontend"):
                wake_for(f"no online node can take {vm.name} from the frontend {n.name}")

    # 2. Every node that is up: relieve overload, empty underload.
    for n in model.nodes.values():
        if n.view.frontend or n.state not in SOURCE_STATES or n.view.busy:
            continue
        if n.state == "draining":
            _drain(model, n, intents, lambda vm, src: place(vm, src, f"draining {src.name}"), wake_for)
            continue
        pct = n.pct
        if pct > upper and len(n.vms) > 1:
            # The seed's rule: moving the most loaded VM would congest the
            # network, moving the second balances better.
            ranked = sorted(n.vms, key=lambda v: (-v.cpu, v.name))
            cand = next((vm for vm in ranked[1:] if _movable(vm)), None)
            if cand is not None and not place(cand, n, f"{n.name} overloaded at {pct:.0f}% > {upper:g}%"):
                wake_for(f"{n.name} overloaded at {pct:.0f}% and no online node can take {cand.name}")
        elif pct < lower and not n.received:
            if n.vms:
                # Never spread onto an empty node only to empty this one: it is
                # about to be shut down itself (the seed's evacuations ping-ponged).
                def skip(t: _Node) -> bool:
                    return not t.vms and not t.in_flight and t.pct < lower

                moved = False
                for vm in sorted(n.vms, key=lambda v: (-v.cpu, v.name)):
                    if _movable(vm) and place(vm, n, f"{n.name} underloaded at {pct:.0f}% < {lower:g}%", skip):
                        moved = True
                if moved:
                    n.evacuating = True
            elif not n.in_flight:
                n.evacuating = True  # about to power off: no later step of this pass may target it
                intents.append(Shutdown(n.name, f"{n.name} empty and underloaded at {pct:.0f}% < {lower:g}%"))
    return intents


def _drain(model: _Model, n: _Node, intents: list[Intent],
           place: Callable[[VmView, _Node], bool], wake_for: Callable[[str], None]) -> None:
    """Evacuate a node an operator drains; power it off once confirmed empty if asked to."""
    n.evacuating = True
    for vm in sorted(n.vms, key=lambda v: (-v.cpu, v.name)):
        if _movable(vm) and not place(vm, n):
            wake_for(f"draining {n.name}: no online node can take {vm.name}")
    if not n.vms and not n.in_flight and n.view.power_off_when_empty and not n.view.frontend:
        intents.append(Shutdown(n.name, f"{n.name} drained for maintenance"))


# ---------------------------------------------------------------- enersis-hysteresis


class _FitIndex:
    """Target nodes sorted by free CPU under the placement ceiling, for best-fit search."""

    def __init__(self, nodes: Iterable[_Node], ceiling_pct: float, mem_fill: float):
        self.ceiling = ceiling_pct / 100.0
        self.mem_fill = mem_fill
        self.keys: list[tuple[float, str]] = []
        self.by_name: dict[str, _Node] = {}
        for n in nodes:
            if _is_target(n):
                self.by_name[n.name] = n
                self.keys.append((self.free(n), n.name))
        self.keys.sort()

    def free(self, n: _Node) -> float:
        return n.cap * self.ceiling - n.used

    def remove(self, n: _Node, old_free: float) -> None:
        i = bisect.bisect_left(self.keys, (old_free, n.name))
        if i < len(self.keys) and self.keys[i] == (old_free, n.name):
            del self.keys[i]

    def update(self, n: _Node, old_free: float) -> None:
        if n.name not in self.by_name:
            return
        self.remove(n, old_free)
        bisect.insort(self.keys, (self.free(n), n.name))

    def best_fit(self, vm: VmView, exclude: _Node, skip: Callable[[_Node], bool]) -> _Node | None:
        # Smallest free CPU that still takes the VM: fills busy nodes first so
        # that idle ones empty out and can be powered off.
        i = bisect.bisect_left(self.keys, (vm.cpu, ""))
        for free, name in self.keys[i:i + 4096]:
            n = self.by_name[name]
            if n is exclude or n.evacuating or skip(n):
                continue
            if free >= vm.cpu and n.mem_used + vm.mem_mib <= n.mem_cap * self.mem_fill:
                return n
        return None


def _sustained(view: NodeView, now_pct: float, k: int, over: Callable[[float], bool]) -> bool:
    if not over(now_pct):
        return False
    if k <= 1:
        return True
    past = view.history[-(k - 1):]
    return len(past) == k - 1 and all(over(p) for p in past)


def _decide_hysteresis(snapshot: Snapshot, params: Params, now: float) -> list[Intent]:
    model = _Model(snapshot)
    upper, lower = params.upper_pct, params.lower_pct
    ceiling = upper - params.margin_pct
    mem_fill = 1.0 - params.mem_headroom_pct / 100.0
    index = _FitIndex(model.nodes.values(), ceiling, mem_fill)
    intents: list[Intent] = []
    budget = [max(0, params.max_concurrent_migrations - model.in_flight_migrations)]
    per_node = params.max_migrations_per_node
    k = params.sustain_cycles
    under_pct = max(lower, params.consolidate_pct)
    unmet_cpu = [0.0]  # demand nothing online could take: sizes the wake-ups

    def can_send(src: _Node) -> bool:
        return budget[0] > 0 and src.outgoing < per_node

    def place(vm: VmView, src: _Node, reason: str, skip: Callable[[_Node], bool] = lambda n: False) -> bool:
        dst = index.best_fit(vm, src, skip)
        if dst is None:
            unmet_cpu[0] += vm.cpu
            return False
        old_src, old_dst = index.free(src), index.free(dst)
        model.migrate(vm, src, dst)
        index.update(src, old_src)
        index.update(dst, old_dst)
        budget[0] -= 1
        intents.append(Migrate(vm.name, src.name, dst.name, reason))
        return True

    # 1. The frontend hands its VMs over at once.
    for n in model.nodes.values():
        if n.view.frontend and n.state in SOURCE_STATES:
            for vm in sorted(n.vms, key=lambda v: v.name):
                if _movable(vm) and can_send(n):
                    place(vm, n, "started on the frontend")

    # 2. Sustained (or severe) overload: shed the fewest VMs that bring the node under the ceiling.
    for n in model.nodes.values():
        if n.view.frontend or n.state != "online" or n.view.busy:
            continue
        pct = n.pct
        if not (pct > params.panic_pct or _sustained(n.view, pct, k, lambda p: p > upper)):
            continue
        while n.pct > ceiling and can_send(n):
            movable = [vm for vm in n.vms if _movable(vm)]
            if len(n.vms) < 2 or not movable:
                break  # one VM alone on a node cannot be relieved by moving it
            excess = n.used - n.cap * ceiling / 100.0
            # The smallest VM that alone removes the excess; else the largest
            # movable one that is not the only VM (least data on the wire).
            enough = [vm for vm in movable if vm.cpu >= excess]
            vm = min(enough, key=lambda v: (v.cpu, v.name)) if enough else max(movable, key=lambda v: (v.cpu, v.name))
            if not place(vm, n, f"{n.name} overloaded at {pct:.0f}% > {upper:g}% (sustained)"):
                break

    # 3. Draining nodes: evacuate everything movable.
    for n in model.nodes.values():
        if n.state == "draining" and not n.view.busy:
            n.evacuating = True
            for vm in sorted(n.vms, key=lambda v: (-v.cpu, v.name)):
                if _movable(vm) and can_send(n):
                    place(vm, n, f"draining {n.name}")
            if not n.vms and not n.in_flight and n.view.power_off_when_empty and not n.view.frontend:
                intents.append(Shutdown(n.name, f"{n.name} drained for maintenance"))

    # 4. Sustained underload: evacuate all-or-nothing, least loaded first; power off empty nodes beyond the reserve.
    #    With consolidate_pct, a lightly loaded node is emptied too when busier nodes can take all its VMs.
    spare = [n for n in model.nodes.values() if _is_target(n) and not n.vms and not n.in_flight]
    under = []
    for n in model.nodes.values():
        if n.view.frontend or n.state != "online" or n.view.busy or n.received:
            continue
        if n.view.power_cycles_last_hour >= params.max_power_cycles_per_hour:
            continue  # it would only come back: leave it on
        if n.vms and _sustained(n.view, n.pct, k, lambda p: p < under_pct):
            under.append(n)
    under.sort(key=lambda n: (n.pct, n.name))
    for n in under:
        if n.received or not can_send(n):
            continue
        if any(not _movable(vm) for vm in n.vms):
            continue  # a pinned or busy VM keeps it on; moving the rest would not save a node
        # Dry run first: every VM must fit somewhere, or nothing moves.
        plan = _trial_fit(model, index, n)
        if plan is None:
            continue
        n.evacuating = True
        reason = (f"{n.name} underloaded at {n.pct:.0f}% < {lower:g}% (sustained)" if n.pct < lower else
                  f"{n.name} at {n.pct:.0f}% < {under_pct:g}% (sustained): consolidated onto busier nodes")
        for vm, dst in plan:
            if not can_send(n):
                break  # the rest follows in later cycles, re-checked against the state then
            old_src, old_dst = index.free(n), index.free(dst)
            model.migrate(vm, n, dst)
            index.update(n, old_src)
            index.update(dst, old_dst)
            budget[0] -= 1
            intents.append(Migrate(vm.name, n.name, dst.name, reason))

    spare = [n for n in spare if not n.received]
    candidates = sorted((n for n in spare
                         if n.view.power_cycles_last_hour < params.max_power_cycles_per_hour
                         and n.pct < lower),
                        key=lambda n: (n.cap, n.name))
    # The reserve keeps the most capable spare nodes on; smaller ones go first.
    extra = len(spare) - params.reserve_nodes
    for n in candidates[:max(0, extra)]:
        intents.append(Shutdown(n.name, f"{n.name} empty and idle; {params.reserve_nodes} spare node(s) kept on"))

    # 5. Wake: for demand nothing online could take, or to restore the reserve when the cluster runs hot.
    online = [n for n in model.nodes.values() if _is_target(n)]
    cap = sum(n.cap for n in online)
    hot = cap > 0 and sum(n.used for n in online) * 100.0 / cap > ceiling
    spare_left = len(spare) - sum(1 for i in intents if isinstance(i, Shutdown))
    want_cpu = unmet_cpu[0]
    pending = sum(n.cap * ceiling / 100.0 for n in model.nodes.values() if n.state == "waking")
    want_nodes = 1 if (hot and spare_left < params.reserve_nodes) else 0
    off = sorted((n for n in model.nodes.values() if n.state == "off" and not n.view.busy and not n.view.frontend),
                 key=lambda n: (n.view.power_cycles_last_hour >= params.max_power_cycles_per_hour, -n.cap, n.name))
    waking_now = sum(1 for n in model.nodes.values() if n.state == "waking")
    for n in off:
        if want_cpu > pending:
            intents.append(Wake(n.name, f"{want_cpu:.0f} MHz of demand has no room on any online node"))
            pending += n.cap * ceiling / 100.0
        elif want_nodes > waking_now:
            intents.append(Wake(n.name, f"cluster above {ceiling:g}% with fewer than {params.reserve_nodes} spare node(s)"))
            waking_now += 1
        else:
            break
    return intents


def _trial_fit(model: _Model, index: _FitIndex, src: _Node) -> list[tuple[VmView, _Node]] | None:
    """Where each VM of `src` would go, or None if any one has nowhere to go. Leaves the model as it was."""
    plan: list[tuple[VmView, _Node]] = []
    flags = {}

    def skip(t: _Node) -> bool:
        # Never spread onto an empty node to empty another: it is spare or about to power off.
        return not t.vms and not t.in_flight

    ok = True
    for vm in sorted(src.vms, key=lambda v: (-v.cpu, v.name)):
        dst = index.best_fit(vm, src, skip)
        if dst is None:
            ok = False
            break
        flags.setdefault(dst.name, (dst, dst.received))
        old_src, old_dst = index.free(src), index.free(dst)
        model.move(vm, src, dst)
        index.update(src, old_src)
        index.update(dst, old_dst)
        plan.append((vm, dst))
    flags.setdefault(src.name, (src, src.received))
    for vm, dst in reversed(plan):
        o_src, o_dst = index.free(src), index.free(dst)
        model.move(vm, dst, src)
        index.update(src, o_src)
        index.update(dst, o_dst)
    for node, received in flags.values():
        node.received = received
    return plan if ok else None


# ---------------------------------------------------------------- entry


POLICIES: dict[str, Callable[[Snapshot, Params, float], list[Intent]]] = {
    "enersis-2012": _decide_2012,
    "enersis-hysteresis": _decide_hysteresis,
}


def decide(snapshot: Snapshot, params: Params, now: float) -> list[Intent]:
    """Intents for this snapshot under `params.policy`. Pure: same input, same output."""
    try:
        policy = POLICIES[params.policy]
    except KeyError:
        raise ValueError(f"unknown policy {params.policy!r}; known: {', '.join(sorted(POLICIES))}") from None
    return policy(snapshot, params, now)
