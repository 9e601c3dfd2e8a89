"""ctypes bindings to C libraries, one module per library (pyca/cryptography's ``hazmat`` idea).

Each module binds only the functions the SDK (and its simulator) call and nothing else:
:mod:`.libssl`, :mod:`.libcrypto`, :mod:`.libc`, and :mod:`.cpython` for the one read of
CPython's object memory. A function is bound on first use, through the extension module linked
against the library, and a missing library or function raises :class:`MissingBinding` naming
both; callers turn that into advice (another route, another package).
"""

from device_sdk.hazmat._binding import MissingBinding

__all__ = ["MissingBinding"]
