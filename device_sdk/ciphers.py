"""Cipher policy for the device's TLS 1.3: ChaCha20-Poly1305 on CPUs without AES instructions.

Without AES instructions AES-GCM runs in software about five times slower than
ChaCha20-Poly1305, and OpenSSL 3.0 does not reorder its default TLS 1.3 suites for that: a client
keeps offering AES-256-GCM first. So the policy is decided here (:func:`hardware_aes`,
:func:`suites_for`, both pure) and written into each context (:func:`set_tls13_suites`).

Python 3.11's ``ssl`` cannot set TLS 1.3 suites (``set_ciphers`` covers TLS 1.2 only). Of the
routes that work, ``OPENSSL_CONF`` is process-wide and read once when OpenSSL loads, so one process
could not hold an ``aes`` and a ``chacha20`` context, and it replaces Debian's ``openssl.cnf``;
pyOpenSSL runs on cryptography's bundled OpenSSL, which cannot see the TPM provider that stdlib
``ssl`` loads. We call OpenSSL's ``SSL_CTX_set_ciphersuites`` on the context's own ``SSL_CTX``
through ctypes (:mod:`device_sdk.hazmat`). That reads CPython's ``PySSLContext`` layout, so the
layout is checked before the pointer is used, and the result is checked through the public
``get_ciphers()``; anything unexpected raises :class:`CipherPolicyError` instead of guessing.
A context whose suites are already right (``OPENSSL_CONF`` was set) is left untouched.
"""

from __future__ import annotations

import os
import platform
import ssl
import sys
from typing import Literal

from device_sdk.errors import CipherPolicyError
from device_sdk.hazmat import MissingBinding, cpython, libssl

CipherPolicy = Literal["auto", "chacha20", "aes"]
"""``auto``: ChaCha20 when the CPU has no AES instructions, AES-GCM otherwise."""

CHACHA20_SUITES = ("TLS_CHACHA20_POLY1305_SHA256",)
AES_GCM_SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384")

_AESNI_BIT = 1 << 57  # CPUID.1:ECX bit 25 (AES-NI), in the high half of OpenSSL's first word
_FXSR_BIT = 1 << 24  # masking FXSR makes OpenSSL drop AES-NI too (crypto/cpuid.c)
_IA32CAP_ENV = "OPENSSL_ia32cap"  # OpenSSL spells it so, and environment names are case-sensitive
_X86 = {"x86_64", "amd64", "i386", "i486", "i586", "i686", "x86"}


def hardware_aes(cpuinfo: str, *, machine: str, ia32cap: str | None = None) -> bool:
    """Whether OpenSSL will use AES instructions, from ``/proc/cpuinfo`` text and the mask.

    x86 lists ``aes`` under ``flags`` and OpenSSL honours ``OPENSSL_ia32cap`` (the way tests and
    benchmarks simulate an AES-less CPU); ARM lists ``aes`` under ``Features``.
    """
    arch = machine.lower()
    if arch in _X86:
        return _ia32cap_keeps_aes(_cpuinfo_lists(cpuinfo, "flags", "aes"), ia32cap)
    if arch.startswith(("aarch64", "arm")):
        return _cpuinfo_lists(cpuinfo, "Features", "aes")
    return False


def suites_for(policy: CipherPolicy, *, has_hardware_aes: bool) -> tuple[str, ...]:
    """The TLS 1.3 suites a client with ``policy`` offers, most preferred first."""
    if policy == "chacha20" or (policy == "auto" and not has_hardware_aes):
        return CHACHA20_SUITES
    if policy in ("aes", "auto"):
        return AES_GCM_SUITES
    raise ValueError(f"unknown cipher policy {policy!r}; use 'auto', 'chacha20' or 'aes'")


def local_hardware_aes() -> bool:
    """:func:`hardware_aes` for this machine: ``/proc/cpuinfo`` and ``OPENSSL_ia32cap``."""
    try:
        with open("/proc/cpuinfo") as file:
            cpuinfo = file.read()
    except OSError:
        cpuinfo = ""  # unknown CPU: assume no AES, for which ChaCha20 is the safe choice
    return hardware_aes(cpuinfo, machine=platform.machine(), ia32cap=os.environ.get(_IA32CAP_ENV))


