"""How the broker plumbing treats handler verdicts and configuration mistakes."""

from __future__ import annotations

import pika
import pytest

from enersis.common import topology
from enersis.common.bus import Consumer, PermanentError, Publisher, TemporaryError, Unroutable
from enersis.common.config import ConfigError, broker_settings
from enersis.common.messages import MigrateVm, WakeNode
from tests.conftest import wait_for


def _drain_dead_letters(broker, vhost):
    conn = pika.BlockingConnection(broker.settings("admin", vhost).pika_parameters())
    try:
        ch = conn.channel()
        out = []
        while True:
            method, props, body = ch.basic_get(topology.Q_DEAD_LETTERS, auto_ack=True)
            if method is None:
                return out
            out.append(props)
    finally:
        conn.close()


def _power_consumer(broker, vhost, handler):
    """A running consumer of the power queue as the `power` user, and its publisher."""
    pub = Publisher(broker.settings("power", vhost), "power-test")
    consumer = Consumer(broker.settings("power", vhost), pub, name="t")
    consumer.subscribe(topology.Q_POWER, handler, allow_json=True)
    consumer.start()
    wait_for(consumer.ready.is_set, 15, what="consumer ready")
    return pub, consumer


@pytest.mark.broker
def test_permanent_error_dead_letters_with_the_handlers_reason(broker, vhost):
    def handler(delivery):
        raise PermanentError(f"node {delivery.message.node} is not in the inventory")

    pub, consumer = _power_consumer(broker, vhost, handler)
    try:
        Publisher(broker.settings("arbiter", vhost), "arbiter-test").publish(WakeNode(command_id="c1", node="ghost"))
        wait_for(lambda: broker.queue_depth(vhost, topology.Q_DEAD_LETTERS) == 1, 15, what="dead letter")
        (props,) = _drain_dead_letters(broker, vhost)
        assert props.headers[topology.H_REJECT_REASON] == "WakeNode: node ghost is not in the inventory"
        assert props.type == "WakeNode" and props.app_id == "arbiter-test"
    finally:
        consumer.stop()
        pub.close()


@pytest.mark.broker
def test_temporary_errors_are_retried_until_the_delivery_limit_dead_letters_them(broker, vhost):
    attempts = []

    def handler(delivery):
        attempts.append(delivery.redelivered)
        raise TemporaryError("hypervisor busy")

    pub, consumer = _power_consumer(broker, vhost, handler)
    try:
        Publisher(broker.settings("arbiter", vhost), "arbiter-test").publish(WakeNode(command_id="c2", node="n1"))
        wait_for(lambda: broker.queue_depth(vhost, topology.Q_DEAD_LETTERS) == 1, 30, what="delivery-limit dead letter")
        (props,) = _drain_dead_letters(broker, vhost)
        assert props.headers["x-death"][0]["reason"] == "delivery_limit"
        assert len(attempts) == topology.COMMAND_DELIVERY_LIMIT + 1
        assert attempts[0] is False and all(attempts[1:])
    finally:
        consumer.stop()
        pub.close()


@pytest.mark.broker
def test_mandatory_publish_to_a_node_without_a_queue_is_unroutable(broker, vhost):
    pub = Publisher(broker.settings("arbiter", vhost), "arbiter-test")
    try:
        with pytest.raises(Unroutable, match="migrate.nowhere"):
            pub.publish(MigrateVm(command_id="c3", vm="vm1", source="nowhere", target="n2"), mandatory=True)
    finally:
        pub.close()


def test_inline_password_is_refused(monkeypatch):
    monkeypatch.delenv("ENERSIS_AMQP_URL", raising=False)
    with pytest.raises(ConfigError, match="must not be inline"):
        broker_settings({"url": "amqp://b:5672/enersis", "user": "agent", "password": "hunter2"})


def test_password_from_file_or_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("ENERSIS_AMQP_URL", raising=False)
    (tmp_path / "pw").write_text("s3cret\n")
    s = broker_settings({"url": "amqps://broker.example:5671/prod", "user": "agent", "password_file": str(tmp_path / "pw")})
    assert (s.host, s.port, s.vhost, s.user, s.password, s.tls) == ("broker.example", 5671, "prod", "agent", "s3cret", True)
    assert "s3cret" not in repr(s) and "s3cret" not in s.url_for_logs
    monkeypatch.setenv("AGENT_PW", "from-env")
    assert broker_settings({"user": "agent", "password_env": "AGENT_PW"}).password == "from-env"
    with pytest.raises(ConfigError, match="MISSING_PW is not set"):
        broker_settings({"user": "agent", "password_env": "MISSING_PW"})
    with pytest.raises(ConfigError, match="cannot be read"):
        broker_settings({"user": "agent", "password_file": str(tmp_path / "nope")})


def test_environment_url_overrides_the_file(monkeypatch):
    monkeypatch.setenv("ENERSIS_AMQP_URL", "amqp://operator:pw@127.0.0.1:5673/enersis")
    s = broker_settings({"url": "amqp://elsewhere/x", "user": "agent", "password_env": "NOT_READ"})
    assert (s.host, s.port, s.user, s.password, s.vhost) == ("127.0.0.1", 5673, "operator", "pw", "enersis")
