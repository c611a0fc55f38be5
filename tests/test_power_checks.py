"""Pure parts of the power service: safety verdicts, the telemetry fold, the inventory, packet repeats."""

from __future__ import annotations

import uuid

import pytest

from enersis.common.config import ConfigError
from enersis.common.messages import DomainSample, NodeOffline, NodeOnline, NodeTelemetry
from enersis.power.checks import NodeStatus, power_state, probe_verdict, shutdown_verdict, wake_verdict
from enersis.power.inventory import parse_config
from enersis.power.switch import SwitchError, WolSshSwitch
from enersis.power.tracker import NodeTracker

STALE = 30.0


def dom(name: str, state: int) -> DomainSample:
    return DomainSample(name, str(uuid.uuid4()), state, 1, 1024, 1024, 1.0, 10.0)


def status(**kw) -> NodeStatus:
    base = dict(node="n1", telemetry_age_s=1.0, listening_s=100.0)
    base.update(kw)
    return NodeStatus(**base)


def shutdown(s: NodeStatus, force: bool = False, issued_by: str = "arbiter"):
    return shutdown_verdict(s, stale_after_s=STALE, force=force, issued_by=issued_by)


# ---------------------------------------------------------------- power state and wake


@pytest.mark.parametrize("kw, expected", [
    (dict(), "online"),
    (dict(telemetry_age_s=None), "unknown"),
    (dict(telemetry_age_s=31.0), "unknown"),
    (dict(telemetry_age_s=None, online_age_s=2.0), "online"),
    (dict(telemetry_age_s=5.0, offline_age_s=1.0), "off"),  # goodbye after the last telemetry
    (dict(telemetry_age_s=1.0, offline_age_s=5.0), "online"),  # telemetry after the goodbye: rebooted
])
def test_power_state(kw, expected):
    assert power_state(status(**kw), STALE) == expected


def test_wake_is_skipped_only_for_a_node_known_online():
    assert wake_verdict(status(), STALE).action == "skip"
    assert wake_verdict(status(telemetry_age_s=100.0), STALE).action == "go"
    assert wake_verdict(status(offline_age_s=0.5), STALE).action == "go"


# ---------------------------------------------------------------- shutdown safety


def test_shutdown_of_an_empty_node_with_fresh_telemetry_goes():
    assert shutdown(status(domains=(dom("old", 5), dom("dead", 6)))).action == "go"


@pytest.mark.parametrize("state, label", [(1, "running"), (2, "blocked"), (3, "paused"), (7, "pmsuspended"),
                                          (4, "shutdown")])
def test_any_domain_that_is_not_shut_off_blocks_a_shutdown(state, label):
    v = shutdown(status(domains=(dom("vm-a", state),)))
    assert v.action == "reject" and f"vm-a ({label})" in v.reason


def test_many_domains_are_summarised():
    v = shutdown(status(domains=tuple(dom(f"vm-{i}", 1) for i in range(8))))
    assert v.action == "reject" and "8 active domain(s)" in v.reason and "and 3 more" in v.reason


def test_a_blind_hypervisor_proves_nothing():
    v = shutdown(status(hypervisor_ok=False, hypervisor_error="libvirtd gone"))
    assert v.action == "reject" and "libvirtd gone" in v.reason


def test_stale_or_missing_telemetry_leads_to_an_ssh_probe_not_a_shutdown():
    for s in (status(telemetry_age_s=None), status(telemetry_age_s=45.0)):
        v = shutdown(s)
        assert v.action == "probe"
        assert probe_verdict(s, True, v.reason).action == "reject"
        assert probe_verdict(s, False, v.reason).action == "skip"


def test_a_young_instance_waits_for_telemetry_before_judging():
    v = shutdown(status(telemetry_age_s=None, listening_s=2.0))
    assert v.action == "wait" and v.wait_s == pytest.approx(28.0)
    v = shutdown(status(telemetry_age_s=None, online_age_s=1.0, publish_interval_s=5.0))
    assert v.action == "wait" and v.wait_s == pytest.approx(10.0)
    v = shutdown(status(telemetry_age_s=None, online_age_s=20.0, publish_interval_s=5.0))
    assert v.action == "reject" and "no telemetry" in v.reason


