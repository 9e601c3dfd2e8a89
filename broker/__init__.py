"""fleetgate's MQTT 3.1.1 / 5.0 broker: mutual TLS, per-device ACLs, revocation that reaches
live sessions.

:class:`Broker` runs it (``fleetgate serve broker``); :class:`BrokerCore` and
:class:`Connection` are the sans-I/O protocol core, usable without sockets.
"""

from broker.admission import Admitted, Identity, Refused, Unidentified
from broker.connection import AdmissionRequest, Connection
from broker.core import BrokerCore, CoreSettings
from broker.feed import RevocationFeed
from broker.metrics import Metrics
from broker.server import BoundPorts, Broker, run_forever

__all__ = [
    "AdmissionRequest",
    "Admitted",
    "BoundPorts",
    "Broker",
    "BrokerCore",
    "Connection",
    "CoreSettings",
    "Identity",
    "Metrics",
    "Refused",
    "RevocationFeed",
    "Unidentified",
    "run_forever",
]
