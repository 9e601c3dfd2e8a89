"""A persistent session's shared subscriptions live in its fabric record (issue 12): a device
whose session resumes on another node, after its node was SIGKILLed or after a clean
disconnect, is a member of its shared groups again with session present = 1, without
subscribing again, and gets the group's QoS 1 messages there; a member whose session ends
with QoS 1 messages unacknowledged hands them to the group's member on another node. Real
3-node nats-server cluster, one broker node in its own process (to be killed), others in this
process, real paho clients, MQTT 3.1.1 and 5."""

# ruff: noqa: F811 - the tests take fixtures imported from other test modules

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import pytest
from broker_helpers import V5, V311, Creds, Paho, wait_for
from conftest import Fleet
from nats_cluster import NatsCluster
from test_fabric_node import FabricBroker, nodes  # noqa: F401
from test_fabric_sessions import ProcessNode, _forget_sessions, cluster, record_of  # noqa: F401
from test_fabric_shared import JOBS, connected, probe_until, received, workers  # noqa: F401

from broker.fabric.records import SessionRecord, ShareState


@pytest.fixture
def survivor(fleet: Fleet, cluster: NatsCluster) -> Iterator[FabricBroker]:
    """Node B on NATS server 2 (in this process), with no session records left over."""
    b = FabricBroker(fleet, [cluster.nodes[1].url], "node-b").start()  # makes the server cert
    asyncio.run(_forget_sessions(cluster.nodes[0].url))
    yield b
    b.stop()


def test_the_record_keeps_shared_subscriptions_and_reads_records_without_them() -> None:
    record = SessionRecord("w", "n", 300, shares={JOBS: ShareState(1, True, 4)})
    assert SessionRecord.decode(record.encode()) == record
    plain = SessionRecord("w", "n", 300)
    assert b'"g"' not in plain.encode()  # nothing more per record without shares
    assert SessionRecord.decode(plain.encode()) == plain


@pytest.mark.parametrize("version", [V311, V5], ids=["3.1.1", "5.0"])
@pytest.mark.parametrize("leaving", ["sigkill", "clean-disconnect"])
def test_a_shared_member_resumes_on_another_node_without_subscribing_again(
    fleet: Fleet,
    cluster: NatsCluster,
    survivor: FabricBroker,
    workers: list[Creds],
    leaving: str,
    version: int,
) -> None:
    first = ProcessNode(fleet, [cluster.nodes[0].url], "node-k")
    try:
        first.wait_listening()
        member = Paho(first, workers[0], version=version, clean=False, session_expiry=300)
        code, present, _ = member.connect()
        assert code == 0 and not present
        assert member.subscribe(JOBS, 1) == [1]

        def shares() -> dict[str, ShareState]:
            record = record_of(cluster, "worker-1")
            return {} if record is None else record.shares

        wait_for(lambda: JOBS in shares(), what="the shared subscription in the record")
        assert shares()[JOBS].qos == 1
        if leaving == "sigkill":
            first.kill()
            member.client.loop_stop()
        else:
            member.close()
            wait_for(lambda: (r := record_of(cluster, "worker-1")) and r.away_since, what="away")

        again = Paho(survivor, workers[0], version=version, clean=False, session_expiry=300)
        code, present, _ = again.connect()
        assert code == 0 and present
        publisher = connected(survivor, workers[1], version)
        probe_until(publisher, again)  # no SUBSCRIBE: the restored membership's queue group
        sent = [f"job-{n}".encode() for n in range(20)]
        for payload in sent:
            assert publisher.publish("jobs/build", payload, qos=1) == 0
        got = received(again)
        assert Counter(got) == Counter(sent)  # each once, none lost
        record = record_of(cluster, "worker-1")
        assert record is not None and record.node == "node-b" and JOBS in record.shares
        publisher.close()
        again.close()
    finally:
        if first.process.poll() is None:
            first.kill()


def test_a_leaving_members_unacknowledged_messages_go_to_the_member_on_another_node(
    nodes: tuple[FabricBroker, FabricBroker], workers: list[Creds]
) -> None:
    """Node A's only member never acknowledges; it drops (a clean session: it ends). What
    it held unacknowledged cannot stay on A (no member left there): it goes to node B's."""
    a, b = nodes
    leaver, member_b, publisher = connected(a, workers[0]), connected(b, workers[3]), None
    try:
        leaver.client.manual_ack_set(True)  # receives, never sends PUBACK
        assert leaver.subscribe(JOBS, 1) == [1]
        assert member_b.subscribe(JOBS, 1) == [1]
        publisher = connected(b, workers[1])
        probe_until(publisher, leaver, member_b)
        sent = [f"job-{n}".encode() for n in range(20)]
        for payload in sent:
            assert publisher.publish("jobs/build", payload, qos=1) == 0
        held, got_b = received(leaver), received(member_b)
        assert held and Counter(held + got_b) == Counter(sent)
        leaver.drop()
        handed = received(member_b, 2.0)
        assert Counter(handed) == Counter(held)  # each once, on B
        assert a.metric("fabric_shared_handed_on_total", 'node="node-a"') >= len(held)
    finally:
        for client in (leaver, member_b, publisher):
            if client is not None:
                client.close()