def test_already_off_is_skipped_even_when_forced():
    assert shutdown(status(offline_age_s=0.1), force=True, issued_by="operator").action == "skip"


def test_force_only_from_an_operator_and_it_names_what_will_be_lost():
    s = status(domains=(dom("vm-a", 1),))
    assert shutdown(s, force=True, issued_by="arbiter").action == "reject"
    v = shutdown(s, force=True, issued_by="operator")
    assert v.action == "go" and "vm-a" in v.reason and v.details == {"forced": True}


# ---------------------------------------------------------------- the tracker


def telemetry(node: str, boot: str = "b1") -> NodeTelemetry:
    return NodeTelemetry(node=node, seq=1, boot_id=boot, hypervisor_ok=True, hypervisor_type="t", cpus=1, mhz=1,
                         mem_total_kib=1, mem_free_kib=1, cpu_pct=0.0, cpu_pct_latest=0.0, window_s=1.0,
                         sample_interval_s=1.0, publish_interval_s=2.0, domains=[dom("vm-a", 1)])


def test_tracker_ages_events_by_arrival_and_reports_what_came_since():
    now = [100.0]
    t = NodeTracker(clock=lambda: now[0])
    assert t.status("n1").telemetry_age_s is None
    t.observe(telemetry("n1"))
    now[0] = 103.0
    t.observe(NodeOnline(node="n1", boot_id="b1", hypervisor_ok=True, hypervisor_type="t", domain_count=1,
                         publish_interval_s=2.0))
    now[0] = 104.0
    s = t.status("n1")
    assert s.telemetry_age_s == 4.0 and s.online_age_s == 1.0 and s.publish_interval_s == 2.0
    assert [d.name for d in s.domains] == ["vm-a"] and s.listening_s == 4.0
    assert set(t.events_since("n1", 101.0)) == {"online", "online_at"}
    t.observe(NodeOffline(node="n1", boot_id="b1"))
    assert t.status("n1").last_event == "offline"
    assert t.status("other").telemetry_age_s is None


def test_tracker_wait_returns_on_evidence_or_none_at_the_deadline():
    import threading

    t = NodeTracker()
    since = t.now()
    threading.Timer(0.05, lambda: t.observe(NodeOffline(node="n1", boot_id="b1"))).start()
    assert t.wait(lambda: t.events_since("n1", since).get("offline_at"), 5.0) is not None
    assert t.wait(lambda: t.events_since("n2", since).get("offline_at"), 0.05) is None


# ---------------------------------------------------------------- the inventory


def good(**node):
    n = {"mac": "52-54-00-AB-CD-EF", "address": "10.0.0.11", "wol_broadcast": "10.0.0.255",
         "ssh_key": "/k", "known_hosts": "/kh"}
    n.update(node)
    return {"power": {"wake_timeout_s": 60}, "nodes": {"node-1": n}}


def test_inventory_normalises_and_defaults():
    cfg = parse_config(good(), check_files=False, with_broker=False)
    n = cfg.nodes["node-1"]
    assert n.mac == "52:54:00:ab:cd:ef" and n.wol_port == 9 and n.ssh_port == 22 and n.ssh_user == "root"
    assert n.shutdown_command == "shutdown -h now" and n.wol_source is None
    assert cfg.settings.wake_timeout_s == 60 and cfg.settings.stale_after_s == 30


