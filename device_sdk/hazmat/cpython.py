"""CPython's own OpenSSL: where the stdlib ``ssl`` links it (``STDLIB_SSL_EXTENSION``, the path
libssl and libcrypto are bound through, so a pointer goes back to the OpenSSL that made it), and
the ``SSL_CTX *`` inside an ``ssl.SSLContext``, read with ctypes.

``PySSLContext`` is ``PyObject_HEAD`` followed by ``SSL_CTX *ctx``. ``object.__basicsize__`` is
the size of that head in every build (debug, trace-refs, free-threaded), and the head ends with
the type pointer: if that pointer is not the context's type, the layout is not the one this
code knows, and nothing is dereferenced (:class:`MissingBinding`). The caller still has to check
the pointer against the context (its options, through libssl) before using it.
"""

from __future__ import annotations

import _ssl  # the stdlib ssl's extension module: only its file path is used
import ctypes
import ssl
import sys

from device_sdk.hazmat._binding import MissingBinding

__all__ = ["STDLIB_SSL_EXTENSION", "ssl_ctx_pointer"]

STDLIB_SSL_EXTENSION: str = _ssl.__file__


def ssl_ctx_pointer(context: ssl.SSLContext) -> int:
    """The candidate ``SSL_CTX *`` of ``context``, after checking CPython's layout around it."""
    if sys.implementation.name != "cpython" or not isinstance(context, ssl.SSLContext):
        raise MissingBinding("this is not CPython's ssl.SSLContext")
    head = object.__basicsize__
    word = ctypes.sizeof(ctypes.c_void_p)
    if ctypes.c_void_p.from_address(id(context) + head - word).value != id(type(context)):
        raise MissingBinding("CPython's SSLContext object layout is not the expected one")
    address = ctypes.c_void_p.from_address(id(context) + head).value
    if not address:
        raise MissingBinding("CPython's SSLContext holds no SSL_CTX")
    return address
