"""Device-certificate signing rate with the issuing key in a file vs in a PKCS#11 token (SoftHSM2).

Both sides build the same device certificate with ``profiles.build_certificate``; the token side
signs through ``enrollment.pkcs11`` (a stand-in signature, then the to-be-signed bytes re-signed
by the token). Rounds alternate file/token so both see the same machine noise. One thread: the
rate of one signer, as the enrollment service's signing stage sees it.

Last line: ``file_certs_per_s=… token_certs_per_s=… token_over_file_ms=…``
"""

from __future__ import annotations

import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from enrollment import pkcs11, profiles

ROUNDS = 6
PER_ROUND = 400


def _rate(issuer: profiles.Issuer, count: int) -> float:
    device = ec.generate_private_key(ec.SECP256R1()).public_key()
    subject = profiles.Subject("sensor-1", uris=("urn:fleetgate:device:sensor-1",))
    now = dt.datetime.now(dt.UTC)
    start = time.perf_counter()
    for _ in range(count):
        profiles.build_certificate(
            profiles.DEVICE,
            subject=subject,
            public_key=device,
            issuer=issuer,
            validity=dt.timedelta(days=90),
            now=now,
        )
    return count / (time.perf_counter() - start)


def main() -> None:
    if not pkcs11.SOFTHSM_MODULE.exists():
        sys.exit(
            f"{pkcs11.SOFTHSM_MODULE} is missing: apt-get install softhsm2 (make bootstrap-test)"
        )
    with tempfile.TemporaryDirectory() as scratch:
        settings = pkcs11.softhsm_token(Path(scratch), "bench", "4711")
        token_key = pkcs11.generate_key(settings, "issuing")
        file_key = ec.generate_private_key(ec.SECP256R1())
        root_key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        root = profiles.build_certificate(
            profiles.ROOT,
            subject=profiles.Subject("bench root"),
            public_key=root_key.public_key(),
            issuer=profiles.Issuer(root_key, None),
            validity=dt.timedelta(days=365),
            now=now,
        )
        issuers = {
            "file": profiles.Issuer(file_key, root),
            "token": profiles.Issuer(token_key, root),
        }
        rates: dict[str, list[float]] = {"file": [], "token": []}
        for name in issuers:  # warm-up: imports, the stand-in key
            _rate(issuers[name], 50)
        for _ in range(ROUNDS):
            for name, issuer in issuers.items():
                rates[name].append(_rate(issuer, PER_ROUND))
    file_rate = statistics.median(rates["file"])
    token_rate = statistics.median(rates["token"])
    for name, values in rates.items():
        print(f"{name}_rounds=" + ",".join(f"{v:.0f}" for v in values))
    print(
        f"file_certs_per_s={file_rate:.0f} token_certs_per_s={token_rate:.0f} "
        f"token_over_file_ms={1000 / token_rate - 1000 / file_rate:.3f}"
    )


if __name__ == "__main__":
    main()
