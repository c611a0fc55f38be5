#!/usr/bin/env python3
"""Start and stop a private RabbitMQ broker for development, tests and the demo.

No systemd, root or not; all state in one folder.  Standard library only, so
it runs before the project's virtualenv exists.

    python3 deploy/rabbitmq/broker.py start     # waits until ready, prints URLs
    python3 deploy/rabbitmq/broker.py stop
    python3 deploy/rabbitmq/broker.py status
    python3 deploy/rabbitmq/broker.py kill9     # kill -9 the broker (tests)
    python3 deploy/rabbitmq/broker.py info      # the JSON written at start

Environment:
    ENERSIS_BROKER_DIR   state folder (default: <repo>/.broker)
    ENERSIS_BROKER_NAME  Erlang node name (default: enersis)
    ENERSIS_AMQP_PORT    AMQP port (default 5673; the Erlang dist port is this + 20000)
    ENERSIS_MGMT_PORT    management UI/API port (default 15673)

Users come from deploy/rabbitmq/definitions.json (one per role).  Their
passwords are generated once per state folder and kept in
<dir>/broker.json (mode 0600): never commit it, never reuse it in production.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def settings() -> dict:
    d = Path(os.environ.get("ENERSIS_BROKER_DIR", REPO / ".broker")).resolve()
    amqp = int(os.environ.get("ENERSIS_AMQP_PORT", "5673"))
    mgmt = int(os.environ.get("ENERSIS_MGMT_PORT", "15673"))
    name = os.environ.get("ENERSIS_BROKER_NAME", "enersis")
    return {"dir": d, "amqp_port": amqp, "mgmt_port": mgmt, "dist_port": amqp + 20000, "node": f"{name}@localhost"}


def sbin() -> Path:
    found = sorted(glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin"))
    if not found:
        sys.exit("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
    return Path(found[-1])


def rabbit_hash(password: str) -> str:
    # rabbit_password_hashing_sha256: base64(salt + sha256(salt + password)), 4-byte salt.
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def env_for(s: dict) -> dict:
    d: Path = s["dir"]
    env = dict(os.environ)
    env.update(
        HOME=str(d),  # server and CLI share the Erlang cookie in $HOME
        RABBITMQ_NODENAME=s["node"],
        RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
        RABBITMQ_NODE_PORT=str(s["amqp_port"]),
        RABBITMQ_DIST_PORT=str(s["dist_port"]),
        RABBITMQ_MNESIA_BASE=str(d / "mnesia"),
        RABBITMQ_LOG_BASE=str(d / "log"),
        RABBITMQ_CONFIG_FILE=str(d / "rabbitmq.conf"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"),
        RABBITMQ_CONF_ENV_FILE=str(d / "rabbitmq-env.conf"),
        # A CLI call against a stopped node writes a crash dump; keep it in the state folder.
        ERL_CRASH_DUMP=str(d / "erl_crash.dump"),
    )
    return env


def ctl(s: dict, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(sbin() / "rabbitmqctl"), "-n", s["node"], *args],
        env=env_for(s), capture_output=True, text=True, timeout=timeout, cwd=s["dir"] if s["dir"].exists() else None,
    )


def running(s: dict) -> bool:
    try:
        return ctl(s, "status", timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def prepare(s: dict) -> dict:
    d: Path = s["dir"]
    for sub in ("mnesia", "log"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    info_path = d / "broker.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    defs = json.loads((HERE / "definitions.json").read_text())
    passwords = info.get("passwords", {})
    for user in defs["users"]:
        passwords.setdefault(user["name"], secrets.token_urlsafe(18))
        user["password_hash"] = rabbit_hash(passwords[user["name"]])
    (d / "definitions.json").write_text(json.dumps(defs, indent=2))
    base_conf = (HERE / "rabbitmq.conf").read_text()
    conf = [line for line in base_conf.splitlines() if not line.startswith(("load_definitions", "listeners.", "management.tcp", "log.file"))]
    conf += [
        f"load_definitions = {d / 'definitions.json'}",
        f"listeners.tcp.1 = 127.0.0.1:{s['amqp_port']}",
        f"management.tcp.port = {s['mgmt_port']}",
        "management.tcp.ip = 127.0.0.1",
        "log.file.level = warning",
    ]
    (d / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
    shutil.copy(HERE / "enabled_plugins", d / "enabled_plugins")
    (d / "rabbitmq-env.conf").write_text("")
    info.update(
        passwords=passwords,
        node=s["node"],
        amqp_port=s["amqp_port"],
        mgmt_port=s["mgmt_port"],
        amqp_url=f"amqp://admin:{passwords['admin']}@127.0.0.1:{s['amqp_port']}/enersis",
        mgmt_url=f"http://127.0.0.1:{s['mgmt_port']}/",
        dir=str(d),
    )
    write_info(d, info)
    return info


def write_info(d: Path, info: dict) -> None:
    path = d / "broker.json"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(info, fh, indent=2)
    os.replace(tmp, path)


def start(s: dict) -> int:
    if running(s):
        info = json.loads((s["dir"] / "broker.json").read_text())
        print_urls(info, "already running")
        return 0
    info = prepare(s)
    t0 = time.monotonic()
    subprocess.run([str(sbin() / "rabbitmq-server"), "-detached"], env=env_for(s), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = t0 + 120
    while time.monotonic() < deadline:
        try:
            r = ctl(s, "await_startup", "--timeout", "60", timeout=70)
        except subprocess.TimeoutExpired:
            continue
        if r.returncode == 0:
            break
        time.sleep(0.5)
    else:
        print(f"broker did not start within 120 s; logs in {s['dir'] / 'log'}", file=sys.stderr)
        return 1
    pid = ctl(s, "eval", "list_to_integer(os:getpid()).").stdout.strip()
    info["pid"] = int(pid) if pid.isdigit() else None
    write_info(s["dir"], info)
    print_urls(info, f"ready in {time.monotonic() - t0:.1f}s")
    return 0


def print_urls(info: dict, state: str) -> None:
    print(f"RabbitMQ {info['node']} {state}")
    print(f"  AMQP:        amqp://127.0.0.1:{info['amqp_port']}/enersis")
    print(f"  management:  {info['mgmt_url']}  (users and passwords in {info['dir']}/broker.json)")


def stop(s: dict) -> int:
    if running(s):
        r = ctl(s, "shutdown", timeout=60)
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
    kill_leftovers(s)
    return 0


def kill_leftovers(s: dict) -> None:
    info_path = s["dir"] / "broker.json"
    if info_path.exists():
        pid = json.loads(info_path.read_text()).get("pid")
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    # epmd outlives the last node; stop it only when no other node uses it.
    epmd = shutil.which("epmd") or next(iter(glob.glob("/usr/lib/erlang/erts-*/bin/epmd")), None)
    if epmd:
        names = subprocess.run([epmd, "-names"], capture_output=True, text=True).stdout
        if "name " not in names:
            subprocess.run([epmd, "-kill"], capture_output=True)


def kill9(s: dict) -> int:
    info = json.loads((s["dir"] / "broker.json").read_text())
    pid = info.get("pid")
    if not pid:
        print("no broker pid recorded", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return 0
        time.sleep(0.05)
    return 1


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("start", "stop", "status", "kill9", "info", "restart"):
        print(__doc__)
        return 2
    s = settings()
    cmd = argv[0]
    if cmd == "start":
        return start(s)
    if cmd == "stop":
        return stop(s)
    if cmd == "restart":
        stop(s)
        return start(s)
    if cmd == "kill9":
        return kill9(s)
    if cmd == "info":
        print((s["dir"] / "broker.json").read_text())
        return 0
    ok = running(s)
    print("running" if ok else "stopped")
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
