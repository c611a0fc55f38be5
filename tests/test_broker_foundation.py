"""The foundation against a real broker: dead-lettering, the management UI path,
least privilege, the committed definitions, and a kill -9 of the broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.error
from collections import Counter
from pathlib import Path

import pika
import pika.exceptions as px
import pytest

from enersis.common import topology
from enersis.common.bus import Consumer, Publisher
from enersis.common.codec import JSON, MSGPACK, decode
from enersis.common.messages import WakeNode
from tests.conftest import BROKER_SCRIPT, REPO, Broker, wait_for
from tests.test_contract import MALFORMED

pytestmark = pytest.mark.broker


def admin_channel(broker: Broker, vhost: str):
    conn = pika.BlockingConnection(broker.settings("admin", vhost).pika_parameters())
    return conn, conn.channel()


def drain(channel, queue: str) -> list[tuple[object, bytes]]:
    out = []
    while True:
        method, props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return out
        out.append((props, body))


def test_committed_definitions_match_the_topology_module():
    committed = json.loads((REPO / "deploy" / "rabbitmq" / "definitions.json").read_text())
    assert committed == topology.definitions(), "run `make definitions` and commit the result"
    assert all(u["password_hash"] == "" for u in committed["users"]), "no password may be committed"


def test_malformed_commands_are_dead_lettered_with_their_reason_and_the_consumer_keeps_going(broker, vhost):
    handled: list[WakeNode] = []
    publisher = Publisher(broker.settings("power", vhost), "power-test")
    consumer = Consumer(broker.settings("power", vhost), publisher, name="power-test")
    consumer.subscribe(topology.Q_POWER, lambda d: handled.append(d.message), allow_json=True)
    consumer.start()
    conn, ch = admin_channel(broker, vhost)
    try:
        wait_for(consumer.ready.is_set, 15, what="consumer ready")
        for name, (payload, ctype, _) in sorted(MALFORMED.items()):
            ch.basic_publish(topology.EX_COMMANDS, "power.wake.n1", payload,
                             pika.BasicProperties(content_type=ctype, message_id=name))
        good = Publisher(broker.settings("arbiter", vhost), "arbiter-test")
        good.publish(WakeNode(command_id="after-the-garbage", node="n1"))
        good.close()
        wait_for(lambda: handled, 15, what="the good command after the malformed ones")
        wait_for(lambda: broker.queue_depth(vhost, topology.Q_DEAD_LETTERS) >= len(MALFORMED), 20,
                 what="every malformed message dead-lettered")
        dead = {props.message_id: props.headers for props, _ in drain(ch, topology.Q_DEAD_LETTERS)}
        assert set(dead) == set(MALFORMED)
        for name, (_, _, words) in MALFORMED.items():
            assert words in dead[name][topology.H_REJECT_REASON], (name, dead[name])
            assert dead[name][topology.H_ORIGINAL_QUEUE] == topology.Q_POWER
        assert handled == [WakeNode(command_id="after-the-garbage", node="n1")]
        assert consumer.ready.is_set(), "the consumer must still be consuming"
        assert broker.queue_depth(vhost, topology.Q_POWER) == 0
    finally:
        conn.close()
        consumer.stop()
        publisher.close()


def test_json_published_through_the_management_api_reaches_its_queue_and_decodes(broker, vhost):
    command = {"kind": "WakeNode", "version": "1.0", "body": {"command_id": "ui-1", "node": "node-3"}}
    answer = broker.api(
        "POST", f"exchanges/{vhost}/{topology.EX_COMMANDS}/publish",
        {"properties": {"content_type": "application/json"}, "routing_key": "power.wake.node-3",
         "payload": json.dumps(command), "payload_encoding": "string"},
        user="operator",
    )
    assert answer == {"routed": True}
    conn, ch = admin_channel(broker, vhost)
    try:
        method, props, body = ch.basic_get(topology.Q_POWER, auto_ack=True)
        assert method is not None
        env = decode(body, props.content_type, allow_json=True)
        assert env.message == WakeNode(command_id="ui-1", node="node-3")
    finally:
        conn.close()


def test_agent_user_may_not_publish_commands(broker, vhost):
    conn = pika.BlockingConnection(broker.settings("agent", vhost).pika_parameters())
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        with pytest.raises(px.ChannelClosedByBroker) as err:
            ch.basic_publish(topology.EX_COMMANDS, "power.shutdown.n1", b"{}")
        assert err.value.reply_code == 403
        assert "ACCESS_REFUSED" in err.value.reply_text
    finally:
        if conn.is_open:
            conn.close()


def test_agent_may_declare_and_consume_only_its_migrate_queue(broker, vhost):
    conn = pika.BlockingConnection(broker.settings("agent", vhost).pika_parameters())
    try:
        ch = conn.channel()
        topology.declare_queue(ch, topology.migrate_queue_spec("node-9"))
        ch.basic_consume(topology.migrate_queue("node-9"), lambda *a: None)
        with pytest.raises(px.ChannelClosedByBroker) as err:
            ch.basic_consume(topology.Q_POWER, lambda *a: None)
        assert err.value.reply_code == 403
    finally:
        if conn.is_open:
            conn.close()


@pytest.fixture
def second_broker(tmp_path):
    """A broker of our own, so killing it disturbs no other test."""
    base_amqp = int(os.environ.get("ENERSIS_AMQP_PORT", "5673")) + 1
    base_mgmt = int(os.environ.get("ENERSIS_MGMT_PORT", "15673")) + 1
    env = dict(os.environ, ENERSIS_BROKER_DIR=str(tmp_path / "broker"), ENERSIS_AMQP_PORT=str(base_amqp),
               ENERSIS_MGMT_PORT=str(base_mgmt), ENERSIS_BROKER_NAME=os.environ.get("ENERSIS_BROKER_NAME", "enersis") + "-kill")

    def run(*args):
        return subprocess.run([sys.executable, str(BROKER_SCRIPT), *args], env=env, capture_output=True, text=True, timeout=180)

    r = run("start")
    assert r.returncode == 0, r.stdout + r.stderr
    broker = Broker(json.loads((tmp_path / "broker" / "broker.json").read_text()))
    broker.run = run  # type: ignore[method-assign]
    yield broker
    run("stop")


def test_kill_9_of_the_broker_loses_no_confirmed_command_and_duplicates_are_applied_once(second_broker):
    broker = second_broker
    deliveries: Counter[str] = Counter()
    applied: Counter[str] = Counter()
    lock = threading.Lock()

    def apply_once(delivery):
        cid = delivery.message.command_id
        with lock:
            deliveries[cid] += 1
            if cid in applied:  # keyed on command id: a redelivery does no harm
                return
            applied[cid] += 1

    consumer_pub = Publisher(broker.settings("power"), "power-test", retry_for_s=60)
    consumer = Consumer(broker.settings("power", heartbeat_s=5), consumer_pub, name="power-test", workers=2)
    consumer.subscribe(topology.Q_POWER, apply_once, allow_json=True)
    consumer.start()
    wait_for(consumer.ready.is_set, 20, what="consumer ready")

    publisher = Publisher(broker.settings("arbiter", heartbeat_s=5), "arbiter-test", retry_for_s=90)
    confirmed: list[str] = []
    failures: list[BaseException] = []
    total = 400

    def produce():
        try:
            for i in range(total):
                msg = WakeNode(command_id=f"cmd-{i:04d}", node=f"n{i % 7}")
                publisher.publish(msg)
                confirmed.append(msg.command_id)
        except BaseException as exc:  # surfaced by the assertion below
            failures.append(exc)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        wait_for(lambda: len(confirmed) >= 100, 60, what="100 confirmed publishes")
        r = broker.run("kill9")
        assert r.returncode == 0, r.stderr
        r = broker.run("start")
        assert r.returncode == 0, r.stdout + r.stderr
        producer.join(180)
        assert not producer.is_alive() and not failures, failures
        assert len(confirmed) == total
        wait_for(lambda: set(applied) >= set(confirmed), 90, what="every confirmed command delivered after the restart")
        assert all(applied[c] == 1 for c in confirmed)
        assert set(applied) <= {f"cmd-{i:04d}" for i in range(total)}
        # The broker really died: the consumer saw a reconnect, some messages may have come twice.
        print(f"\ndeliveries: {sum(deliveries.values())} for {len(applied)} commands "
              f"({sum(deliveries.values()) - len(applied)} duplicates filtered)")
    finally:
        consumer.stop()
        consumer_pub.close()
        publisher.close()
