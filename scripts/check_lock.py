"""Checks that requirements/dev.txt is the lock of the current pyproject.toml and build.in.

The lock's header carries a digest of its inputs (the dependency tables of pyproject.toml and
requirements/build.in). A digest that differs means someone changed a dependency without
`make lock`; a pin that does not satisfy a declared requirement is named. ``--stamp`` (used by
scripts/lock.sh) writes the digest after a refresh.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "dev.txt"
BUILD_LOCK = ROOT / "requirements" / "build.txt"
BUILD_IN = ROOT / "requirements" / "build.in"
DIGEST_PREFIX = "# inputs-sha256: "
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)


def inputs_digest() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    inputs = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "build.in": BUILD_IN.read_text(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def pins(path: Path) -> dict[str, str]:
    return {canonical(name): version for name, version in PIN.findall(path.read_text())}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs.extend(extra)
    return reqs


def problems() -> list[str]:
    from packaging.requirements import Requirement  # pytest's dependency: in every dev venv

    text = LOCK.read_text()
    found = [line for line in text.splitlines() if line.startswith(DIGEST_PREFIX)]
    out = []
    if not found:
        out.append(f"{LOCK.relative_to(ROOT)} has no '{DIGEST_PREFIX.strip()}' line")
    elif found[0].removeprefix(DIGEST_PREFIX).strip() != inputs_digest():
        out.append("pyproject.toml or requirements/build.in changed since the lock was made")
    locked = pins(LOCK)
    for spec in declared():
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate():
            continue
        version = locked.get(canonical(req.name))
        if version is None:
            out.append(f"{req.name} is required by pyproject.toml but not in the lock")
        elif not req.specifier.contains(version, prereleases=True):
            out.append(f"{req.name}=={version} in the lock does not satisfy '{spec}'")
    build = pins(BUILD_LOCK)
    for name, version in build.items():
        if name in locked and locked[name] != version:
            out.append(f"{name} is {version} in build.txt but {locked[name]} in dev.txt")
    return out


def stamp() -> None:
    lines = [ln for ln in LOCK.read_text().splitlines() if not ln.startswith(DIGEST_PREFIX)]
    at = next(i for i, ln in enumerate(lines) if not ln.startswith("#"))
    lines.insert(at, f"{DIGEST_PREFIX}{inputs_digest()}")
    LOCK.write_text("\n".join(lines) + "\n")


def main() -> int:
    if sys.argv[1:] == ["--stamp"]:
        stamp()
    found = problems()
    for problem in found:
        print(f"check_lock: {problem}", file=sys.stderr)
    if found:
        print("check_lock: refresh it with `make lock`, then commit requirements/", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
