"""When the SDK acts: reconnect delays (exponential, bounded, full jitter) and renewal time."""

from __future__ import annotations

import datetime as dt
import random

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_sdk import Backoff, RenewalPolicy, renewal_due


def test_backoff_bound_doubles_from_initial_up_to_the_maximum() -> None:
    backoff = Backoff(initial=0.5, maximum=30.0)
    assert [backoff.bound(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff.bound(10_000) == 30.0  # no overflow after days offline


def test_backoff_draws_uniformly_between_zero_and_the_bound() -> None:
    backoff = Backoff(initial=1.0, maximum=8.0)
    assert backoff.delay(3, rand=lambda: 0.0) == 0.0
    assert backoff.delay(3, rand=lambda: 0.5) == 4.0
    rng = random.Random(1)
    draws = [backoff.delay(5, rand=rng.random) for _ in range(2000)]
    assert all(0.0 <= d <= 8.0 for d in draws)
    assert min(draws) < 0.5 and max(draws) > 7.5  # full jitter: the whole range is used
    assert 3.5 < sum(draws) / len(draws) < 4.5


@pytest.mark.parametrize(
    "settings",
    [
        {"initial": 0.0},
        {"initial": 2.0, "maximum": 1.0},
        {"multiplier": 0.5},
    ],
)
def test_backoff_refuses_settings_that_would_not_back_off(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="backoff needs"):
        Backoff(**settings)


def _certificate(not_before: dt.datetime, days: int) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sensor-1")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )


def test_renewal_falls_due_when_two_thirds_of_the_validity_have_passed() -> None:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    cert = _certificate(start, days=90)
    assert renewal_due(cert, RenewalPolicy().fraction) == start + dt.timedelta(days=60)
    assert renewal_due(cert, 0.5) == start + dt.timedelta(days=45)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5])
def test_a_renewal_fraction_outside_the_validity_is_refused(fraction: float) -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        RenewalPolicy(fraction=fraction)
