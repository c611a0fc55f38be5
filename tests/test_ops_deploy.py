"""deploy/config samples parse with the services' own loaders; systemd units run what they say; no secret inline."""

from __future__ import annotations

import ipaddress

import configparser
import re
import shlex
from pathlib import Path

import pytest

from enersis.agent.config import parse_agent_config
from enersis.agent.executor import ExecutorConfig
from enersis.arbiter.config import parse as parse_arbiter
from enersis.common.config import broker_settings, load_toml
from enersis.power.inventory import parse_config as parse_power

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
CONFIG = DEPLOY / "config"
SYSTEMD = DEPLOY / "systemd"


@pytest.fixture(autouse=True)
def no_env_override(monkeypatch, tmp_path):
    monkeypatch.delenv("ENERSIS_AMQP_URL", raising=False)
    monkeypatch.setenv("ENERSIS_AMQP_PASSWORD", "from-the-environment")


def with_password_file(data: dict, tmp_path: Path) -> dict:
    # The samples point at /etc/enersis/*.password; read the same table with a file that exists here.
    table = dict(data["broker"])
    if "password_file" in table:
        pw = tmp_path / "pw"
        pw.write_text("secret\n")
        table["password_file"] = str(pw)
    return {**data, "broker": table}


def test_node_sample(tmp_path):
    data = with_password_file(load_toml(CONFIG / "node.toml"), tmp_path)
    cfg = parse_agent_config(data, source="node.toml")
    assert cfg.node == "node-1" and cfg.hypervisor_uri == "qemu:///system"
    assert cfg.broker.tls and cfg.broker.user == "agent" and cfg.broker.password == "secret"
    ex = ExecutorConfig.parse(data, source="node.toml", node=cfg.node)
    assert set(ex.peers) == {"node-2", "node-3"}


def test_power_sample(tmp_path):
    data = with_password_file(load_toml(CONFIG / "power.toml"), tmp_path)
    cfg = parse_power(data, check_files=False)
    assert sorted(cfg.nodes) == ["node-1", "node-2", "node-3"]
    limited_broadcast = ipaddress.IPv4Address(2**32 - 1)  # the all-ones address: never a default target
    assert all(ipaddress.ip_address(n.wol_broadcast) != limited_broadcast for n in cfg.nodes.values())
    assert cfg.broker.user == "power" and cfg.broker.tls


def test_arbiter_sample_takes_its_password_from_the_environment():
    cfg = parse_arbiter(load_toml(CONFIG / "arbiter.toml"))
    assert cfg.broker.password == "from-the-environment" and cfg.broker.user == "arbiter"
    assert cfg.mode == "advisory" and {n.name for n in cfg.nodes} == {"node-1", "node-2", "node-3"}


def test_operator_sample(tmp_path):
    data = with_password_file(load_toml(CONFIG / "operator.toml"), tmp_path)
    s = broker_settings(data["broker"])
    assert s.user == "operator" and s.tls and s.port == 5671


def test_no_sample_holds_a_password():
    for path in CONFIG.glob("*.toml"):
        text = path.read_text()
        assert not re.search(r"^\s*password\s*=", text, re.M), path
        assert not re.search(r"amqps?://[^/\s\"]*:[^@/\s\"]*@", text), f"{path}: credentials in a URL"


@pytest.mark.parametrize("unit,subcommand,config", [
    ("enersis-agent.service", "agent", "/etc/enersis/node.toml"),
    ("enersis-power.service", "power", "/etc/enersis/power.toml"),
    ("enersis-arbiter.service", "arbiter", "/etc/enersis/arbiter.toml"),
])
def test_systemd_units(unit, subcommand, config):
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(SYSTEMD / unit)
    assert {"Unit", "Service", "Install"} <= set(parser.sections())
    argv = shlex.split(parser["Service"]["ExecStart"])
    assert argv[0].endswith("/enersis") and argv[1:] == [subcommand, "--config", config]
    assert parser["Service"]["Restart"] == "on-failure"
    assert parser["Install"]["WantedBy"] == "multi-user.target"
    # The sample config the unit points at exists under the same name.
    assert (CONFIG / Path(config).name).exists()
