"""Shared subscriptions across two broker nodes on a real 3-node NATS cluster (issue 12): NATS
queue groups pick one node per message, the node one local member; ordinary subscribers with
overlapping filters on the same nodes still get every message once; when the last member on
one node leaves, the group's messages go to the other node's member."""

# ruff: noqa: F811 - the tests take the `cluster` fixture imported from test_fabric_node

from __future__ import annotations

import queue
import time
from collections import Counter

import pytest
from broker_helpers import V5, V311, Creds, Paho, enroll, wait_for
from conftest import Fleet
from test_broker_shared import drain
from test_fabric_node import FabricBroker, cluster, nodes  # noqa: F401 (a cluster per module)

JOBS = "$share/workers/jobs/#"


@pytest.fixture
def workers(fleet: Fleet) -> list[Creds]:
    fleet.registry.set_acl("workers", publish=["jobs/#"], subscribe=["jobs/#"], actor="test")
    return [enroll(fleet, f"worker-{n}", group="workers") for n in range(1, 7)]


def connected(broker: FabricBroker, creds: Creds, version: int = V5) -> Paho:
    client = Paho(broker, creds, version=version)
    assert client.connect()[0] == 0
    return client


def received(client: Paho, quiet: float = 0.5) -> list[bytes]:
    """Every payload but the probes until ``client`` has been quiet for ``quiet`` seconds."""
    return [p for p in drain(client, quiet) if not p.startswith(b"probe")]


def probe_until(publisher: Paho, *receivers: Paho) -> None:
    """Publish probes until each receiver has one: the other server knows their interest."""
    waiting = set(range(len(receivers)))
    deadline = time.monotonic() + 10
    while waiting and time.monotonic() < deadline:
        publisher.publish("jobs/probe", b"probe", qos=1)
        for index in list(waiting):
            try:
                while not receivers[index].message(0.1).payload.startswith(b"probe"):
                    pass
                waiting.discard(index)
            except queue.Empty:
                pass
    assert not waiting, "no probe crossed the fabric within 10 s"


@pytest.mark.parametrize("version", [V311, V5], ids=["3.1.1", "5.0"])
def test_a_shared_group_across_two_nodes_gets_each_message_once(
    nodes: tuple[FabricBroker, FabricBroker], workers: list[Creds], version: int
) -> None:
    a, b = nodes
    member_a, plain_a, publisher = (connected(a, c, version) for c in workers[:3])
    member_b, audit_b, plain_b = (connected(b, c, version) for c in workers[3:])
    clients = (member_a, plain_a, publisher, member_b, audit_b, plain_b)
    try:
        # Node A holds a shared member and an ordinary subscriber of an overlapping filter;
        # node B a member, a group of one, and an ordinary subscriber of the same filter.
        assert member_a.subscribe(JOBS, 1) == [1]
        assert plain_a.subscribe("jobs/+", 1) == [1]
        assert member_b.subscribe(JOBS, 1) == [1]
        assert audit_b.subscribe("$share/audit/jobs/#", 1) == [1]
        assert plain_b.subscribe("jobs/#", 1) == [1]
        probe_until(publisher, audit_b, plain_b)  # B's subscriptions, in order, reached A's
        for client in clients:
            received(client, 0.3)
        sent = [f"job-{n}".encode() for n in range(40)]
        for payload in sent:
            assert publisher.publish("jobs/build", payload, qos=1) == 0
        on_a, on_b = received(member_a), received(member_b)
        assert Counter(on_a + on_b) == Counter(sent)  # the group: each message once
        assert on_a and on_b  # NATS spreads the queue group over both nodes
        assert Counter(received(audit_b)) == Counter(sent)  # the other group: all of them
        assert Counter(received(plain_a)) == Counter(sent)  # ordinary subscribers: all, once
        assert Counter(received(plain_b)) == Counter(sent)

        # The last member on A leaves: A drops its queue subscription, B's member takes all.
        member_a.close()
        wait_for(
            lambda: a.call(lambda: "$share/workers/jobs/#" not in a.broker.fabric._nats_subs),
            what="node A's queue subscription gone",
        )
        later = [f"later-{n}".encode() for n in range(20)]
        for payload in later:
            assert publisher.publish("jobs/build", payload, qos=1) == 0
        assert Counter(received(member_b)) == Counter(later)
    finally:
        for client in clients:
            client.close()
