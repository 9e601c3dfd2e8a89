"""ctypes bindings to the C library: ``prctl``, which Python's ``os`` does not offer.

The simulator's pcscd and card applet take ``PR_SET_PDEATHSIG`` so that a crashed test run
leaves none of them behind.
"""

from __future__ import annotations

import ctypes
import functools

from device_sdk.hazmat._binding import Function, Library

__all__ = ["LibC", "last_errno", "process"]

PR_SET_PDEATHSIG = 1


class LibC(Library):
    """libc's functions, by their C names; errno is kept (:func:`last_errno`)."""

    name = "libc"
    use_errno = True
    prctl = Function(
        ctypes.c_int, ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong
    )


@functools.cache
def process() -> LibC:
    """The libc this process runs on."""
    return LibC(None)


def last_errno() -> int:
    """errno as the last call through :class:`LibC` left it."""
    return ctypes.get_errno()
