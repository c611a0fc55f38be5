"""The node's migration executor: MigrateVm from its queue → live migration → CommandResult.

    [executor]
    enabled = true
    max_outgoing = 1                         # migrations leaving this node at once
    state_dir = "/var/lib/enersis/executor"  # the command journal, in <state_dir>/<node>/ (idempotency, recovery)
    peer2peer = true                         # libvirt drives the migration; it survives an executor crash
    journal_days = 7                         # how long a command id is remembered
    [peers.node-2]                           # (simulated cluster, sim://: optional, every node is a peer)
    uri = "qemu+ssh://node-2/system"         # the target's libvirt
    migration_uri = "tcp://10.0.0.12"        # VIR_MIGRATE_PARAM_URI (optional)
    listen_address = "10.0.0.12"             # VIR_MIGRATE_PARAM_LISTEN_ADDRESS (optional)

For each command, in order (the AMQP ack comes only after the final result
was confirmed by the broker; the Consumer runs this on a worker thread):

1. same command id seen before → the journal's final answer, again; still
   running in this process → wait for it and answer the same;
2. misaddressed, unknown target → rejected; VM already on the target →
   skipped; VM not here → rejected (the decisions are in migration.py);
3. accepted → journal "started" (fsync) → migrate → journal "final" →
   succeeded / failed.

On start, every journal record still "started" (the executor died
mid-migration) is resolved by asking libvirt where the VM is and whether its
job still runs; the true final result is published.

    python -m enersis.agent.executor --config node.toml   # the executor alone
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from enersis.common.bus import Consumer, Delivery, Publisher
from enersis.common.config import ConfigError
from enersis.common.messages import CommandResult, MigrateVm
from enersis.common.topology import declare_queue, migrate_queue_spec

from . import migration
from .hypervisor import HypervisorUnavailable, MigrationTarget, Migrator
from .journal import FINAL, STARTED, Journal

log = logging.getLogger("enersis.agent.executor")

EXECUTOR_KEYS = ("enabled", "max_outgoing", "state_dir", "peer2peer", "journal_days")
PEER_KEYS = ("uri", "migration_uri", "listen_address")
RECOVERY_POLL_S = 0.5
RECOVERY_GIVE_UP_S = 600.0  # how long to keep asking an unreachable hypervisor after a crash


@dataclass(frozen=True)
class ExecutorConfig:
    enabled: bool = True
    max_outgoing: int = 1
    state_dir: str = "/var/lib/enersis/executor"
    peer2peer: bool = True
    journal_days: float = 7.0
    peers: dict[str, MigrationTarget] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: dict[str, Any], *, source: str = "node.toml", node: str = "") -> "ExecutorConfig":
        table = data.get("executor", {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: `executor` must be a table ([executor])")
        unknown = sorted(set(table) - set(EXECUTOR_KEYS))
        if unknown:
            raise ConfigError(f"{source} [executor]: unknown key(s) {', '.join(unknown)} (known: {', '.join(EXECUTOR_KEYS)})")
        enabled = table.get("enabled", True)
        peer2peer = table.get("peer2peer", True)
        for key, value in (("enabled", enabled), ("peer2peer", peer2peer)):
            if not isinstance(value, bool):
                raise ConfigError(f"{source} [executor]: {key} must be true or false")
        max_outgoing = table.get("max_outgoing", 1)
        if isinstance(max_outgoing, bool) or not isinstance(max_outgoing, int) or not 1 <= max_outgoing <= 16:
            raise ConfigError(f"{source} [executor]: max_outgoing must be an integer from 1 to 16, got {max_outgoing!r}")
        state_dir = table.get("state_dir", cls.state_dir)
        if not isinstance(state_dir, str) or not state_dir:
            raise ConfigError(f"{source} [executor]: state_dir must be a folder path")
        days = table.get("journal_days", 7.0)
        if isinstance(days, bool) or not isinstance(days, (int, float)) or days <= 0:
            raise ConfigError(f"{source} [executor]: journal_days must be a positive number")

        peers_table = data.get("peers", {})
        if not isinstance(peers_table, dict):
            raise ConfigError(f"{source}: `peers` must be tables, one per node ([peers.node-2])")
        peers: dict[str, MigrationTarget] = {}
        for name, peer in peers_table.items():
            where = f"{source} [peers.{name}]"
            if not isinstance(peer, dict):
                raise ConfigError(f"{where}: must be a table with uri, migration_uri, listen_address")
            if name == node:
                raise ConfigError(f"{where}: a node is not its own peer")
            bad = sorted(set(peer) - set(PEER_KEYS))
            if bad:
                raise ConfigError(f"{where}: unknown key(s) {', '.join(bad)} (known: {', '.join(PEER_KEYS)})")
            for key in PEER_KEYS:
                if key in peer and not isinstance(peer[key], str):
                    raise ConfigError(f"{where}: {key} must be a string")
            if not peer.get("uri"):
                raise ConfigError(f"{where}: uri (the target's libvirt URI) is required")
            peers[name] = MigrationTarget(name, peer["uri"], peer.get("migration_uri", ""), peer.get("listen_address", ""))
        return cls(enabled, max_outgoing, state_dir, peer2peer, float(days), peers)


class MigrationExecutor:
    """Executes MigrateVm commands for one node through a Migrator; publishes every result."""

    def __init__(self, node: str, migrator: Migrator, publisher: Publisher, config: ExecutorConfig, *,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep):
        self.node = node
        self.migrator = migrator
        self.publisher = publisher
        self.config = config
        # One folder per node: several simulated nodes on one machine may share state_dir.
        self.journal = Journal(Path(config.state_dir) / node)
        self._clock = clock
        self._sleep = sleep
        self._slots = threading.BoundedSemaphore(config.max_outgoing)
        self._lock = threading.Lock()
        self._inflight: dict[str, threading.Event] = {}
        self._vm_locks: dict[str, threading.Lock] = {}
        self.migrations_started = 0  # counted for tests and logs: work done, not answers given

    # ------------------------------------------------------------ bus side

    def declare(self, channel: Any) -> str:
        spec = migrate_queue_spec(self.node)
        declare_queue(channel, spec)
        return spec.name

    def attach(self, consumer: Consumer) -> None:
        consumer.subscribe(self.declare, self.handle, allow_json=True, accept=frozenset({MigrateVm.KIND}))

    def handle(self, delivery: Delivery) -> None:
        cmd = delivery.message
        assert isinstance(cmd, MigrateVm)  # the subscription accepts nothing else
        log.info("MigrateVm %s: %s %s -> %s%s", cmd.command_id, cmd.vm, cmd.source, cmd.target,
                 " (redelivered)" if delivery.redelivered else "")
        self.execute(cmd)

    def _publish(self, res: CommandResult) -> None:
        self.publisher.publish(res)  # returns after the broker's confirm; raises if it cannot
        log.info("MigrateVm %s: %s%s", res.command_id, res.status, f" ({res.reason})" if res.reason else "")

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # ------------------------------------------------------------ one command

    def execute(self, cmd: MigrateVm) -> CommandResult:
        """Run (or answer again) one command; returns its final result once it is published."""
        while True:
            with self._lock:
                running = self._inflight.get(cmd.command_id)
                if running is None:
                    done = self._inflight[cmd.command_id] = threading.Event()
            if running is None:
                break
            log.info("MigrateVm %s is already being executed here; answering when it ends", cmd.command_id)
            running.wait()
        try:
            rec = self.journal.get(cmd.command_id)
            if rec is not None and rec["state"] == FINAL:
                res = Journal.result_of(rec)
                if Journal.command_of(rec) != cmd:
                    log.warning("MigrateVm %s: a different command reuses this id; answering the first one's result",
                                cmd.command_id)
                self._publish(res)
                return res
            if rec is not None and rec["state"] == STARTED:
                return self._resolve_unfinished(rec)
            return self._run(cmd)
        finally:
            with self._lock:
                self._inflight.pop(cmd.command_id, None)
            done.set()

    def _finish(self, cmd: MigrateVm, res: CommandResult) -> CommandResult:
        self.journal.final(cmd, res, now_ms=self._now_ms())
        self._publish(res)
        return res

    @contextmanager
    def _vm_lock(self, vm: str) -> Iterator[None]:
        # Two commands (different ids) for one VM run one after the other; the second re-checks where it is.
        with self._lock:
            lock = self._vm_locks.setdefault(vm, threading.Lock())
        with lock:
            yield

    def _target_has(self, vm: str, target: MigrationTarget) -> bool | None:
        try:
            return self.migrator.target_has_domain(vm, target)
        except HypervisorUnavailable as exc:
            log.info("cannot ask %s about %s: %s", target.node, vm, exc)
            return None

    def _run(self, cmd: MigrateVm) -> CommandResult:
        early = migration.misaddressed(cmd, self.node) or migration.unknown_target(
            cmd, self.node, frozenset(self.config.peers))
        if early is not None:
            return self._finish(cmd, early)
        target = self.config.peers[cmd.target]
        with self._vm_lock(cmd.vm), self._slots:
            try:
                here = self.migrator.has_domain(cmd.vm)
            except HypervisorUnavailable as exc:
                return self._finish(cmd, migration.result(cmd, self.node, "failed",
                                                          f"the hypervisor of {self.node} is unavailable: {exc}",
                                                          retryable=True))
            on_target = None if here else self._target_has(cmd.vm, target)
            verdict = migration.admit(cmd, self.node, here=here, on_target=on_target)
            if not isinstance(verdict, migration.Go):
                return self._finish(cmd, verdict)

            # accepted before the journal: a crash in between only repeats "accepted" on redelivery.
            self._publish(migration.result(cmd, self.node, "accepted", f"migrating {cmd.vm} to {cmd.target}"))
            self.journal.started(cmd, now_ms=self._now_ms())
            self.migrations_started += 1
            outcome = self.migrator.migrate(cmd.vm, target, timeout_s=cmd.timeout_s,
                                            bandwidth_mib_s=cmd.bandwidth_mib_s, auto_converge=cmd.auto_converge)
            ok = outcome.ok
            log.info("MigrateVm %s: libvirt %s after %.2fs%s", cmd.command_id, "finished" if ok else "failed",
                     outcome.duration_s, f": {outcome.error}" if outcome.error else "")
            if not ok and self._landed(cmd, target):
                # The job reported an error after the VM had already moved: the VM's place is the truth.
                log.warning("MigrateVm %s: libvirt reported %r but %s runs on %s only; counting it as done",
                            cmd.command_id, outcome.error, cmd.vm, cmd.target)
                ok = True
            res = migration.outcome_result(cmd, self.node, ok=ok, duration_s=outcome.duration_s,
                                           downtime_ms=outcome.downtime_ms, error=outcome.error,
                                           retryable=outcome.retryable)
            return self._finish(cmd, res)

    def _landed(self, cmd: MigrateVm, target: MigrationTarget) -> bool:
        try:
            return (not self.migrator.has_domain(cmd.vm)) and bool(self._target_has(cmd.vm, target))
        except HypervisorUnavailable:
            return False

    # ------------------------------------------------------------ crash recovery

    def recover(self) -> list[CommandResult]:
        """Resolve every migration a previous run started and never reported (call before consuming)."""
        pruned = self.journal.prune(self.config.journal_days * 86400)
        if pruned:
            log.info("journal: forgot %d command(s) older than %g days", pruned, self.config.journal_days)
        results = []
        for rec in self.journal.unfinished():
            cid = rec["command_id"]
            if rec.get("command", {}).get("source") != self.node:
                log.error("journal record of %s names source %s, not %s; leaving it alone", cid,
                          rec.get("command", {}).get("source"), self.node)
                continue
            with self._lock:
                if cid in self._inflight:
                    continue
                done = self._inflight[cid] = threading.Event()
            try:
                current = self.journal.get(cid)  # a redelivery may have resolved it meanwhile
                if current is not None and current["state"] == STARTED:
                    results.append(self._resolve_unfinished(current))
            finally:
                with self._lock:
                    self._inflight.pop(cid, None)
                done.set()
        return results

    def _resolve_unfinished(self, rec: dict[str, Any]) -> CommandResult:
        cmd = Journal.command_of(rec)
        started_ms = rec.get("started_ms") or self._now_ms()
        log.warning("MigrateVm %s (%s -> %s) was started by an earlier run and never reported; asking libvirt",
                    cmd.command_id, cmd.vm, cmd.target)
        target = self.config.peers.get(cmd.target)
        give_up = self._clock() + max(RECOVERY_GIVE_UP_S, cmd.timeout_s)
        aborted = False
        while True:
            elapsed = self._clock() - started_ms / 1000
            try:
                job = self.migrator.job_active(cmd.vm)
                here = self.migrator.has_domain(cmd.vm)
            except HypervisorUnavailable as exc:
                if self._clock() > give_up:
                    return self._finish(cmd, migration.result(
                        cmd, self.node, "failed", f"interrupted migration: the hypervisor of {self.node} stayed "
                        f"unavailable ({exc}); where {cmd.vm} runs is unknown", recovered=True))
                self._sleep(RECOVERY_POLL_S)
                continue
            on_target = self._target_has(cmd.vm, target) if target is not None and not job else None
            verdict = migration.recovered_result(cmd, self.node, job_active=job, here=here, on_target=on_target,
                                                 elapsed_s=elapsed)
            if isinstance(verdict, migration.Wait):
                if verdict.abort and not aborted:
                    log.warning("MigrateVm %s: the job outlived its %gs timeout; aborting it", cmd.command_id,
                                cmd.timeout_s)
                    self.migrator.abort(cmd.vm)
                    aborted = True
                self._sleep(RECOVERY_POLL_S)
                continue
            return self._finish(cmd, verdict)


# ---------------------------------------------------------------- wiring


def open_migrator(hypervisor_uri: str, node: str, config: ExecutorConfig, hypervisor: Any = None) -> Migrator:
    """The Migrator for this node: the simulated hypervisor is its own; libvirt gets LibvirtMigrator."""
    if hypervisor_uri.startswith("sim://"):
        if hypervisor is not None:
            return hypervisor  # SimulatedHypervisor implements both Hypervisor and Migrator
        from .simulated import SimulatedHypervisor

        return SimulatedHypervisor.from_uri(hypervisor_uri, node)
    from .libvirt_migrator import LibvirtMigrator

    return LibvirtMigrator(hypervisor_uri, peer2peer=config.peer2peer)


class ExecutorService:
    """The executor with its own consumer connection: start() recovers, then consumes."""

    def __init__(self, executor: MigrationExecutor, consumer: Consumer):
        self.executor = executor
        self.consumer = consumer
        executor.attach(consumer)
        self._recovery: threading.Thread | None = None

    @classmethod
    def build(cls, node: str, settings: Any, publisher: Publisher, migrator: Migrator,
              config: ExecutorConfig) -> "ExecutorService":
        executor = MigrationExecutor(node, migrator, publisher, config)
        # A few workers beyond max_outgoing so duplicates and rejections are answered while migrations run.
        consumer = Consumer(settings, publisher, workers=config.max_outgoing + 2,
                            prefetch=config.max_outgoing + 2, name=f"executor-{node}")
        return cls(executor, consumer)

    def start(self) -> "ExecutorService":
        # Recovery may wait for a still-running libvirt job: do it off the caller's thread; redeliveries of
        # the same commands wait for it (in-flight map) instead of migrating again.
        unfinished = self.executor.journal.unfinished()
        if unfinished:
            self._recovery = threading.Thread(target=self._recover, name="executor-recovery", daemon=True)
            self._recovery.start()
        else:
            self.executor.journal.prune(self.executor.config.journal_days * 86400)
        self.consumer.start()
        return self

    def _recover(self) -> None:
        try:
            self.executor.recover()
        except Exception:  # the redelivered command retries the recovery
            log.exception("recovery of unfinished migrations failed; it is retried when their commands are redelivered")

    def stop(self) -> None:
        self.consumer.stop()


def start_executor(node: str, hypervisor_uri: str, settings: Any, publisher: Publisher, raw_config: dict[str, Any],
                   *, source: str = "node.toml", hypervisor: Any = None) -> ExecutorService | None:
    """Parse [executor]/[peers], build and start the executor; None when [executor] enabled = false."""
    config = ExecutorConfig.parse(raw_config, source=source, node=node)
    if not config.enabled:
        log.info("executor disabled in %s", source)
        return None
    try:
        Path(config.state_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{source} [executor] state_dir {config.state_dir!r}: {exc}") from None
    migrator = open_migrator(hypervisor_uri, node, config, hypervisor)
    if hypervisor_uri.startswith("sim://") and not config.peers:
        # A simulated cluster knows its nodes: without [peers], every other node of it is a target.
        others = sorted(n for n in migrator.cluster.state()["nodes"] if n != node)  # type: ignore[attr-defined]
        config = replace(config, peers={n: MigrationTarget(n, hypervisor_uri) for n in others})
    service = ExecutorService.build(node, settings.with_(connection_name=f"executor-{node}"), publisher,
                                    migrator, config)
    log.info("executor for %s: max %d outgoing, peers %s, journal %s, %s", node, config.max_outgoing,
             ", ".join(sorted(config.peers)) or "none", config.state_dir,
             "peer-to-peer" if config.peer2peer else "client-driven")
    return service.start()


def main(argv: list[str] | None = None) -> int:
    """Run only the executor (no telemetry) from a node.toml."""
    from .config import load_agent_config

    parser = argparse.ArgumentParser(description="Run a node's migration executor alone.")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_agent_config(args.config)
        publisher = Publisher(cfg.broker, sender=f"agent.{cfg.node}")
        service = start_executor(cfg.node, cfg.hypervisor_uri, cfg.broker, publisher, cfg.raw, source=cfg.source)
    except ConfigError as exc:
        print(f"executor: {exc}", file=sys.stderr)
        return 2
    if service is None:
        print("executor: [executor] enabled = false; nothing to run", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    service.stop()
    publisher.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
