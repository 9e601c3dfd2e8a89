"""ctypes bindings to libcrypto: loading OpenSSL 3 providers, and walking OpenSSL's stacks.

``OSSL_PROVIDER_load`` and ``EVP_set_default_properties`` put the tpm2 provider into the
running process (see :mod:`device_sdk.tpm_keystore`); ``OPENSSL_sk_*`` read the cipher stack
libssl returns. :func:`through` takes the extension module linked against this libcrypto.
"""

from __future__ import annotations

import ctypes
import functools

from device_sdk.hazmat._binding import Function, Library

__all__ = ["LibCrypto", "through"]


class LibCrypto(Library):
    """libcrypto's functions, by their C names."""

    name = "libcrypto"
    OSSL_PROVIDER_load = Function(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)
    EVP_set_default_properties = Function(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p)
    OPENSSL_sk_num = Function(ctypes.c_int, ctypes.c_void_p)
    OPENSSL_sk_value = Function(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)


@functools.cache
def through(via: str) -> LibCrypto:
    """libcrypto as linked by the extension module at ``via`` (``_ssl.__file__``, M2Crypto's)."""
    return LibCrypto(via)
