"""What importing the SDK loads: the broker takes Backoff and the key stores without paho."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from sdk_helpers import REPO

import device_sdk


@pytest.mark.parametrize(
    "modules",
    ["broker.server, broker.bridge", "device_sdk.backoff", "device_sdk"],
)
def test_importing_the_broker_or_backoff_does_not_load_paho(modules: str) -> None:
    code = f"import sys, {modules}\nprint(sorted(m for m in sys.modules if m.startswith('paho')))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_every_public_name_of_the_package_resolves_from_its_module() -> None:
    assert device_sdk.__all__ == sorted(device_sdk._HOME_OF)
    for name, module in device_sdk._HOME_OF.items():
        assert getattr(device_sdk, name) is getattr(importlib.import_module(module), name)
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        _ = device_sdk.Nothing  # type: ignore[attr-defined]
