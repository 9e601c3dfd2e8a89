"""ctypes bindings to libssl: the ``SSL_CTX`` calls Python's ``ssl`` and M2Crypto do not offer.

TLS 1.3 suites (``SSL_CTX_set_ciphersuites``), the minimum version and write mode
(``SSL_CTX_ctrl``), and reading back what a context offers. ``SSL_CTX`` pointers go only to the
libssl that made them, so :func:`through` takes the extension module that made them.
"""

from __future__ import annotations

import ctypes
import functools

from device_sdk.hazmat._binding import Function, Library

__all__ = ["LibSsl", "through"]

SSL_CTRL_MODE = 33
SSL_CTRL_SET_MIN_PROTO_VERSION = 123
SSL_MODE_ENABLE_PARTIAL_WRITE = 0x1
SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER = 0x2
TLS1_3_VERSION = 0x0304


class LibSsl(Library):
    """libssl's functions, by their C names."""

    name = "libssl"
    SSL_CTX_set_ciphersuites = Function(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p)
    SSL_CTX_get_options = Function(ctypes.c_uint64, ctypes.c_void_p)
    SSL_CTX_ctrl = Function(
        ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p
    )
    SSL_CTX_get_ciphers = Function(ctypes.c_void_p, ctypes.c_void_p)
    SSL_CIPHER_get_name = Function(ctypes.c_char_p, ctypes.c_void_p)


@functools.cache
def through(via: str) -> LibSsl:
    """libssl as linked by the extension module at ``via`` (``_ssl.__file__``, M2Crypto's)."""
    return LibSsl(via)
