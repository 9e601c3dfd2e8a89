"""fleetgate uses only the public APIs of asyncio, ssl and paho: their internals change between
releases without notice (asyncio's TLS protocol was rewritten in 3.11), so nothing in the
project's packages may import or reach a private name of theirs.

An AST scan, without running anything: imports of private modules or names (``from asyncio
import sslproto``, ``import _ssl``), private attributes of those modules (``ssl._x``,
``paho.mqtt.client._x``), and attributes that are private in their sources (``transport.
_ssl_protocol``, ``client._sock``) read off any object other than ``self``/``cls``, unless the
project itself defines a name of that spelling.
"""

from __future__ import annotations

import ast
import asyncio
import ssl
from collections.abc import Iterable, Iterator
from pathlib import Path

import paho.mqtt

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fleetgate", "enrollment", "broker", "device_sdk", "firmware_sim")
GUARDED = ("asyncio", "ssl", "paho", "_ssl", "_asyncio")
ASYNCIO_PUBLIC = set(asyncio.__all__) | {"subprocess"}  # asyncio.subprocess.PIPE and friends
ALLOWED = {("device_sdk/hazmat/cpython.py", "import _ssl")}
"""device_sdk.hazmat is where the SDK binds OpenSSL through ctypes, kept apart as pyca keeps its
hazmat: it imports the stdlib ssl's extension module only for the path of the file it was
loaded from (the OpenSSL it links). Nothing else of ``_ssl``, there or anywhere else."""


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _sources(paths: Iterable[Path]) -> Iterator[tuple[Path, ast.Module]]:
    for path in paths:
        yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _defined_private_names(trees: Iterable[ast.Module]) -> set[str]:
    """Every private name a body of code defines: attributes it assigns, functions, classes,
    class-level names and ``__slots__`` entries."""
    names: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)  # __slots__ = ("_x", ...)
    return {name for name in names if _private(name)}


def _library_files() -> list[Path]:
    files = sorted(Path(asyncio.__file__).parent.glob("*.py"))
    files.append(Path(ssl.__file__))
    files += sorted(Path(paho.mqtt.__file__).parent.glob("*.py"))
    return files


def _private_module_path(dotted: str) -> bool:
    """A module path into the guarded libraries that is not public."""
    parts = dotted.split(".")
    if parts[0] not in GUARDED or parts[-1] == "__file__":  # where a module lives is public
        return False
    if parts[0] in ("_ssl", "_asyncio") or any(_private(p) for p in parts):
        return True
    return parts[0] == "asyncio" and len(parts) > 1 and parts[1] not in ASYNCIO_PUBLIC


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
    """``mqtt.Client`` -> ``paho.mqtt.client.Client`` when ``mqtt`` names that module."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return None if base is None else f"{base}.{node.attr}"
    return None


def violations(tree: ast.Module, internals: set[str], own: set[str]) -> list[str]:
    """What ``tree`` reaches of asyncio, ssl or paho that is private, as ``line: what``."""
    found: list[str] = []
    aliases: dict[str, str] = {}  # local name -> module (or module.attribute) it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _private_module_path(alias.name):
                    found.append(f"{node.lineno}: import {alias.name}")
                local = alias.asname or alias.name.split(".")[0]
                aliases[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if _private_module_path(node.module):
                found.append(f"{node.lineno}: from {node.module} import ...")
                continue
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if _private_module_path(full):
                    found.append(f"{node.lineno}: from {node.module} import {alias.name}")
                aliases[alias.asname or alias.name] = full
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        dotted = _dotted(node, aliases)
        if dotted is not None and _private_module_path(dotted):
            found.append(f"{node.lineno}: {dotted}")
        elif (
            _private(node.attr)
            and node.attr in internals
            and node.attr not in own
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            found.append(f"{node.lineno}: .{node.attr} (private in asyncio, ssl or paho)")
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            found += _subclass_violations(node, aliases, internals)
    return sorted(set(found), key=lambda line: int(line.split(":")[0]))


def _subclass_violations(
    cls: ast.ClassDef, aliases: dict[str, str], internals: set[str]
) -> list[str]:
    """A subclass of a library class that overrides, or reads through ``self``, a private name
    of the library's (one it does not define itself)."""
    bases = [_dotted(base, aliases) or "" for base in cls.bases]
    if not any(base.split(".")[0] in GUARDED for base in bases):
        return []
    own = _defined_private_names([ast.Module(body=[cls], type_ignores=[])]) - {cls.name}
    found = [
        f"{item.lineno}: overrides {item.name} (private in {' '.join(bases)})"
        for item in cls.body
        if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
        and _private(item.name)
        and item.name in internals
    ]
    inherited = internals - own
    for node in ast.walk(cls):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
            and _private(node.attr)
            and node.attr in inherited
        ):
            found.append(f"{node.lineno}: self.{node.attr} (private in {' '.join(bases)})")
    return found


def _project() -> list[tuple[Path, ast.Module]]:
    return list(_sources(p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))))


def test_no_project_module_reaches_a_private_name_of_asyncio_ssl_or_paho():
    project = _project()
    internals = _defined_private_names(tree for _, tree in _sources(_library_files()))
    own = _defined_private_names(tree for _, tree in project)
    problems = [
        f"{path.relative_to(REPO)}:{line}"
        for path, tree in project
        for line in violations(tree, internals, own)
        if (str(path.relative_to(REPO)), line.split(": ", 1)[1]) not in ALLOWED
    ]
    assert problems == []


def test_the_scan_catches_each_kind_of_private_use():
    internals = _defined_private_names(tree for _, tree in _sources(_library_files()))
    source = """
import asyncio
import ssl
import _ssl
import asyncio.base_events
import paho.mqtt.client as mqtt
from asyncio import sslproto, Protocol
from asyncio.sslproto import SSLProtocol
from paho.mqtt.client import _socketpair_compat, Client

ssl._create_unverified_context()
asyncio.sslproto.SSLProtocol
mqtt._socketpair_compat
transport._ssl_protocol.max_size = 4096
client._sock
self._sock
asyncio.Protocol, ssl.SSLContext, mqtt.Client, Client().publish

class Patched(mqtt.Client):
    def _create_socket(self):
        self._mine = 1
        return self._mine, self._host
"""
    lines = violations(ast.parse(source), internals, own=set())
    assert sorted({int(line.split(":")[0]) for line in lines}) == [
        4, 5, 7, 8, 9, 11, 12, 13, 14, 15, 20, 22,
    ]  # fmt: skip
