"""The simulator's EST link: a station enrolls many devices over a few kept-alive connections,
against the real enrollment server on loopback."""

from __future__ import annotations

import asyncio

import pytest
from conftest import Fleet
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from device_sdk.est import EstError, client_context, device_csr
from firmware_sim.est_link import EstLink


def csr_der(device_id: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return device_csr(device_id, key).public_bytes(Encoding.DER)


def common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def test_a_station_enrolls_twenty_devices_with_two_handshakes(fleet: Fleet, est_server):
    station = fleet.add_station()
    ids = [f"sensor-{n:02d}" for n in range(20)]
    fleet.batch(station.name, *ids)

    async def enroll_all() -> tuple[list[x509.Certificate], int]:
        context = client_context(fleet.root, station.cert, station.key)
        link = EstLink(est_server.url, context, connections=2)
        try:
            certs = await asyncio.gather(*(link.simpleenroll(csr_der(d)) for d in ids))
        finally:
            await link.close()
        return certs, link.handshakes

    certs, handshakes = asyncio.run(enroll_all())
    assert [common_name(c) for c in certs] == ids
    assert handshakes == 2  # each connection kept alive across ten enrollments


def test_a_refusal_is_an_est_error_and_the_connection_goes_on(fleet: Fleet, est_server):
    station = fleet.add_station()
    fleet.batch(station.name, "sensor-ok")

    async def refused_then_enrolled() -> tuple[EstError, x509.Certificate, int]:
        context = client_context(fleet.root, station.cert, station.key)
        link = EstLink(est_server.url, context, connections=1)
        try:
            with pytest.raises(EstError) as refusal:
                await link.simpleenroll(csr_der("not-in-any-batch"))
            cert = await link.simpleenroll(csr_der("sensor-ok"))
        finally:
            await link.close()
        return refusal.value, cert, link.handshakes

    refusal, cert, handshakes = asyncio.run(refused_then_enrolled())
    assert refusal.status in (403, 404, 409) and "not-in-any-batch" in refusal.message
    assert common_name(cert) == "sensor-ok"
    assert handshakes == 1


def test_an_http_url_is_refused(fleet: Fleet):
    with pytest.raises(ValueError, match="https://"):
        EstLink("http://localhost:1", client_context(fleet.root))
