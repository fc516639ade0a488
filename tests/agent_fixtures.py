"""Fixtures the agent stories share: a misbehaving stand-in server, bundles of the tiny model, a small disk.

Import them into a test module (`from tests.agent_fixtures import bundles, stand_in  # noqa: F401`);
`bundles` needs the `publisher` fixture from `tests.server_fixtures` imported there too.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.agent_support import BundleMaker
from tests.misbehaving_server import MisbehavingServer


@pytest.fixture()
def stand_in():
    """A stand-in sync server the test scripts, answer by answer (`tests/misbehaving_server.py`)."""
    with MisbehavingServer() as server:
        yield server


@pytest.fixture(scope="module")
def bundles(publisher, tmp_path_factory):
    """Signed bundles of the tiny model under any name and version, built on demand."""
    return BundleMaker(publisher, tmp_path_factory.mktemp("bundles"))


@pytest.fixture()
def small_disk(tmp_path):
    """A real 3 MiB tmpfs (root only)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill_disk(folder: Path) -> Path:
    """Fill the file system holding `folder` to the last byte, as other software on a device might;
    returns the file that fills it (`folder/filler`: unlink it to make room again)."""
    filler = folder / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    return filler
