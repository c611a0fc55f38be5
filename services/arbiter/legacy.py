"""Read the 2012 seed's enersis-frontend.conf and write the equivalent arbiter.toml.

The seed's format is line-oriented with a strict order::

    [PARAMETROS]
    umbral_superior=80          upper CPU %, 1-99
    umbral_inferior=10          lower CPU %, 1-99, below the upper one
    tiempo_ciclo=10             seconds per arbitration cycle
    [NODOS]
    192.168.1.2 D4:85:64:38:BE:CC 10     IP, MAC (upper-case hex), seconds of CPU history
    [MV]
    mv1                         VM names, letters and digits
    [END]

Every problem is reported with its line number and what was expected there.
Nodes are named by their IP address (a valid Enersis node name), so the
power service's inventory and the agents' `node =` must use the same names.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_PARAM_RE = {
    "umbral_superior": re.compile(r"^umbral_superior=(\d+)$"),
    "umbral_inferior": re.compile(r"^umbral_inferior=(\d+)$"),
    "tiempo_ciclo": re.compile(r"^tiempo_ciclo=(\d+)$"),
}
_MAC_RE = re.compile(r"^[0-9A-F]{2}(:[0-9A-F]{2}){5}$")
_VM_RE = re.compile(r"^[A-Za-z0-9]+$")


class LegacyFormatError(ValueError):
    def __init__(self, source: str, line: int, expected: str, got: str | None):
        shown = "end of file" if got is None else repr(got)
        super().__init__(f"{source}:{line}: expected {expected}, got {shown}")
        self.line = line
        self.expected = expected


@dataclass(frozen=True)
class LegacyNode:
    ip: str
    mac: str
    cpu_window_s: int


@dataclass(frozen=True)
class LegacyConfig:
    upper_pct: int
    lower_pct: int
    cycle_s: int
    nodes: tuple[LegacyNode, ...]
    vms: tuple[str, ...]


def parse(text: str, source: str = "enersis-frontend.conf") -> LegacyConfig:
    # The seed read the file with readline(): keep its order, tolerate only
    # trailing whitespace and a final newline (and a UTF-8 BOM some editors add).
    lines = text.lstrip("\ufeff").splitlines()
    pos = 0

    def next_line() -> tuple[int, str | None]:
        nonlocal pos
        if pos >= len(lines):
            return pos + 1, None
        pos += 1
        return pos, lines[pos - 1].strip()

    def expect_exact(token: str) -> None:
        n, line = next_line()
        if line != token:
            raise LegacyFormatError(source, n, f"the line {token!r}", line)

    expect_exact("[PARAMETROS]")
    values: dict[str, int] = {}
    for key, rx in _PARAM_RE.items():
        n, line = next_line()
        m = rx.match(line or "")
        if not m:
            raise LegacyFormatError(source, n, f"'{key}=<integer>'", line)
        values[key] = int(m.group(1))
        if key.startswith("umbral") and not 1 <= values[key] <= 99:
            raise LegacyFormatError(source, n, f"{key} between 1 and 99", line)
        if key == "umbral_inferior" and values[key] >= values["umbral_superior"]:
            raise LegacyFormatError(source, n, f"umbral_inferior below umbral_superior ({values['umbral_superior']})", line)
        if key == "tiempo_ciclo" and values[key] < 1:
            raise LegacyFormatError(source, n, "tiempo_ciclo of at least 1 second", line)
    expect_exact("[NODOS]")

    nodes: list[LegacyNode] = []
    seen_ip: set[str] = set()
    seen_mac: set[str] = set()
    while True:
        n, line = next_line()
        if line == "[MV]":
            break
        expected = "a node line 'IP MAC seconds' (e.g. '192.168.1.2 D4:85:64:38:BE:CC 10') or '[MV]'"
        if line is None or not line:
            raise LegacyFormatError(source, n, expected, line)
        parts = line.split()
        if len(parts) != 3:
            raise LegacyFormatError(source, n, expected + f" — found {len(parts)} field(s)", line)
        ip, mac, secs = parts
        try:
            ipaddress.IPv4Address(ip)
        except ValueError:
            raise LegacyFormatError(source, n, f"an IPv4 address as the first field, not {ip!r}", line) from None
        if not _MAC_RE.match(mac):
            raise LegacyFormatError(source, n, f"a MAC in upper-case hex like D4:85:64:38:BE:CC as the second field, not {mac!r}", line)
        if not secs.isdigit() or int(secs) < 1:
            raise LegacyFormatError(source, n, f"a whole number of seconds (>= 1) as the third field, not {secs!r}", line)
        if ip in seen_ip:
            raise LegacyFormatError(source, n, f"each node once; {ip} is listed twice", line)
        if mac in seen_mac:
            raise LegacyFormatError(source, n, f"each MAC once; {mac} is listed twice", line)
        seen_ip.add(ip)
        seen_mac.add(mac)
        nodes.append(LegacyNode(ip, mac, int(secs)))
    if not nodes:
        raise LegacyFormatError(source, n, "at least one node line before '[MV]'", line)

    vms: list[str] = []
    while True:
        n, line = next_line()
        if line == "[END]":
            break
        if line is None or not _VM_RE.match(line):
            raise LegacyFormatError(source, n, "a VM name (letters and digits only) or '[END]'", line)
        if line in vms:
            raise LegacyFormatError(source, n, f"each VM once; {line} is listed twice", line)
        vms.append(line)
    while True:
        n, line = next_line()
        if line is None:
            break
        if line:
            raise LegacyFormatError(source, n, "nothing after '[END]'", line)
    return LegacyConfig(values["umbral_superior"], values["umbral_inferior"], values["tiempo_ciclo"],
                        tuple(nodes), tuple(vms))


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(cfg: LegacyConfig, source: str = "enersis-frontend.conf") -> str:
    out = [
        f"# arbiter.toml imported from {source} (the 2012 Enersis frontend configuration).",
        "# Nodes are named by their IP address: use the same names as `node =` in each",
        "# agent's node.toml and as [nodes.<name>] in the power service's power.toml",
        "# (which is where each node's MAC for Wake-on-LAN belongs).",
        "",
        "[broker]",
        'url = "amqp://127.0.0.1:5672/enersis"',
        'user = "arbiter"',
        'password_file = "/etc/enersis/arbiter.password"',
        "",
        "[arbiter]",
        'policy = "enersis-2012"',
        f"upper_pct = {cfg.upper_pct}",
        f"lower_pct = {cfg.lower_pct}",
        f"cycle_s = {cfg.cycle_s}",
        'state_file = "/var/lib/enersis/arbiter/state.json"',
        "# The seed only ever moved the VMs it listed; any other VM stays where it is.",
        "managed_vms = [" + ", ".join(_q(v) for v in cfg.vms) + "]",
        "",
    ]
    for node in cfg.nodes:
        out += [
            f"[nodes.{_q(node.ip)}]",
            f"address = {_q(node.ip)}",
            f"mac = {_q(node.mac)}",
            f"cpu_window_s = {node.cpu_window_s}  # the agent's [telemetry] window_s",
            "",
        ]
    return "\n".join(out)


def convert_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8/ASCII text ({exc})") from None
    return to_toml(parse(text, path), path)
