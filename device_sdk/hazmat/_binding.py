"""The guard every binding goes through: a library, and its functions bound on first use."""

from __future__ import annotations

import ctypes
import threading
from typing import Any, ClassVar


class MissingBinding(ImportError):
    """A C library, or a function the SDK needs from it, is not there."""


class Function:
    """A C function of a :class:`Library`, declared by its C name, result and argument types."""

    def __init__(self, restype: Any, *argtypes: Any) -> None:
        self.restype = restype
        self.argtypes = list(argtypes)
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, library: Library | None, owner: type) -> Any:
        if library is None:
            return self
        return library._bind(self)


class Library:
    """A C library reached through ``via`` (a shared object that links it, or None: the
    process's own symbols), so its functions are those of the copy that extension uses."""

    name: ClassVar[str]
    use_errno: ClassVar[bool] = False

    def __init__(self, via: str | None) -> None:
        self.via = via
        try:
            self._lib = ctypes.CDLL(via, use_errno=self.use_errno)
        except OSError as exc:
            raise MissingBinding(
                f"cannot load {self.name} through {via or 'the process'}: {exc}", path=via
            ) from exc
        self._bound: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _bind(self, function: Function) -> Any:
        with self._lock:
            bound = self._bound.get(function.name)
            if bound is None:
                try:
                    bound = getattr(self._lib, function.name)
                except AttributeError:
                    raise MissingBinding(
                        f"{self.name} (through {self.via or 'the process'}) has no "
                        f"{function.name}: an older or different {self.name} than the SDK needs",
                        name=function.name,
                        path=self.via,
                    ) from None
                bound.restype = function.restype
                bound.argtypes = function.argtypes
                self._bound[function.name] = bound
            return bound
