"""`enersis arbiter --import-legacy`: the seed's enersis-frontend.conf -> arbiter.toml, and broken files."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from enersis.arbiter import config as arbiter_config
from enersis.arbiter.legacy import LegacyFormatError, parse, to_toml
from enersis.arbiter.policy import Params
from enersis.cli import main as cli_main

# The sample file from the thesis (SEED.md), byte for byte.
SEED_SAMPLE = """[PARAMETROS]
umbral_superior=80
umbral_inferior=10
tiempo_ciclo=10
[NODOS]
192.168.1.2 D4:85:64:38:BE:CC 10
192.168.1.3 D4:85:64:38:BC:00 10
[MV]
mv1
mv2
mv3
mv4
[END]
"""


def test_seed_sample_converts_to_an_equivalent_valid_config():
    legacy = parse(SEED_SAMPLE)
    assert (legacy.upper_pct, legacy.lower_pct, legacy.cycle_s) == (80, 10, 10)
    assert [(n.ip, n.mac, n.cpu_window_s) for n in legacy.nodes] == [
        ("192.168.1.2", "D4:85:64:38:BE:CC", 10), ("192.168.1.3", "D4:85:64:38:BC:00", 10)]
    assert legacy.vms == ("mv1", "mv2", "mv3", "mv4")
    data = tomllib.loads(to_toml(legacy))
    cfg = arbiter_config.parse(data, with_broker=False)
    assert cfg.params.policy == "enersis-2012"
    assert (cfg.params.upper_pct, cfg.params.lower_pct, cfg.params.cycle_s) == (80, 10, 10)
    assert cfg.managed_vms == ("mv1", "mv2", "mv3", "mv4")
    assert [(n.name, n.address, n.mac, n.cpu_window_s) for n in cfg.nodes] == [
        ("192.168.1.2", "192.168.1.2", "D4:85:64:38:BE:CC", 10), ("192.168.1.3", "192.168.1.3", "D4:85:64:38:BC:00", 10)]


def test_cli_writes_the_file_and_refuses_to_overwrite(tmp_path, capsys):
    src = tmp_path / "enersis-frontend.conf"
    src.write_text(SEED_SAMPLE)
    out = tmp_path / "arbiter.toml"
    assert cli_main(["arbiter", "--import-legacy", str(src), "--output", str(out)]) == 0
    assert tomllib.loads(out.read_text())["arbiter"]["upper_pct"] == 80
    assert cli_main(["arbiter", "--import-legacy", str(src), "--output", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def _broken(text: str) -> str:
    with pytest.raises(LegacyFormatError) as info:
        parse(text, "f.conf")
    return str(info.value)


@pytest.mark.parametrize("mutate, line, expected", [
    (lambda s: s.replace("[PARAMETROS]", "[PARAMS]"), 1, "'[PARAMETROS]'"),
    (lambda s: s.replace("umbral_superior=80\numbral_inferior=10", "umbral_inferior=10\numbral_superior=80"), 2,
     "'umbral_superior=<integer>'"),
    (lambda s: s.replace("umbral_superior=80", "umbral_superior=eighty"), 2, "'umbral_superior=<integer>'"),
    (lambda s: s.replace("umbral_superior=80", "umbral_superior=100"), 2, "between 1 and 99"),
    (lambda s: s.replace("umbral_inferior=10", "umbral_inferior=90"), 3, "below umbral_superior"),
    (lambda s: s.replace("tiempo_ciclo=10", "tiempo_ciclo=0"), 4, "at least 1 second"),
    (lambda s: s.replace("[NODOS]\n", ""), 5, "'[NODOS]'"),
    (lambda s: s.replace("D4:85:64:38:BE:CC", "d4:85:64:38:be:cc"), 6, "upper-case hex"),
    (lambda s: s.replace("192.168.1.3 D4", "192.168.1.300 D4"), 7, "IPv4 address"),
    (lambda s: s.replace("BC:00 10", "BC:00"), 7, "found 2 field(s)"),
    (lambda s: s.replace("BC:00 10", "BC:00 ten"), 7, "whole number of seconds"),
    (lambda s: s.replace("192.168.1.3 D4:85:64:38:BC:00", "192.168.1.2 D4:85:64:38:BC:00"), 7, "listed twice"),
    (lambda s: s.replace("[NODOS]\n192.168.1.2 D4:85:64:38:BE:CC 10\n192.168.1.3 D4:85:64:38:BC:00 10\n", "[NODOS]\n"),
     6, "at least one node line"),
    (lambda s: s.replace("mv2", "mv-2"), 10, "letters and digits"),
    (lambda s: s.replace("[END]\n", ""), 13, "'[END]'"),
    (lambda s: s + "extra\n", 14, "nothing after '[END]'"),
    (lambda s: "", 1, "'[PARAMETROS]'"),
])
def test_broken_files_name_the_line_and_what_was_expected(mutate, line, expected):
    message = _broken(mutate(SEED_SAMPLE))
    assert message.startswith(f"f.conf:{line}: expected ")
    assert expected in message


def test_missing_end_reports_end_of_file():
    assert "got end of file" in _broken(SEED_SAMPLE.replace("[END]\n", ""))


def test_crlf_and_trailing_spaces_are_accepted():
    assert parse(SEED_SAMPLE.replace("\n", "  \r\n")).vms == ("mv1", "mv2", "mv3", "mv4")


def test_cli_reports_a_broken_file_clearly(tmp_path):
    src = tmp_path / "enersis-frontend.conf"
    src.write_text(SEED_SAMPLE.replace("tiempo_ciclo=10", "tiempo_ciclo=ten"))
    r = subprocess.run([sys.executable, "-m", "enersis.cli", "arbiter", "--import-legacy", str(src)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert f"{src}:4: expected 'tiempo_ciclo=<integer>', got 'tiempo_ciclo=ten'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "enersis.cli", "arbiter", "--import-legacy", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no such file" in r.stderr


def test_arbiter_toml_errors_are_clear(tmp_path):
    from enersis.common.config import ConfigError

    with pytest.raises(ConfigError, match=r"\[arbiter\]: unknown key\(s\) uper_pct"):
        arbiter_config.parse({"arbiter": {"uper_pct": 80}}, with_broker=False)
    with pytest.raises(ConfigError, match="lower_pct < upper_pct"):
        arbiter_config.parse({"arbiter": {"upper_pct": 10, "lower_pct": 20}}, with_broker=False)
    with pytest.raises(ConfigError, match="unknown policy"):
        arbiter_config.parse({"arbiter": {"policy": "random"}}, with_broker=False)
    with pytest.raises(ConfigError, match=r"\[commands\]: migrate_timeout_s must be > 0"):
        arbiter_config.parse({"commands": {"migrate_timeout_s": 0}}, with_broker=False)
    with pytest.raises(ConfigError, match=r"\[policy\]: sustain_cycles must be an integer"):
        arbiter_config.parse({"policy": {"sustain_cycles": 2.5}}, with_broker=False)
    cfg = arbiter_config.parse({"arbiter": {"policy": "enersis-hysteresis", "frontend": "fe"},
                                "policy": {"reserve_nodes": 2}, "nodes": {"fe": {}}}, with_broker=False)
    assert cfg.params.reserve_nodes == 2 and cfg.frontend == "fe"
    # Live nodes keep a memory margin by default; the pure policy's default (the simulator's model) is 0.
    assert cfg.params.mem_headroom_pct == 10 and Params().mem_headroom_pct == 0
    cfg = arbiter_config.parse({"policy": {"mem_headroom_pct": 0}}, with_broker=False)
    assert cfg.params.mem_headroom_pct == 0


def test_policy_table_takes_floats_for_float_fields_and_ints_for_counts():
    from enersis.common.config import ConfigError

    cfg = arbiter_config.parse({"policy": {"margin_pct": 2.5, "panic_pct": 97, "consolidate_pct": 40.5}},
                               with_broker=False)
    assert (cfg.params.margin_pct, cfg.params.panic_pct, cfg.params.consolidate_pct) == (2.5, 97, 40.5)
    with pytest.raises(ConfigError, match="reserve_nodes must be an integer"):
        arbiter_config.parse({"policy": {"reserve_nodes": 1.5}}, with_broker=False)