def resolve(policy: CipherPolicy) -> tuple[str, ...]:
    """:func:`suites_for` on this machine (only ``auto`` looks at the CPU)."""
    return suites_for(policy, has_hardware_aes=policy != "auto" or local_hardware_aes())


def offered_tls13_suites(context: ssl.SSLContext) -> list[str]:
    """The TLS 1.3 suites ``context`` offers, in order."""
    return [c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.3"]


def set_tls13_suites(context: ssl.SSLContext, suites: tuple[str, ...]) -> None:
    """Make ``context`` offer exactly ``suites`` in TLS 1.3, or raise :class:`CipherPolicyError`.

    Call it on a context that no connection uses yet (OpenSSL's rule for ``SSL_CTX`` settings).
    """
    if offered_tls13_suites(context) == list(suites):
        return
    wanted = ":".join(suites)
    if not _set_ciphersuites(_ssl_ctx_address(context, wanted), wanted):
        raise _unavailable(wanted, "OpenSSL knows none of these suites")
    offered = offered_tls13_suites(context)
    if offered != list(suites):
        raise _unavailable(wanted, f"the context offers {':'.join(offered)} instead")


def _cpuinfo_lists(cpuinfo: str, field: str, flag: str) -> bool:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == field and flag in value.split():
            return True
    return False


def _ia32cap_keeps_aes(cpu_has_aes: bool, ia32cap: str | None) -> bool:
    """Apply ``OPENSSL_ia32cap`` to the AES-NI bit as OpenSSL 3.0's ``OPENSSL_cpuid_setup`` does.

    ``~X[:~Y]`` clears the bits of X from the detected first word, ``X`` replaces the word, and
    ``:Y`` alone leaves it as detected; the part after ``:`` is the second word, not AES-NI.
    """
    if not ia32cap or ia32cap.startswith(":"):
        return cpu_has_aes
    if ia32cap.startswith("~"):
        mask = _strtouint64(ia32cap[1:])
        return cpu_has_aes and not mask & (_AESNI_BIT | _FXSR_BIT)
    return bool(_strtouint64(ia32cap) & _AESNI_BIT)


def _strtouint64(text: str) -> int:
    """OpenSSL's ``ossl_strtouint64``: ``0x`` hex, ``0`` octal or decimal, up to a misfit."""
    base = 10
    if text.startswith("0"):
        base, text = 8, text[1:]
        if text[:1].lower() == "x":
            base, text = 16, text[1:]
    value = 0
    for char in text:
        digit = int(char, 16) if char in "0123456789abcdefABCDEF" else base
        if digit >= base:
            break
        value = value * base + digit
    return value & 0xFFFF_FFFF_FFFF_FFFF


def _ssl_ctx_address(context: ssl.SSLContext, wanted: str) -> int:
    """The ``SSL_CTX *`` inside ``context``, once it reports the same options through
    ``SSL_CTX_get_options`` as ``context.options`` does (layout checks: :mod:`.hazmat.cpython`)."""
    try:
        address = cpython.ssl_ctx_pointer(context)
        options = libssl.through(cpython.STDLIB_SSL_EXTENSION).SSL_CTX_get_options(address)
    except MissingBinding as exc:
        raise _unavailable(wanted, str(exc)) from exc
    if options != int(context.options):
        raise _unavailable(wanted, "the SSL_CTX pointer inside SSLContext did not check out")
    return address


def _set_ciphersuites(address: int, wanted: str) -> bool:
    try:
        set_ciphersuites = libssl.through(cpython.STDLIB_SSL_EXTENSION).SSL_CTX_set_ciphersuites
    except MissingBinding as exc:
        raise _unavailable(wanted, str(exc)) from exc
    return bool(set_ciphersuites(address, wanted.encode()) == 1)


def _unavailable(wanted: str, why: str) -> CipherPolicyError:
    return CipherPolicyError(
        f"cannot set the TLS 1.3 suites {wanted} on this Python "
        f"({sys.version.split()[0]}, {ssl.OPENSSL_VERSION}): {why}. Set them process-wide "
        "instead: point OPENSSL_CONF at a file holding 'openssl_conf = init', '[init]', "
        "'ssl_conf = ssl', '[ssl]', 'system_default = tls', '[tls]', "
        f"'Ciphersuites = {wanted}' (one per line), or choose another cipher policy"
    )
