"""Cipher policy: the pure decision from CPU features, the per-context mechanism, and handshakes.

The handshakes run against Debian's Mosquitto. ``OPENSSL_ia32cap`` is read once when OpenSSL
loads, so each masked case runs the client in a fresh Python process with the mask in its
environment (``~0x200000200000000:~0x0`` removes AES-NI and PCLMUL and nothing else).
"""

from __future__ import annotations

import os
import platform
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from sdk_helpers import (  # noqa: F401  (fixtures)
    MASK_AES_NI,
    REPO,
    Devices,
    Mosquitto,
    broker_fixture,
    devices_fixture,
    probe_cipher,
)

from device_sdk import CipherPolicyError, hardware_aes, suites_for
from device_sdk.ciphers import (
    AES_GCM_SUITES,
    CHACHA20_SUITES,
    local_hardware_aes,
    offered_tls13_suites,
    resolve,
    set_tls13_suites,
)

CHACHA = "TLS_CHACHA20_POLY1305_SHA256"

X86_WITH_AES = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme de pse tsc msr pae sse2 ssse3 pclmulqdq sse4_1 aes avx avx2 sha_ni vaes
"""
X86_WITHOUT_AES = X86_WITH_AES.replace(" aes ", " ")
ARM_WITH_AES = """\
processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid
CPU implementer\t: 0x41
"""
ARM_WITHOUT_AES = """\
processor\t: 0
model name\t: ARMv7 Processor rev 4 (v7l)
Features\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm
"""


# -- the decision, from /proc/cpuinfo text -----------------------------------------------------


@pytest.mark.parametrize(
    ("cpuinfo", "machine", "expected"),
    [
        (X86_WITH_AES, "x86_64", True),
        (X86_WITHOUT_AES, "x86_64", False),
        (ARM_WITH_AES, "aarch64", True),
        (ARM_WITHOUT_AES, "armv7l", False),
        (X86_WITH_AES, "riscv64", False),  # no known AES flag: assume none
        ("", "x86_64", False),
    ],
)
def test_hardware_aes_reads_the_x86_flag_and_the_arm_feature(
    cpuinfo: str, machine: str, expected: bool
) -> None:
    assert hardware_aes(cpuinfo, machine=machine) is expected


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (MASK_AES_NI, False),  # AES-NI (bit 57) and PCLMUL off
        ("~0x200000200000000", False),  # the common form (also clears the second word)
        ("~0x200000000000000", False),  # bit 57 alone
        ("~0x1000000", False),  # FXSR off: OpenSSL drops AES-NI with it
        ("~0x200000000", True),  # PCLMUL only
        (":~0x0", True),  # second word only
        ("0x200000000000000", True),  # a plain value replaces the word: AES-NI kept
        ("0x4000000", False),  # ... or dropped
        ("", True),
    ],
)
def test_openssl_ia32cap_masks_aes_ni_as_openssl_does(mask: str, expected: bool) -> None:
    assert hardware_aes(X86_WITH_AES, machine="x86_64", ia32cap=mask) is expected


def test_the_ia32cap_mask_means_nothing_on_arm() -> None:
    assert hardware_aes(ARM_WITH_AES, machine="aarch64", ia32cap=MASK_AES_NI)


def test_policies_pick_their_suites() -> None:
    assert suites_for("auto", has_hardware_aes=False) == (CHACHA,)
    assert suites_for("auto", has_hardware_aes=True) == AES_GCM_SUITES
    assert suites_for("chacha20", has_hardware_aes=True) == (CHACHA,)
    assert suites_for("aes", has_hardware_aes=False) == AES_GCM_SUITES
    with pytest.raises(ValueError, match="unknown cipher policy"):
        suites_for("des", has_hardware_aes=True)  # type: ignore[arg-type]


# -- the mechanism on a stdlib context ---------------------------------------------------------


@pytest.mark.parametrize("suites", [CHACHA20_SUITES, AES_GCM_SUITES])
def test_a_context_offers_exactly_the_policys_tls13_suites(suites: tuple[str, ...]) -> None:
    context = ssl.create_default_context()
    assert offered_tls13_suites(context) != list(suites)  # OpenSSL's default: all three
    set_tls13_suites(context, suites)
    assert offered_tls13_suites(context) == list(suites)
    other = ssl.create_default_context()
    assert len(offered_tls13_suites(other)) == 3  # per context: nothing process-wide changed


def test_a_suite_openssl_does_not_apply_is_refused_with_the_openssl_conf_route() -> None:
    context = ssl.create_default_context()
    with pytest.raises(CipherPolicyError) as refused:
        set_tls13_suites(context, (CHACHA, "TLS_NOT_A_SUITE"))
    assert "the context offers TLS_CHACHA20_POLY1305_SHA256 instead" in refused.value.message
    assert "OPENSSL_CONF" in refused.value.message
    assert f"Ciphersuites = {CHACHA}:TLS_NOT_A_SUITE" in refused.value.message


def test_suites_already_set_by_openssl_conf_need_no_ctypes(tmp_path: Path) -> None:
    """The fallback route: a process configured with OPENSSL_CONF is accepted as it is."""
    conf = tmp_path / "chacha-only.cnf"
    conf.write_text(
        "openssl_conf = init\n[init]\nssl_conf = ssl\n[ssl]\nsystem_default = tls\n"
        f"[tls]\nCiphersuites = {CHACHA}\n"
    )
    code = (
        "import ssl\n"
        "from device_sdk import ciphers\n"
        "def refuse(*_):\n"
        "    raise AssertionError('ctypes route used')\n"
        "ciphers._ssl_ctx_address = refuse\n"
        "context = ssl.create_default_context()\n"
        "ciphers.set_tls13_suites(context, ciphers.CHACHA20_SUITES)\n"
        "print(ciphers.offered_tls13_suites(context))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "OPENSSL_CONF": str(conf)},
        cwd=REPO,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"['{CHACHA}']"


def test_auto_resolves_from_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENSSL_ia32cap", raising=False)
    native = local_hardware_aes()
    assert native is hardware_aes(Path("/proc/cpuinfo").read_text(), machine=platform.machine())
    assert resolve("auto") == (AES_GCM_SUITES if native else CHACHA20_SUITES)


# -- handshakes with Mosquitto -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "mask", "expected"),
    [
        ("auto", MASK_AES_NI, {CHACHA}),
        ("aes", MASK_AES_NI, {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384"}),
        ("chacha20", None, {CHACHA}),
    ],
    ids=["auto-without-aes-ni", "aes-without-aes-ni", "chacha20-native"],
)
def test_policy_decides_the_negotiated_suite(
    broker: Mosquitto,
    devices: Devices,
    policy: str,
    mask: str | None,
    expected: set[str],
) -> None:
    store = devices.enroll("sensor-1")
    probe = probe_cipher(store, "sensor-1", broker, policy, mask=mask)
    assert probe["versions"] == ["TLSv1.3"] * 3
    assert set(probe["ciphers"]) <= expected  # every handshake, not just the first
    assert probe["info_ciphers"] == probe["ciphers"]
    if mask is not None:
        assert probe["hardware_aes"] is False


def test_auto_on_this_cpu_negotiates_what_the_decision_says(
    broker: Mosquitto, devices: Devices
) -> None:
    store = devices.enroll("sensor-1")
    probe = probe_cipher(store, "sensor-1", broker, "auto", mask=None)
    allowed = AES_GCM_SUITES if probe["hardware_aes"] else CHACHA20_SUITES
    assert set(probe["ciphers"]) <= set(allowed)
