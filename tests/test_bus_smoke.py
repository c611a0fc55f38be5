import threading
from enersis.common import topology
from enersis.common.bus import Consumer, Publisher
from enersis.common.messages import WakeNode
from tests.conftest import wait_for

def test_publish_consume_roundtrip(broker, vhost):
    got = []
    pub = Publisher(broker.settings("arbiter", vhost), "arbiter")
    cons = Consumer(broker.settings("power", vhost), Publisher(broker.settings("power", vhost), "power"), name="t")
    cons.subscribe(topology.Q_POWER, lambda d: got.append(d.message), allow_json=True)
    cons.start()
    wait_for(cons.ready.is_set, 10, what="consumer ready")
    pub.publish(WakeNode(command_id="c1", node="n1"))
    wait_for(lambda: got, 10, what="delivery")
    assert got[0] == WakeNode(command_id="c1", node="n1")
    cons.stop(); pub.close()
