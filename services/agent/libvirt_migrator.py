"""The `Migrator` over libvirt-python: live migration between two libvirt daemons.

Peer-to-peer by default (VIR_MIGRATE_PEER2PEER): the source daemon drives
the migration itself, so a migration outlives an executor that is killed in
the middle of it, and the restarted executor finds the job (or its outcome)
in libvirt.  The source daemon then opens the target URI itself, so
`[peers.X] uri` must be reachable from the source daemon (qemu+ssh://,
qemu+tls://, or a unix socket it can see).  With peer2peer = false the
executor's own connections drive it (migrate3), and libvirt cancels the
job if the executor dies.

Flags: LIVE | PERSIST_DEST | UNDEFINE_SOURCE, plus AUTO_CONVERGE on request;
VIR_MIGRATE_PARAM_URI / LISTEN_ADDRESS / BANDWIDTH from the target's config
and the command.  A timer aborts the job at the command's timeout: QEMU stops
sending and the VM keeps running on the source.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import libvirt

from .hypervisor import HypervisorUnavailable, MigrationOutcome, MigrationTarget

log = logging.getLogger("enersis.agent.libvirt_migrator")

# libvirt prints every error to stderr unless a handler is installed; we report them ourselves.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

ACTIVE_JOBS = frozenset({libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED})

# Errors a retry will not fix: the request itself is wrong for this domain or these daemons.
PERMANENT_ERRORS = frozenset({
    libvirt.VIR_ERR_NO_DOMAIN,
    libvirt.VIR_ERR_OPERATION_INVALID,
    libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
    libvirt.VIR_ERR_NO_SUPPORT,
    libvirt.VIR_ERR_INVALID_ARG,
    libvirt.VIR_ERR_XML_ERROR,
    libvirt.VIR_ERR_CPU_INCOMPATIBLE,
    libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
})


def _err_text(exc: libvirt.libvirtError) -> str:
    return (exc.get_error_message() or str(exc)).strip()


class LibvirtMigrator:
    """Migrator for the node whose daemon answers at `uri`."""

    def __init__(self, uri: str, *, peer2peer: bool = True,
                 open_connection: Callable[[str], Any] = libvirt.open):
        self.uri = uri
        self.peer2peer = peer2peer
        self._open = open_connection
        self._lock = threading.Lock()
        self._conn: Any = None

    # -- connections

    def _source(self) -> Any:
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                self._close_quietly(self._conn)
                self._conn = None
            try:
                self._conn = self._open(self.uri)
            except libvirt.libvirtError as exc:
                raise HypervisorUnavailable(f"libvirt at {self.uri} does not answer: {_err_text(exc)}") from None
            return self._conn

    def _target(self, target: MigrationTarget) -> Any:
        try:
            return self._open(target.uri)
        except libvirt.libvirtError as exc:
            raise HypervisorUnavailable(f"libvirt of {target.node} at {target.uri} does not answer: "
                                        f"{_err_text(exc)}") from None

    @staticmethod
    def _close_quietly(conn: Any) -> None:
        try:
            conn.close()
        except libvirt.libvirtError:
            pass

    def _lookup(self, conn: Any, vm: str) -> Any:
        try:
            return conn.lookupByName(vm)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def _active(self, conn: Any, vm: str, where: str) -> bool:
        try:
            dom = self._lookup(conn, vm)
            return bool(dom is not None and dom.isActive())
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False  # undefined between lookup and isActive (a migration just finished)
            raise HypervisorUnavailable(f"libvirt of {where}: {_err_text(exc)}") from None

    # -- Migrator

    def has_domain(self, vm: str) -> bool:
        return self._active(self._source(), vm, self.uri)

    def target_has_domain(self, vm: str, target: MigrationTarget) -> bool:
        conn = self._target(target)
        try:
            return self._active(conn, vm, target.node)
        finally:
            self._close_quietly(conn)

    def job_active(self, vm: str) -> bool:
        try:
            dom = self._lookup(self._source(), vm)
            return bool(dom is not None and dom.jobInfo()[0] in ACTIVE_JOBS)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise HypervisorUnavailable(f"libvirt at {self.uri}: {_err_text(exc)}") from None

    def abort(self, vm: str) -> None:
        try:
            dom = self._lookup(self._source(), vm)
            if dom is not None:
                dom.abortJob()
        except libvirt.libvirtError as exc:
            # "no job is active" is fine: it ended on its own meanwhile.
            log.info("abort of %s's migration job: %s", vm, _err_text(exc))

    def migrate(
        self,
        vm: str,
        target: MigrationTarget,
        *,
        timeout_s: float,
        bandwidth_mib_s: int = 0,
        auto_converge: bool = False,
    ) -> MigrationOutcome:
        t0 = time.monotonic()
        try:
            src = self._source()
            dom = self._lookup(src, vm)
        except HypervisorUnavailable as exc:
            return MigrationOutcome(False, 0.0, error=str(exc), retryable=True)
        except libvirt.libvirtError as exc:
            return MigrationOutcome(False, 0.0, error=_err_text(exc), retryable=True)
        if dom is None:
            return MigrationOutcome(False, 0.0, error=f"domain {vm} is not defined on this node")

        params: dict[str, Any] = {}
        if target.migration_uri:
            params[libvirt.VIR_MIGRATE_PARAM_URI] = target.migration_uri
        if target.listen_address:
            params[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] = target.listen_address
        if bandwidth_mib_s > 0:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = int(bandwidth_mib_s)
        flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
        if auto_converge:
            flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE

        timed_out = threading.Event()

        def on_timeout() -> None:
            timed_out.set()
            log.warning("migration of %s to %s passed its %gs timeout; aborting the job", vm, target.node, timeout_s)
            try:
                dom.abortJob()
            except libvirt.libvirtError as exc:
                log.info("abortJob(%s): %s", vm, _err_text(exc))

        timer = threading.Timer(timeout_s, on_timeout)
        timer.daemon = True
        dst = None
        try:
            if self.peer2peer:
                timer.start()
                dom.migrateToURI3(target.uri, params, flags | libvirt.VIR_MIGRATE_PEER2PEER)
            else:
                dst = self._target(target)
                timer.start()
                dom.migrate3(dst, params, flags)
        except HypervisorUnavailable as exc:
            return MigrationOutcome(False, time.monotonic() - t0, error=str(exc), retryable=True)
        except libvirt.libvirtError as exc:
            elapsed = time.monotonic() - t0
            text = _err_text(exc)
            if timed_out.is_set():
                return MigrationOutcome(False, elapsed, retryable=True,
                                        error=f"timed out after {timeout_s:g}s; job aborted, {vm} stays on the source "
                                              f"(libvirt: {text})")
            return MigrationOutcome(False, elapsed, error=f"libvirt: {text}",
                                    retryable=exc.get_error_code() not in PERMANENT_ERRORS)
        finally:
            timer.cancel()
            if dst is not None:
                self._close_quietly(dst)
        elapsed = time.monotonic() - t0
        return MigrationOutcome(True, elapsed, downtime_ms=self._downtime_ms(vm, target))

    def _downtime_ms(self, vm: str, target: MigrationTarget) -> float | None:
        # The completed job's statistics live on the destination's domain.
        try:
            conn = self._target(target)
        except HypervisorUnavailable:
            return None
        try:
            dom = self._lookup(conn, vm)
            stats = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED) if dom is not None else {}
            value = stats.get("downtime")
            return float(value) if value is not None else None
        except libvirt.libvirtError:
            return None
        finally:
            self._close_quietly(conn)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._close_quietly(self._conn)
                self._conn = None
