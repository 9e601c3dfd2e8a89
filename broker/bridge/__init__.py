"""Store-and-forward bridges from this broker to upstream MQTT brokers (issue 5).

:class:`BridgeManager` runs every ``[[bridge]]`` of the configuration inside the broker: it is
the core's publish gate (a bridged QoS 1 message is acknowledged to the device only once it is
committed to ``<home>/bridge/queue.db``), and it keeps one mutual-TLS link per upstream.
:mod:`broker.bridge.topics` holds the pure topic rules; ``fleetgate bridge status`` is
:mod:`fleetgate.cli.bridge`.
"""

from broker.bridge.manager import ORIGIN_PROPERTY, BridgeManager, BridgeRuntime, queue_path
from broker.bridge.plan import BridgePlan, plan_bridges
from broker.bridge.status import BridgeCounters, BridgeStatus
from broker.bridge.topics import InvalidBridgeRule, TopicRule, compile_rule, first_remap, remap

__all__ = [
    "ORIGIN_PROPERTY",
    "BridgeCounters",
    "BridgeManager",
    "BridgePlan",
    "BridgeRuntime",
    "BridgeStatus",
    "InvalidBridgeRule",
    "TopicRule",
    "compile_rule",
    "first_remap",
    "plan_bridges",
    "queue_path",
    "remap",
]
