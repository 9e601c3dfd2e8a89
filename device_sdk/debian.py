"""Where an installed Debian package put a file (OpenSC's PKCS#11 module, an OpenSSL engine).

Asked of dpkg at run time rather than hard-coded: the paths carry the architecture triplet.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from device_sdk.errors import DeviceSdkError


class MissingPackageFile(DeviceSdkError):
    """A Debian package fleetgate relies on is not installed, or lacks the expected file."""


def package_file(package: str, suffix: str) -> Path:
    """The first file of installed Debian ``package`` whose path ends with ``suffix``."""
    try:
        listing = subprocess.run(  # noqa: S603 (our own arguments)
            ["dpkg", "-L", package],  # noqa: S607 (dpkg from PATH, as the shell would)
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise MissingPackageFile(
            f"cannot list the files of {package} ({exc}): install it with apt-get install {package}"
        ) from exc
    for line in listing.splitlines():
        if line.endswith(suffix):
            return Path(line)
    raise MissingPackageFile(
        f"{package} has no file ending in {suffix}: reinstall it with "
        f"apt-get install --reinstall {package}"
    )
