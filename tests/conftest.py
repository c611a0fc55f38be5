"""Shared fixtures: a real private RabbitMQ broker, one vhost per test, condition waits.

The broker is the project's own script (deploy/rabbitmq/broker.py).  `make
test` starts it before pytest; when pytest runs alone and finds none, the
session starts one and stops it at the end.  ENERSIS_BROKER_DIR,
ENERSIS_AMQP_PORT and ENERSIS_MGMT_PORT select a broker (several developers
or helpers can run side by side on distinct ports).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

from enersis.common import topology
from enersis.common.config import BrokerSettings

REPO = Path(__file__).resolve().parent.parent
BROKER_SCRIPT = REPO / "deploy" / "rabbitmq" / "broker.py"


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll `condition` until it returns a truthy value; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Broker:
    """The running private broker: its ports, users and a management API client."""

    def __init__(self, info: dict[str, Any]):
        self.info = info
        self.amqp_port: int = info["amqp_port"]
        self.mgmt_port: int = info["mgmt_port"]
        self.passwords: dict[str, str] = info["passwords"]

    def settings(self, user: str = "admin", vhost: str = topology.VHOST, **kw: Any) -> BrokerSettings:
        return BrokerSettings(host="127.0.0.1", port=self.amqp_port, vhost=vhost, user=user,
                              password=self.passwords[user], heartbeat_s=kw.pop("heartbeat_s", 10), **kw)

    def api(self, method: str, path: str, body: Any = None, user: str = "admin") -> Any:
        url = f"http://127.0.0.1:{self.mgmt_port}/api/{path}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        token = base64.b64encode(f"{user}:{self.passwords[user]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(BROKER_SCRIPT), *args], capture_output=True, text=True, timeout=180)

    def new_vhost(self) -> str:
        name = f"test-{uuid.uuid4().hex[:10]}"
        self.api("PUT", f"vhosts/{name}", {})
        for user in topology.ROLES:
            r = topology.ROLES[user]
            self.api("PUT", f"permissions/{name}/{user}",
                     {"configure": r["configure"], "write": r["write"], "read": r["read"]})
        return name

    def delete_vhost(self, name: str) -> None:
        try:
            self.api("DELETE", f"vhosts/{urllib.parse.quote(name, safe='')}")
        except urllib.error.URLError:
            pass

    def queue_depth(self, vhost: str, queue: str) -> int:
        q = self.api("GET", f"queues/{urllib.parse.quote(vhost, safe='')}/{urllib.parse.quote(queue, safe='')}")
        return int(q.get("messages", 0) or 0)


def _broker_dir() -> Path:
    return Path(os.environ.get("ENERSIS_BROKER_DIR", REPO / ".broker")).resolve()


@pytest.fixture(scope="session")
def broker() -> Broker:
    env = dict(os.environ, ENERSIS_BROKER_DIR=str(_broker_dir()))
    status = subprocess.run([sys.executable, str(BROKER_SCRIPT), "status"], env=env, capture_output=True, text=True)
    started_here = status.returncode != 0
    if started_here:
        r = subprocess.run([sys.executable, str(BROKER_SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            pytest.fail(f"could not start the private broker: {r.stdout}{r.stderr}")
    info = json.loads((_broker_dir() / "broker.json").read_text())
    yield Broker(info)
    if started_here:
        subprocess.run([sys.executable, str(BROKER_SCRIPT), "stop"], env=env, capture_output=True, timeout=180)


@pytest.fixture
def vhost(broker: Broker) -> str:
    """A fresh vhost with the whole topology declared and the role permissions granted."""
    import pika

    name = broker.new_vhost()
    conn = pika.BlockingConnection(broker.settings("admin", name).pika_parameters())
    try:
        topology.declare(conn.channel())
    finally:
        conn.close()
    yield name
    broker.delete_vhost(name)


def _load_lab_module() -> Any:
    import importlib.util

    path = REPO / "deploy" / "lab" / "libvirt_lab.py"
    spec = importlib.util.spec_from_file_location("enersis_libvirt_lab", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def libvirt_lab() -> Any:
    """Two real libvirt daemons (deploy/lab/libvirt_lab.py), up once per session.

    A lab that was already up is used and left up; one started here is torn
    down at the end (guests destroyed, daemons stopped, nothing mounted).
    """
    lab_module = _load_lab_module()
    missing = lab_module.Lab.prerequisites()
    if missing:
        pytest.skip("the libvirt lab needs " + "; ".join(missing))
    lab = lab_module.Lab()
    started_here = not (len(lab.nodes()) >= 2 and all(lab.node_up(n) for n in lab.nodes()[:2]))
    if started_here:
        lab.up(2)
    yield lab
    if started_here:
        lab.down()
