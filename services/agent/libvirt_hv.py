"""The real hypervisor adapter: libvirt-python, any URI (qemu:///system, xen:///system,
qemu+unix:///system?socket=…, test:///…).  Read-only: telemetry never changes a domain.

A lost connection never crashes the agent: read_domains()/facts() raise
HypervisorUnavailable at once (the sampler reports it in telemetry) while a
background thread reconnects with exponential backoff (tenacity).  Connecting
off the sampler's thread also keeps a slow remote URI from stalling sampling.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import libvirt
import tenacity

from .hypervisor import DomainReading, HypervisorUnavailable, NodeFacts

log = logging.getLogger("enersis.agent.libvirt")

# libvirt prints every error to stderr besides raising it; we raise and log ourselves.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

# Error codes that mean "the connection is gone", not "this one domain has a problem".
_CONNECTION_ERRORS = frozenset({
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_AUTH_FAILED,
    getattr(libvirt, "VIR_ERR_AUTH_UNAVAILABLE", -1),
})

_STATS = (libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
          | libvirt.VIR_DOMAIN_STATS_BALLOON | libvirt.VIR_DOMAIN_STATS_VCPU)


class LibvirtHypervisor:
    """`Hypervisor` over a read-only libvirt connection that heals itself."""

    def __init__(
        self,
        uri: str,
        *,
        open_connection: Callable[[str], Any] = libvirt.openReadOnly,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ):
        self.uri = uri
        self._open = open_connection
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._lock = threading.Lock()
        self._conn: Any = None
        self._error = "not connected yet"
        self._closed = threading.Event()
        self._reconnecting: threading.Thread | None = None
        self._bulk_stats = True  # drivers without getAllDomainStats (or without cpu.time in it) fall back to info()
        self.connects = 0  # successful connections, for logs and tests
        try:
            self._connect_once()
        except libvirt.libvirtError as exc:
            log.warning("hypervisor %s unreachable at start: %s; retrying in the background", uri, _msg(exc))
            self._lost(_msg(exc))

    # -- connection management

    def _connect_once(self) -> None:
        conn = self._open(self.uri)
        if conn is None:  # very old bindings return None instead of raising
            raise libvirt.libvirtError(f"could not open {self.uri}")
        with self._lock:
            self._conn = conn
            self._error = ""
            self.connects += 1
        log.info("connected to hypervisor %s (%s)", self.uri, conn.getType())

    def _lost(self, why: str) -> None:
        """Drop the connection and start the reconnect thread (once)."""
        with self._lock:
            conn, self._conn = self._conn, None
            self._error = why
            if self._closed.is_set() or (self._reconnecting is not None and self._reconnecting.is_alive()):
                start = False
            else:
                self._reconnecting = threading.Thread(target=self._reconnect, name="libvirt-reconnect", daemon=True)
                start = True
        if conn is not None:
            log.warning("lost the hypervisor connection %s: %s; reconnecting", self.uri, why)
            try:
                conn.close()
            except libvirt.libvirtError:
                pass
        if start:
            assert self._reconnecting is not None
            self._reconnecting.start()

    def _reconnect(self) -> None:
        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            why = _msg(exc) if isinstance(exc, libvirt.libvirtError) else str(exc)
            with self._lock:
                self._error = why
            log.info("hypervisor %s still unreachable (%s); retry %d in %.1fs", self.uri, why,
                     state.attempt_number, state.next_action.sleep if state.next_action else 0)

        initial, maximum = self._backoff
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(libvirt.libvirtError),
            wait=tenacity.wait_exponential(multiplier=initial, max=maximum) + tenacity.wait_random(0, initial / 2),
            stop=lambda _state: self._closed.is_set(),
            sleep=self._closed.wait,  # close() interrupts the backoff
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            retrying(self._connect_once)
        except libvirt.libvirtError:
            pass  # closed while still unreachable

    def _connection(self) -> Any:
        with self._lock:
            if self._conn is None:
                raise HypervisorUnavailable(f"hypervisor {self.uri} unreachable: {self._error}")
            return self._conn

    def _fail(self, conn: Any, exc: libvirt.libvirtError) -> HypervisorUnavailable:
        """Classify an error; if the connection is gone, start reconnecting."""
        if exc.get_error_code() in _CONNECTION_ERRORS or not _alive(conn):
            self._lost(_msg(exc))
        return HypervisorUnavailable(f"hypervisor {self.uri} unreachable: {_msg(exc)}")

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._conn is not None

    # -- Hypervisor

    def facts(self) -> NodeFacts:
        conn = self._connection()
        try:
            model, mem_mib, cpus, mhz, *_ = conn.getInfo()
            free = conn.getFreeMemory()
            hv_type = conn.getType()
        except libvirt.libvirtError as exc:
            raise self._fail(conn, exc) from None
        return NodeFacts(_type_name(hv_type), int(cpus), int(mhz), int(mem_mib) * 1024, int(free) // 1024)

    def read_domains(self) -> list[DomainReading]:
        conn = self._connection()
        try:
            if self._bulk_stats:
                readings = self._read_bulk(conn)
                if readings is not None:
                    return readings
            return self._read_each(conn)
        except libvirt.libvirtError as exc:
            raise self._fail(conn, exc) from None

    def _read_bulk(self, conn: Any) -> list[DomainReading] | None:
        """One RPC for every active domain (QEMU); None when the driver cannot."""
        try:
            stats = conn.getAllDomainStats(_STATS, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED):
                self._bulk_stats = False
                return None
            raise
        out = []
        for dom, s in stats:
            if "cpu.time" not in s or "balloon.maximum" not in s:
                # e.g. the test:/// driver returns state only: use dom.info() from now on.
                self._bulk_stats = False
                return None
            vcpus = s.get("vcpu.current") or s.get("vcpu.maximum") or 1
            out.append(DomainReading(dom.name(), dom.UUIDString(), int(s.get("state.state", 0)), int(vcpus),
                                     int(s["balloon.maximum"]), int(s.get("balloon.current", s["balloon.maximum"])),
                                     int(s["cpu.time"]), _is_host(dom)))
        return out

    def _read_each(self, conn: Any) -> list[DomainReading]:
        out = []
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                state, mem_max, mem, vcpus, cpu_time = dom.info()
                out.append(DomainReading(dom.name(), dom.UUIDString(), int(state), int(vcpus),
                                         int(mem_max), int(mem), int(cpu_time), _is_host(dom)))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() in _CONNECTION_ERRORS:
                    raise
                # Vanished (destroyed, migrated away) between the listing and its info: not an error.
                log.debug("domain %s gone between list and info: %s", _safe_name(dom), _msg(exc))
        return out

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            conn, self._conn = self._conn, None
            self._error = "closed"
        if conn is not None:
            try:
                conn.close()
            except libvirt.libvirtError:
                pass
        if self._reconnecting is not None:
            self._reconnecting.join(5)


def _msg(exc: BaseException) -> str:
    if isinstance(exc, libvirt.libvirtError):
        return exc.get_error_message() or str(exc)
    return str(exc)


def _is_host(dom: Any) -> bool:
    # Xen's Domain-0 (the host OS) has id 0; QEMU and test domains start at 1.
    try:
        return dom.ID() == 0
    except libvirt.libvirtError:
        return False


def _alive(conn: Any) -> bool:
    try:
        return conn.isAlive() == 1
    except libvirt.libvirtError:
        return False


def _safe_name(dom: Any) -> str:
    try:
        return dom.name()
    except libvirt.libvirtError:
        return "?"


def _type_name(hv_type: str) -> str:
    # libvirt says "QEMU", "Xen", "TEST": keep them, but spell the test driver like the others.
    return "Test" if hv_type.upper() == "TEST" else hv_type