@pytest.mark.parametrize("table, words", [
    (good(mac="52:54:00:ab:cd"), "not a MAC address"),
    (good(wol_port=0), "port number"),
    (good(wol_broadcast=None), "'wol_broadcast' must be"),
    (good(ssh_user="root; rm"), "not a valid user name"),
    (good(shutdown_command=""), "non-empty"),
    (good(colour="blue"), "unknown key(s) colour"),
    ({"nodes": {}}, "no [nodes.<name>]"),
    ({"power": {"wake_timeout_s": -1}, "nodes": good()["nodes"]}, "positive number"),
    ({"power": {"wake_timeout_s": 7200}, "nodes": good()["nodes"]}, "consumer_timeout"),
    ({"power": {"speed": 1}, "nodes": good()["nodes"]}, "unknown key(s) speed"),
])
def test_inventory_errors_say_what_to_fix(table, words):
    with pytest.raises(ConfigError, match=None) as err:
        parse_config(table, check_files=False, with_broker=False)
    assert words in str(err.value)


def test_inventory_checks_that_key_files_exist(tmp_path):
    with pytest.raises(ConfigError, match="ssh_key '/k' does not exist"):
        parse_config(good(), with_broker=False)


def test_inventory_refuses_a_mac_used_twice():
    t = good()
    t["nodes"]["node-2"] = dict(t["nodes"]["node-1"], address="10.0.0.12")
    with pytest.raises(ConfigError, match="also the mac of node-1"):
        parse_config(t, check_files=False, with_broker=False)


# ---------------------------------------------------------------- magic packets


def test_wake_repeats_packets_and_fails_only_when_none_left():
    cfg = parse_config(good(wol_source="10.0.0.1"), check_files=False, with_broker=False)
    node = cfg.nodes["node-1"]
    sent, gaps = [], []
    sw = WolSshSwitch(repeats=3, gap_s=0.1, send=lambda *a: sent.append(a), sleep=gaps.append)
    assert sw.wake(node) == 3
    assert sent == [("52:54:00:ab:cd:ef", "10.0.0.255", 9, "10.0.0.1")] * 3 and gaps == [0.1, 0.1]

    def refuse(*a):
        raise OSError(99, "Cannot assign requested address")

    with pytest.raises(SwitchError, match="Cannot assign requested address") as err:
        WolSshSwitch(repeats=2, gap_s=0, send=refuse, sleep=lambda s: None).wake(node)
    assert err.value.retryable and not err.value.ran


def test_a_peer_that_went_silent_after_accepting_stops_counting_as_busy():
    from enersis.common.messages import CommandResult
    from enersis.power.peers import PeerLedger

    now = [0.0]
    ledger = PeerLedger("me", max_age_s=60.0, clock=lambda: now[0])
    accepted = CommandResult(command_id="c1", command_kind="WakeNode", status="accepted", node="n1")
    ledger.observe(accepted, "me")
    assert ledger.get("c1") is None, "our own results are not a peer's"
    ledger.observe(accepted, "peer")
    assert ledger.busy("n1").command_id == "c1"
    joined = CommandResult(command_id="c2", command_kind="WakeNode", status="accepted", node="n2",
                           details={"joined": "c0"})
    ledger.observe(joined, "peer")
    assert ledger.busy("n2") is None, "a joiner does no work of its own"
    assert ledger.wait_final(ledger.get("c1"), 0.01) is None
    now[0] = 61.0
    assert ledger.busy("n1") is None
    ledger.observe(CommandResult(command_id="c1", command_kind="WakeNode", status="succeeded", node="n1"), "peer")
    assert ledger.wait_final(ledger.get("c1"), 0.01).status == "succeeded"


def test_our_own_final_settles_a_peer_command_we_took_over():
    from enersis.common.messages import CommandResult
    from enersis.power.peers import PeerLedger

    ledger = PeerLedger("me")
    ledger.observe(CommandResult(command_id="c1", command_kind="ShutdownNode", status="accepted", node="n1"), "dead")
    assert ledger.busy("n1") is not None
    ledger.observe(CommandResult(command_id="c1", command_kind="ShutdownNode", status="accepted", node="n1"), "me")
    assert ledger.busy("n1") is not None, "only a final settles it"
    ledger.observe(CommandResult(command_id="c1", command_kind="ShutdownNode", status="succeeded", node="n1"), "me")
    assert ledger.busy("n1") is None and ledger.get("c1").result.status == "succeeded"
